"""Write a demo model of about a given size: ``python -m server.demo_model --size 2GiB DIR``.

The demo model is an MLP (input → ``num_layers`` square layers → output) whose hidden size and depth are chosen
so the weights add up to about ``--size`` bytes; ``config.json`` records the shape and the built-in demo handler
(``server/handlers/demo.py``) serves it. Files are written as safetensors shards of at most ``--shard-size`` with a
``model.safetensors.index.json`` (or a single ``model.safetensors`` when one shard is enough).

Generating must take seconds for gigabytes, so no per-element randomness: one random block of small values
is generated with numpy and written over and over (rotated per tensor). This module never imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.units import parse_size
from server.errors import ConfigError

MODEL_TYPE = "weightcache-demo"
DEFAULT_SHARD_BYTES = 512 * 1024 * 1024
_BLOCK_ELEMENTS = 4 * 1024 * 1024  # 8 MiB of float16 per random block
_DTYPES = {"float16": ("F16", np.float16), "bfloat16": ("BF16", None), "float32": ("F32", np.float32)}


@dataclass(frozen=True)
class DemoShape:
    input_dim: int
    hidden_size: int
    num_layers: int
    output_dim: int
    torch_dtype: str = "float16"

    def config(self) -> dict[str, Any]:
        return {
            "model_type": MODEL_TYPE,
            "input_dim": self.input_dim,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "output_dim": self.output_dim,
            "torch_dtype": self.torch_dtype,
        }


def tensor_shapes(shape: DemoShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of the demo model, in file order; the handler builds its module from the same names."""
    shapes: dict[str, tuple[int, ...]] = {
        "input.weight": (shape.hidden_size, shape.input_dim),
        "input.bias": (shape.hidden_size,),
    }
    for i in range(shape.num_layers):
        shapes[f"layers.{i}.weight"] = (shape.hidden_size, shape.hidden_size)
        shapes[f"layers.{i}.bias"] = (shape.hidden_size,)
    shapes["output.weight"] = (shape.output_dim, shape.hidden_size)
    shapes["output.bias"] = (shape.output_dim,)
    return shapes


def shape_for_size(size: int, *, input_dim: int = 64, output_dim: int = 16, itemsize: int = 2) -> DemoShape:
    """A shape whose weights total about ``size`` bytes: at least 8 layers, hidden size a multiple of 16, ≤ 8192."""
    hidden = 16
    while hidden * 2 <= 8192 and (hidden * 2) ** 2 * itemsize * 8 <= size:
        hidden *= 2
    per_layer = (hidden * hidden + hidden) * itemsize
    io = (hidden * input_dim + hidden + output_dim * hidden + output_dim) * itemsize
    layers = max(1, round((size - io) / per_layer))
    return DemoShape(input_dim=input_dim, hidden_size=hidden, num_layers=layers, output_dim=output_dim)


def write_demo_model(
    directory: Path, shape: DemoShape, *, shard_bytes: int = DEFAULT_SHARD_BYTES, seed: int = 0
) -> list[Path]:
    """Write config.json and the weights into ``directory``; returns the weight files written."""
    if shape.torch_dtype not in _DTYPES:
        raise ConfigError(f"demo model dtype must be one of {', '.join(_DTYPES)}, not {shape.torch_dtype!r}")
    code, np_dtype = _DTYPES[shape.torch_dtype]
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Uniform in ±1/sqrt(fan_in)-ish: small enough that tanh activations neither saturate nor vanish much.
    scale = 1.0 / math.sqrt(max(shape.hidden_size, shape.input_dim))
    values = (rng.random(_BLOCK_ELEMENTS, dtype=np.float32) * 2 - 1) * scale
    block = _bfloat16_bits(values) if np_dtype is None else values.astype(np_dtype)
    itemsize = block.dtype.itemsize

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, dims in tensor_shapes(shape).items():
        nbytes = math.prod(dims) * itemsize
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, dims))
        used += nbytes

    written: list[Path] = []
    weight_map: dict[str, str] = {}
    for n, members in enumerate(shards, start=1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        path = directory / name
        _write_safetensors(path, members, code, itemsize, block, rng)
        written.append(path)
        weight_map.update({tensor: name for tensor, _ in members})
    if len(shards) > 1:
        total = sum(p.stat().st_size for p in written)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(shape.config(), indent=2))
    return written


def _bfloat16_bits(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """float32 → bfloat16 bit patterns (numpy has no bfloat16): the top half, rounded to nearest even."""
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _write_safetensors(
    path: Path,
    members: list[tuple[str, tuple[int, ...]]],
    code: str,
    itemsize: int,
    block: np.ndarray[Any, Any],
    rng: np.random.Generator,
) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in members:
        nbytes = math.prod(dims) * itemsize
        header[name] = {"dtype": code, "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data region 8-byte aligned, as the reference writer does
    tmp = path.with_name(path.name + ".incomplete")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, dims in members:
            remaining = math.prod(dims)
            shift = int(rng.integers(len(block)))
            rotated = np.concatenate([block[shift:], block[:shift]])  # different values per tensor, for free
            while remaining:
                take = min(remaining, len(rotated))
                f.write(rotated[:take].tobytes())
                remaining -= take
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.demo_model",
        description="Write a demo model (config.json + safetensors shards) of about SIZE bytes into DIR.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR")
    parser.add_argument("--size", default="100MiB", help="total weight bytes: 2GiB, 500MiB, 1G or plain bytes")
    parser.add_argument("--shard-size", default="512MiB", help="largest shard (default 512MiB)")
    parser.add_argument("--dtype", default="float16", choices=list(_DTYPES))
    parser.add_argument("--input-dim", type=int, default=64)
    parser.add_argument("--output-dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        size, shard = parse_size(args.size), parse_size(args.shard_size)
    except ConfigError as e:
        parser.error(str(e))
    itemsize = 4 if args.dtype == "float32" else 2
    shape = shape_for_size(size, input_dim=args.input_dim, output_dim=args.output_dim, itemsize=itemsize)
    shape = DemoShape(shape.input_dim, shape.hidden_size, shape.num_layers, shape.output_dim, args.dtype)
    start = time.perf_counter()
    files = write_demo_model(args.directory, shape, shard_bytes=shard, seed=args.seed)
    total = sum(p.stat().st_size for p in files)
    print(
        f"wrote {total / 2**20:.1f} MiB in {len(files)} file(s) to {args.directory} in "
        f"{time.perf_counter() - start:.1f} s (hidden {shape.hidden_size}, {shape.num_layers} layers)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
