"""server/readahead.py: reading a cached model ahead while torch imports; never an error."""

from __future__ import annotations

from pathlib import Path

from server.readahead import start_readahead, weight_files


def test_weight_files_of_a_directory_are_its_safetensors_in_order(tiny_model: Path) -> None:
    files = weight_files(tiny_model)
    assert files == sorted(tiny_model.glob("*.safetensors")) and len(files) > 1


def test_readahead_of_a_cached_model_runs_in_the_background_and_finishes(tiny_model: Path) -> None:
    thread = start_readahead(tiny_model)
    assert thread is not None and thread.daemon
    thread.join(10)
    assert not thread.is_alive()


def test_readahead_of_a_missing_model_does_nothing(tmp_path: Path) -> None:
    assert start_readahead(tmp_path / "not-there-yet") is None
