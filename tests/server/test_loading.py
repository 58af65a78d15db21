"""server/loading.py: weights are checked before anything is built, and both strategies load the same tensors."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.errors import CorruptModelError, ModelLoadError
from server.formats import discover, read_safetensors_header
from server.loading import PipelinedStrategy, load_model
from tests.server.conftest import CacheRoot

CPU = torch.device("cpu")


def _reference(model_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def test_sharded_model_loads_every_tensor_with_the_reference_values(tiny_model: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_model, root=tmp_path, device=CPU)
    assert loaded.files.kind == "safetensors-sharded"
    assert len(loaded.files.weights) > 1
    reference = _reference(tiny_model)
    assert loaded.state_dict.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded.state_dict[name], tensor), name


def test_pipelined_strategy_loads_the_same_tensors_as_mmap(tiny_model: Path, tmp_path: Path) -> None:
    mapped = load_model(tiny_model, root=tmp_path, device=CPU, strategy="mmap")
    piped = load_model(tiny_model, root=tmp_path, device=CPU, strategy="pipelined")
    assert piped.strategy == "pipelined"
    for name, tensor in mapped.state_dict.items():
        assert torch.equal(piped.state_dict[name], tensor), name


@pytest.mark.parametrize("workers", [1, 3])
def test_pipelined_chunks_across_files_and_workers_land_in_place(tiny_model: Path, workers: int) -> None:
    # Chunks of 1000 bytes: several per shard, uneven tails, interleaved over files and taken by several threads.
    files = discover(tiny_model)
    state = PipelinedStrategy(chunk_bytes=1000, buffers=2, workers=workers).load(files, CPU)
    reference = _reference(tiny_model)
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


def test_pipelined_file_truncated_after_the_check_fails_the_whole_load(tiny_model: Path) -> None:
    files = discover(tiny_model)
    shard = files.weights[-1].path
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CorruptModelError, match="truncated since checked"):
        PipelinedStrategy(chunk_bytes=1000, workers=3).load(files, CPU)


def test_single_safetensors_file_loads_without_config(tiny_model: Path, tmp_path: Path) -> None:
    one = min(tiny_model.glob("*.safetensors"))
    loaded = load_model(one, root=tmp_path, device=CPU)
    assert loaded.files.kind == "safetensors"
    assert loaded.files.config == {}
    assert loaded.state_dict.keys() == load_file(one).keys()


def test_truncated_shard_is_a_corrupt_model(tiny_model: Path, tmp_path: Path) -> None:
    shard = sorted(tiny_model.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptModelError, match="truncated"):
        load_model(tiny_model, root=tmp_path, device=CPU)


def test_header_that_is_not_json_is_a_corrupt_model(tiny_model: Path) -> None:
    shard = min(tiny_model.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptModelError, match="not valid JSON"):
        read_safetensors_header(shard)


def test_header_length_beyond_the_file_is_a_corrupt_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CorruptModelError, match="header claims 10000 bytes"):
        read_safetensors_header(bad)


def test_tensor_whose_size_disagrees_with_its_shape_is_a_corrupt_model(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CorruptModelError, match="needs 16"):
        read_safetensors_header(bad)


def test_index_naming_a_missing_shard_is_a_corrupt_model(tiny_model: Path) -> None:
    max(tiny_model.glob("*.safetensors")).unlink()
    with pytest.raises(CorruptModelError, match="missing weight file"):
        discover(tiny_model)


def test_index_shard_name_escaping_the_model_directory_is_refused(tiny_model: Path) -> None:
    index = tiny_model / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"]["input.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(CorruptModelError, match="escape"):
        discover(tiny_model)


def test_directory_without_weights_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weights found"):
        discover(tmp_path)


def test_size_different_from_the_cache_manifest_is_a_corrupt_model(cache_root: CacheRoot) -> None:
    snapshot = cache_root.stage("m1")
    link = cache_root.publish("s3://b/m1/", "m1")
    # Same header, one byte more: the header check passes, only the manifest can tell.
    with open(min(snapshot.glob("*.safetensors")), "ab") as f:
        f.write(b"\0")
    with pytest.raises(CorruptModelError, match="cache manifest says"):
        load_model(link, root=cache_root.root, device=CPU, verify="size")


def test_digest_mismatch_is_caught_only_when_digests_are_verified(cache_root: CacheRoot) -> None:
    snapshot = cache_root.stage("m2")
    link = cache_root.publish("s3://b/m2/", "m2")
    shard = min(snapshot.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip bits inside a tensor: same size, valid header
    shard.write_bytes(bytes(data))
    assert load_model(link, root=cache_root.root, device=CPU, verify="size").verified == "size"
    with pytest.raises(CorruptModelError, match="digest"):
        load_model(link, root=cache_root.root, device=CPU, verify="digest")


def test_a_publish_during_a_load_never_mixes_two_revisions(cache_root: CacheRoot) -> None:
    # The loader resolves the pointer once: files and manifest come from the build it named, even if the
    # pointer is swapped to another build (with other files) before the files are opened.
    old = cache_root.stage("m3", "old")
    link = cache_root.publish("s3://b/m3/", "m3", "old")
    cache_root.stage("m3", "new", shard_bytes=8192)
    resolved = Path(os.path.realpath(link))
    cache_root.publish("s3://b/m3/", "m3", "new")
    loaded = load_model(resolved, root=cache_root.root, device=CPU, verify="digest")
    assert loaded.verified == "digest"
    assert {w.path.parent for w in loaded.files.weights} == {old}


def test_a_manifest_is_only_ever_read_from_the_build_itself(cache_root: CacheRoot) -> None:
    cache_root.stage("m5")
    link = cache_root.publish("s3://b/m5/", "m5")
    (cache_root.root / "snapshots/m5/rev1/manifest.json").unlink()
    assert load_model(link, root=cache_root.root, device=CPU).verified == "headers"


def test_object_uri_resolving_to_one_file_in_a_snapshot_is_verified(cache_root: CacheRoot) -> None:
    snapshot = cache_root.stage("m4", shard_bytes=10**9)
    link = cache_root.publish("s3://b/m4.safetensors", "m4", target="model.safetensors")
    assert link.is_file() and (snapshot / "model.safetensors").is_file()
    loaded = load_model(link, root=cache_root.root, device=CPU, verify="digest")
    assert loaded.verified == "digest"
