"""server/demo_model.py: the generator writes about the requested size, sharded, in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from server.demo_model import shape_for_size, tensor_shapes
from tests.server.conftest import REPO


def test_cli_writes_about_the_requested_size_in_shards_with_an_index(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.demo_model", "--size", "3MiB", "--shard-size", "1MiB", str(tmp_path / "m")],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    shards = sorted((tmp_path / "m").glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    assert len(shards) >= 3
    assert abs(total - 3 * 2**20) < 0.1 * 3 * 2**20
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    shape = shape_for_size(3 * 2**20)
    assert set(index["weight_map"]) == set(tensor_shapes(shape))
    assert config["num_layers"] == shape.num_layers


def test_generated_weights_are_readable_by_the_reference_safetensors_loader(tiny_model: Path) -> None:
    names = set()
    for shard in tiny_model.glob("*.safetensors"):
        for name, tensor in load_file(shard).items():
            assert tensor.abs().max() < 1.0  # small values: the demo MLP stays finite
            names.add(name)
    assert "output.bias" in names


def test_shape_for_two_gibibytes_uses_wide_layers() -> None:
    shape = shape_for_size(2 * 2**30)
    assert shape.hidden_size == 8192 and shape.num_layers == 16


def test_bfloat16_model_matches_its_float32_values_within_bfloat16_rounding(tmp_path: Path) -> None:
    import torch

    from server.demo_model import DemoShape, write_demo_model
    from server.handlers.demo import create_handler

    shape = DemoShape(input_dim=8, hidden_size=32, num_layers=4, output_dim=3, torch_dtype="bfloat16")
    as_f32 = DemoShape(input_dim=8, hidden_size=32, num_layers=4, output_dim=3, torch_dtype="float32")
    write_demo_model(tmp_path / "bf16", shape, shard_bytes=4096)
    write_demo_model(tmp_path / "f32", as_f32, shard_bytes=4096)
    bf16 = {k: v for p in (tmp_path / "bf16").glob("*.safetensors") for k, v in load_file(p).items()}
    f32 = {k: v for p in (tmp_path / "f32").glob("*.safetensors") for k, v in load_file(p).items()}
    assert bf16.keys() == f32.keys()
    for name, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16, name
        # Same seed, same values: bfloat16 is float32 rounded to nearest (relative error ≤ 2^-8).
        assert torch.equal(tensor, f32[name].to(torch.bfloat16)), name
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    handler = create_handler(tmp_path / "bf16", config, torch.device("cpu"))
    handler.load_state_dict(bf16)
    out = handler.predict([[0.1] * 8])
    assert len(out[0]) == 3 and all(abs(v) < 100 for v in out[0])
