"""Model weight formats on disk: the safetensors header (parsed and checked before a single tensor is built: known
dtypes, byte ranges that match shapes and lie inside the file) and the registry of formats that discovers a model's
weight files (a sharded ``model.safetensors.index.json`` or single safetensors files), in the spirit of vLLM's
``model_loader``. Pure reading: it never maps or copies weights (:mod:`server.loading` does).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from server.errors import CorruptModelError, ModelLoadError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# A header larger than this is not a real model's: refuse it instead of allocating whatever the file claims.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


# --------------------------------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's place in a safetensors file; ``start``/``end`` are relative to the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class SafetensorsFile:
    """A checked safetensors file: its size, where the data region starts, and its tensors."""

    path: Path
    size: int
    data_offset: int
    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]

    @property
    def data_len(self) -> int:
        return self.size - self.data_offset


def read_safetensors_header(path: Path) -> SafetensorsFile:
    """Parse and check ``path``'s header against its size; ``CorruptModelError`` says what is wrong."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptModelError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CorruptModelError(
                    f"{path}: header claims {header_len} bytes but the file has {size} (truncated or not safetensors)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptModelError(f"{path}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptModelError(f"{path}: safetensors header is not a JSON object")
    data_offset = 8 + header_len
    data_len = size - data_offset
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorSpec] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, data_len)
    return SafetensorsFile(path=path, size=size, data_offset=data_offset, tensors=tensors, metadata=metadata)


def _check_entry(path: Path, name: str, entry: Any, data_len: int) -> TensorSpec:
    try:
        dtype = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        start, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptModelError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from e
    if dtype not in DTYPES:
        raise CorruptModelError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if any(d < 0 for d in shape) or not 0 <= start <= end:
        raise CorruptModelError(f"{path}: tensor {name!r} has a negative shape or offsets")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - start != expected:
        raise CorruptModelError(
            f"{path}: tensor {name!r} spans {end - start} bytes but {dtype}{list(shape)} needs {expected}"
        )
    if end > data_len:
        raise CorruptModelError(
            f"{path}: tensor {name!r} ends at byte {end} of the data region but the file only holds {data_len} "
            "(truncated?)"
        )
    return TensorSpec(name=name, dtype=dtype, shape=shape, start=start, end=end)


# --------------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class ModelFiles:
    """What a model path holds: its format, its weight files (checked), and its config (``{}`` if none)."""

    model_path: Path
    model_dir: Path
    kind: str
    weights: list[SafetensorsFile]
    config: dict[str, Any]
    extra_files: list[Path] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(w.size for w in self.weights)


class WeightFormat(Protocol):
    """One kind of weight layout: ``detect`` returns the weight files if ``path`` holds this kind, else None."""

    kind: str

    def detect(self, path: Path) -> list[Path] | None: ...


class _SafetensorsIndex:
    kind = "safetensors-sharded"

    def detect(self, path: Path) -> list[Path] | None:
        index = path / INDEX_NAME
        if not index.is_file():
            return None
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptModelError(f"{index}: not a valid safetensors index ({e})") from e
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptModelError(f"{index}: weight_map is empty or not an object")
        shards: list[Path] = []
        for shard in dict.fromkeys(weight_map.values()):
            if not isinstance(shard, str) or shard.startswith("/") or ".." in shard.split("/") or "\x00" in shard:
                raise CorruptModelError(f"{index}: shard name {shard!r} would escape the model directory")
            shards.append(path / shard)
        return shards


class _SafetensorsFiles:
    kind = "safetensors"

    def detect(self, path: Path) -> list[Path] | None:
        if path.is_file():
            return [path] if path.suffix == ".safetensors" else None
        found = sorted(path.glob("*.safetensors"))
        return found or None


# Tried in order: the index wins over a glob of the same directory.
FORMATS: list[WeightFormat] = [_SafetensorsIndex(), _SafetensorsFiles()]


def discover(model_path: Path) -> ModelFiles:
    """Find and check the weight files at ``model_path`` (a directory or a single file)."""
    if not model_path.exists():
        raise ModelLoadError(f"model path {model_path} does not exist")
    for fmt in FORMATS:
        paths = fmt.detect(model_path)
        if paths is None:
            continue
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise CorruptModelError(f"{model_path}: missing weight file(s) {', '.join(p.name for p in missing)}")
        weights = [read_safetensors_header(p) for p in paths]
        if fmt.kind == "safetensors-sharded":
            _check_index(model_path, weights)
        _check_unique(weights)
        model_dir = model_path if model_path.is_dir() else model_path.parent
        config, extra = _read_config(model_path)
        return ModelFiles(
            model_path=model_path, model_dir=model_dir, kind=fmt.kind, weights=weights, config=config,
            extra_files=extra,
        )
    raise ModelLoadError(
        f"no weights found at {model_path}: expected a .safetensors file, or a directory with {INDEX_NAME} or "
        "*.safetensors files"
    )


def _check_index(model_dir: Path, weights: list[SafetensorsFile]) -> None:
    weight_map: dict[str, str] = json.loads((model_dir / INDEX_NAME).read_text())["weight_map"]
    by_name = {w.path.name: w for w in weights}
    for tensor, shard in weight_map.items():
        shard_file = by_name.get(Path(shard).name)
        if shard_file is None or tensor not in shard_file.tensors:
            raise CorruptModelError(f"{model_dir / INDEX_NAME}: tensor {tensor!r} is not in shard {shard!r}")


def _check_unique(weights: list[SafetensorsFile]) -> None:
    seen: dict[str, Path] = {}
    for w in weights:
        for name in w.tensors:
            if name in seen:
                raise CorruptModelError(f"tensor {name!r} is in both {seen[name]} and {w.path}")
            seen[name] = w.path


def _read_config(model_path: Path) -> tuple[dict[str, Any], list[Path]]:
    config_path = model_path / CONFIG_NAME if model_path.is_dir() else None
    if config_path is None or not config_path.is_file():
        return {}, []
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptModelError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CorruptModelError(f"{config_path}: expected a JSON object")
    return config, [config_path]


__all__ = ["DTYPES", "FORMATS", "ModelFiles", "SafetensorsFile", "TensorSpec", "discover", "read_safetensors_header"]
