"""server/waiting.py: where a model appears, and waiting for it without busy-polling, bounded by a deadline."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from agent.store.layout import current_boot_id
from server.errors import InvalidModelUriError, ModelWaitTimeoutError
from server.waiting import nearest_existing_ancestor, resolve_model_path, wait_for_path


def test_prefix_uri_resolves_to_the_mirrored_path_without_trailing_slash() -> None:
    assert resolve_model_path(Path("/c"), "s3://models/llama/v1/") == Path("/c/models/s3/models/llama/v1")


def test_object_uri_resolves_to_the_mirrored_file_path() -> None:
    assert resolve_model_path(Path("/c"), "s3://models/t/tok.json") == Path("/c/models/s3/models/t/tok.json")


@pytest.mark.parametrize(
    "uri", ["http://b/k", "s3://b/../etc/", "s3://bucket/a//b", "s3://bucket/a\x00b", "s3:///key", "s3://bucket"]
)
def test_malformed_uris_are_rejected_with_a_clear_error(uri: str) -> None:
    with pytest.raises(InvalidModelUriError, match="WEIGHTCACHE_MODEL"):
        resolve_model_path(Path("/c"), uri)


def test_nearest_existing_ancestor_is_the_deepest_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert nearest_existing_ancestor(tmp_path / "a" / "b" / "c") == tmp_path / "a"


async def test_existing_path_returns_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    await wait_for_path(tmp_path, timeout=5)
    assert time.monotonic() - started < 0.5


async def test_atomically_published_path_wakes_the_waiter_before_the_poll_interval(tmp_path: Path) -> None:
    target = tmp_path / "snapshots" / "id" / "rev" / "data"
    target.mkdir(parents=True)
    (target.parent / "manifest.json").write_text(json.dumps({"boot_id": current_boot_id()}))
    link = tmp_path / "models" / "s3" / "bucket" / "model"

    async def publish_later() -> None:
        await asyncio.sleep(0.3)
        link.parent.mkdir(parents=True)  # directories appear one by one: the watch must follow them down
        await asyncio.sleep(0.1)
        tmp = link.with_name(".tmp-link")
        tmp.symlink_to(os.path.relpath(target, link.parent))
        os.replace(tmp, link)

    publisher = asyncio.create_task(publish_later())
    started = time.monotonic()
    # A 30 s poll interval: only an inotify wake-up can return within the assertion below.
    await wait_for_path(link, timeout=10, poll_interval=30)
    elapsed = time.monotonic() - started
    await publisher
    assert 0.35 < elapsed < 2.0


async def test_dangling_symlink_is_not_a_ready_model(tmp_path: Path) -> None:
    link = tmp_path / "model"
    link.symlink_to("does-not-exist")
    with pytest.raises(ModelWaitTimeoutError):
        await wait_for_path(link, timeout=0.3, poll_interval=0.1)


async def test_missing_path_times_out_with_the_path_in_the_message(tmp_path: Path) -> None:
    path = tmp_path / "models" / "s3" / "b" / "never"
    started = time.monotonic()
    with pytest.raises(ModelWaitTimeoutError, match=str(path)):
        await wait_for_path(path, timeout=0.5, poll_interval=0.1)
    assert time.monotonic() - started < 2


async def test_a_build_of_an_earlier_boot_not_known_durable_is_not_ready_until_marked(tmp_path: Path) -> None:
    # After a reboot the agent re-verifies such a build before serving it; a server that looks first waits.
    from tests.server.conftest import CacheRoot

    cache_root = CacheRoot(tmp_path)
    cache_root.stage("m1")
    link = cache_root.publish("s3://b/m1/", "m1")
    cache_root.write_manifest("m1", "rev1", "s3://b/m1/", "models/s3/b/m1", boot_id="an-earlier-boot")
    with pytest.raises(ModelWaitTimeoutError):
        await wait_for_path(link, timeout=0.3, poll_interval=0.1)
    (tmp_path / "snapshots" / "m1" / "rev1.durable").write_text("an-earlier-boot")
    await wait_for_path(link, timeout=2, poll_interval=0.1)
