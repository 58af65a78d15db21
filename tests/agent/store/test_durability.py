"""Durable without stalling: a model is served as soon as it is verified, flushed afterwards, and after a reboot
(a new boot id) nothing that was not known to be on disk is served before its bytes are checked again.

The reboot is simulated with the ``WEIGHTCACHE_BOOT_ID`` override; "bytes that never reached the disk" with
zeroed data, which is what a file whose writes were lost in a power cut reads as.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.store import layout
from agent.store.cache import Cache
from agent.store.maintenance import flush_build, recover
from agent.store.manifest import Manifest
from agent.uris import parse_model_uri
from tests.agent.conftest import MiB, build_model, fetch, make_settings, put_all, read_tree
from tests.fixtures.s3servers import S3Server

URI = "s3://bkt/m/"
FILES = {"w.bin": os.urandom(3 * MiB + 5), "config.json": b'{"v": 1}'}


def reboot(monkeypatch: pytest.MonkeyPatch, boot: str, *, processes: tuple[Cache, ...] = ()) -> None:
    """A new boot id; the processes of the old boot are gone (their locks with them)."""
    for c in processes:
        c.close()
    monkeypatch.setenv(layout.BOOT_ID_ENV, boot)


def zero_out(path: Path) -> None:
    """What a file whose page-cache writes never reached the disk reads as after the power comes back."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(b"\0" * size)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cache:
    reboot(monkeypatch, "boot-1")
    c = Cache(tmp_path / "root", fsync=True)
    c.ensure_layout()
    recover(c, orphan_max_age_seconds=3600)  # the node's first start in boot-1
    return c


def published(cache: Cache) -> Manifest:
    return build_model(cache, URI, FILES)


def test_a_model_is_served_as_soon_as_it_is_verified_before_any_flush(cache: Cache) -> None:
    m = published(cache)
    assert not layout.durable_marker(cache.root / m.snapshot).exists()
    assert cache.lookup(parse_model_uri(URI)) is not None


def test_a_flushed_build_is_marked_durable_with_the_boot_that_flushed_it(cache: Cache) -> None:
    m = published(cache)
    assert flush_build(cache, cache.root / m.snapshot)
    assert layout.durable_marker(cache.root / m.snapshot).read_text() == "boot-1"


def test_after_a_reboot_zeroed_bytes_that_were_never_flushed_are_never_served(
        cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    m = published(cache)
    zero_out(cache.root / m.snapshot / "data/w.bin")
    reboot(monkeypatch, "boot-2", processes=(cache,))
    assert cache.lookup(parse_model_uri(URI)) is None, "not trusted before recovery either"
    stats = recover(Cache(cache.root), orphan_max_age_seconds=3600)
    assert stats["unverified_dropped"] == 1
    assert not os.path.lexists(cache.root / m.path)
    assert not cache.blob_path(m.files[-1].xxh3_128).exists(), "no later build may reuse the zeroed blob"
    assert cache.source_index() == {}


def test_after_a_reboot_intact_unflushed_bytes_are_verified_and_served_again(
        cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    m = published(cache)
    reboot(monkeypatch, "boot-2", processes=(cache,))
    stats = recover(Cache(cache.root), orphan_max_age_seconds=3600)
    assert stats["reverified"] == 1
    assert layout.durable_marker(cache.root / m.snapshot).exists()
    found = cache.lookup(parse_model_uri(URI))
    assert found is not None and read_tree(found.path) == FILES


def test_a_build_known_durable_is_trusted_after_a_reboot_without_reading_it_again(
        cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    m = published(cache)
    flush_build(cache, cache.root / m.snapshot)
    reboot(monkeypatch, "boot-2", processes=(cache,))
    assert cache.lookup(parse_model_uri(URI)) is not None
    assert recover(Cache(cache.root), orphan_max_age_seconds=3600)["reverified"] == 0


def test_the_node_server_side_check_agrees_with_the_agent(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    m = published(cache)
    assert layout.is_servable(cache.root / m.path)
    reboot(monkeypatch, "boot-2")
    assert not layout.is_servable(cache.root / m.path)


async def test_resume_records_of_an_earlier_boot_are_discarded_and_zeros_never_verified(
        s3_env: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A crash left a record claiming every part of w.bin done, but the power cut lost the bytes: the temp file
    # is zeros. Trusting the record would hash the zeros and record them as verified.
    data = os.urandom(4 * MiB)
    put_all(s3_env, bucket, {"m/w.bin": data})
    settings = make_settings(tmp_path / "root", concurrency=2)
    reboot(monkeypatch, "boot-1")
    cache = Cache(settings.cache_dir)
    cache.ensure_layout()
    from agent.transfer.fetch import Fetcher
    from agent.transfer.s3 import S3Client

    async with S3Client(settings) as s3:
        listing = await Fetcher(settings, cache, s3).list_model(parse_model_uri(f"s3://{bucket}/m/"))
    f = listing.files[0]
    from agent.store.manifest import source_id
    from agent.transfer.parts import part_size_for, plan_parts

    part = part_size_for(f.size, min_part=settings.min_part_size, concurrency=settings.concurrency)
    tmp = cache.tmp_download_path(source_id(bucket, f.key, f.etag, f.size))
    tmp.write_bytes(b"\0" * f.size)
    zeros = [os.urandom(16).hex()]  # any digests: the point is that they are never believed
    lines = [f"weightcache-parts v2 size={f.size} part={part} chunk={layout.CHUNK_SIZE} boot=boot-1"]
    lines += [f"{i} {','.join(zeros)}" for i in range(len(plan_parts(f.size, part)))]
    tmp.with_suffix(".parts").write_text("\n".join(lines) + "\n")
    reboot(monkeypatch, "boot-2")
    result = await fetch(settings, f"s3://{bucket}/m/")
    assert read_tree(result.path) == {"w.bin": data}
    assert result.downloaded_bytes == len(data)
