"""Tests for agent/store/cache.py, agent/store/publish.py and agent/store/maintenance.py: the on-disk layout, immutable builds,
the pointer swap as the one commit point, overlap rules, locks, grace, durability and start-up recovery.

No network: models are built through the same calls the fetcher makes (Build: create, adopt, publish).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
import xxhash

from agent.errors import OverlappingModelError
from agent.store import layout
from agent.store.cache import Cache
from agent.store.layout import hash_file
from agent.store.manifest import ManifestFile, PlannedFile, compute_revision
from agent.store.publish import Build, journal_append, journal_read
from agent.uris import parse_model_uri
from tests.agent.conftest import build_model as build
from tests.agent.conftest import digest_of


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    c = Cache(tmp_path / "root", fsync=False)
    c.ensure_layout()
    return c


def test_published_prefix_model_is_a_relative_symlink_to_its_snapshot(cache: Cache) -> None:
    m = build(cache, "s3://bkt/m/", {"a.txt": b"A", "d/b.bin": b"BB"})
    pointer = cache.root / "models/s3/bkt/m"
    assert pointer.is_symlink()
    assert not os.path.isabs(os.readlink(pointer))
    assert Path(os.path.realpath(pointer)) == cache.root / m.snapshot / "data"
    assert (pointer / "d/b.bin").read_bytes() == b"BB"


def test_published_object_model_is_a_file_at_its_key(cache: Cache) -> None:
    build(cache, "s3://bkt/tok/t.json", {"t.json": b"{}"})
    pointer = cache.root / "models/s3/bkt/tok/t.json"
    assert pointer.is_symlink() and pointer.is_file()
    assert pointer.read_bytes() == b"{}"


def test_the_published_tree_resolves_inside_a_copy_of_the_root_mounted_elsewhere(cache: Cache, tmp_path: Path) -> None:
    build(cache, "s3://bkt/m/", {"a.txt": b"A"})
    moved = tmp_path / "mounted-elsewhere"
    cache.root.rename(moved)
    assert (moved / "models/s3/bkt/m/a.txt").read_bytes() == b"A"


def test_nothing_is_visible_at_the_mirrored_path_before_publish(cache: Cache) -> None:
    model = parse_model_uri("s3://bkt/m/")
    b = Build(cache, model.model_id, "rev1")
    b.create()
    (b.data / "a.txt").write_bytes(b"A")
    assert not cache.mirrored_path(model).exists()
    assert not os.path.lexists(cache.mirrored_path(model))
    assert cache.lookup(model) is None


def test_manifest_records_size_and_xxh3_128_of_every_file(cache: Cache) -> None:
    files = {"a.txt": b"A", "empty": b"", "d/b.bin": os.urandom(5000)}
    m = build(cache, "s3://bkt/m/", files)
    on_disk = json.loads((cache.root / m.snapshot / "manifest.json").read_text())
    recorded = {f["path"]: (f["size"], f["xxh3_128"]) for f in on_disk["files"]}
    assert recorded == {p: (len(d), digest_of(d)) for p, d in files.items()}
    assert on_disk["version"] == 2 and on_disk["digest_scheme"] == "xxh3-128-chunked"
    assert on_disk["boot_id"] == layout.current_boot_id() and "last_used" not in on_disk
    assert on_disk["total_bytes"] == sum(len(d) for d in files.values())
    assert on_disk["uri"] == "s3://bkt/m/"


def test_files_are_read_only_hardlinks_of_content_addressed_blobs(cache: Cache) -> None:
    build(cache, "s3://bkt/m/", {"a.bin": b"same", "b.bin": b"same"})
    blob = cache.blob_path(digest_of(b"same"))
    assert blob.stat().st_nlink == 3  # the blob and two snapshot names
    assert blob.stat().st_mode & 0o222 == 0
    assert len(list(cache.blobs.iterdir())) == 1


def test_identical_files_of_two_models_share_one_blob(cache: Cache) -> None:
    build(cache, "s3://bkt/m1/", {"w.bin": b"weights"})
    build(cache, "s3://bkt/m2/", {"w.bin": b"weights"})
    assert cache.blob_bytes() == len(b"weights")


def test_a_new_revision_is_published_beside_the_old_one(cache: Cache) -> None:
    old = build(cache, "s3://bkt/m/", {"a.txt": b"old"}, etag="e1")
    new = build(cache, "s3://bkt/m/", {"a.txt": b"new"}, etag="e2")
    assert old.revision != new.revision
    assert (cache.root / old.snapshot / "data/a.txt").read_bytes() == b"old"
    assert (cache.root / "models/s3/bkt/m/a.txt").read_bytes() == b"new"


def test_a_reader_that_opened_the_old_revision_keeps_its_bytes(cache: Cache) -> None:
    build(cache, "s3://bkt/m/", {"a.txt": b"old bytes"}, etag="e1")
    with open(cache.root / "models/s3/bkt/m/a.txt", "rb") as f:
        build(cache, "s3://bkt/m/", {"a.txt": b"NEW BYTES"}, etag="e2")
        assert f.read() == b"old bytes"


def test_an_inner_uri_is_served_from_a_ready_outer_model(cache: Cache) -> None:
    outer = build(cache, "s3://bkt/m/", {"config.json": b"{}", "sub/x.bin": b"x"})
    for uri, expect_dir in (("s3://bkt/m/config.json", False), ("s3://bkt/m/sub/", True)):
        found = cache.lookup(parse_model_uri(uri))
        assert found is not None and found.via_outer
        assert found.manifest.model_id == outer.model_id
        assert found.path.is_dir() == expect_dir


def test_an_inner_uri_the_outer_model_lacks_is_refused(cache: Cache) -> None:
    build(cache, "s3://bkt/m/", {"config.json": b"{}"})
    with pytest.raises(OverlappingModelError, match="lies inside the cached model s3://bkt/m/"):
        cache.lookup(parse_model_uri("s3://bkt/m/missing.json"))


def test_an_outer_model_over_ready_inner_models_is_refused(cache: Cache) -> None:
    build(cache, "s3://bkt/m/config.json", {"config.json": b"{}"})
    with pytest.raises(OverlappingModelError, match="overlaps models already cached inside it"):
        cache.check_overlap(parse_model_uri("s3://bkt/m/"))


def test_publishing_an_inner_model_never_writes_into_an_outer_one(cache: Cache) -> None:
    # An inner model that finished downloading after its outer model was published must not publish
    # through the outer model's pointer (that would replace a file of the outer snapshot with a link).
    inner = parse_model_uri("s3://bkt/m/config.json")
    planned = [PlannedFile(relpath="config.json", key="m/config.json", size=2, etag="e1")]
    revision = compute_revision(planned)
    b = Build(cache, inner.model_id, revision)
    b.create()
    tmp = cache.tmp_download_path("inner")
    tmp.write_bytes(b"{}")
    digest = digest_of(b"{}")
    b.adopt_file(tmp, digest=digest, size=2, relpath="config.json")
    outer = build(cache, "s3://bkt/m/", {"config.json": b"{}", "w.bin": b"weights"})

    with pytest.raises(OverlappingModelError, match="published meanwhile"):
        b.publish(uri=inner, files=[ManifestFile("config.json", 2, digest, "m/config.json", "e1")],
                  fetch_seconds=0)
    snap = cache.root / outer.snapshot / "data"
    assert not (snap / "config.json").is_symlink()
    assert (cache.root / "models/s3/bkt/m/config.json").read_bytes() == b"{}"
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "w.bin"]
    assert cache.read_manifest(inner.model_id) is None
    assert cache.builds(inner.model_id) == [], "a build that could not be made live is gone"


def test_removing_a_model_deletes_its_pointer_manifest_snapshots_and_unshared_blobs(cache: Cache) -> None:
    m = build(cache, "s3://bkt/m1/", {"own.bin": b"only mine", "shared.bin": b"shared"})
    build(cache, "s3://bkt/m2/", {"shared.bin": b"shared"})
    freed = cache.remove_model(m.model_id)
    assert freed == len(b"only mine")
    assert not os.path.lexists(cache.root / "models/s3/bkt/m1")
    assert cache.read_manifest(m.model_id) is None
    assert not (cache.snapshots / m.model_id).exists()
    assert (cache.root / "models/s3/bkt/m2/shared.bin").read_bytes() == b"shared"


def test_replaced_revisions_are_removed_only_after_the_grace_period(cache: Cache) -> None:
    old = build(cache, "s3://bkt/m/", {"a.txt": b"old"}, etag="e1")
    build(cache, "s3://bkt/m/", {"a.txt": b"new"}, etag="e2")
    assert cache.remove_old_revisions(min_age_seconds=3600) == 0
    assert (cache.root / old.snapshot).exists()
    assert cache.remove_old_revisions(min_age_seconds=0) == 1
    assert not (cache.root / old.snapshot).exists()
    assert (cache.root / "models/s3/bkt/m/a.txt").read_bytes() == b"new"


async def test_old_revision_cleanup_leaves_the_model_directory_of_a_fetch_in_progress(cache: Cache) -> None:
    # A fetch (holding the model's lock) has created snapshots/<model-id>/ and is about to create its staging
    # tree inside; another model's make_room (or maintenance) cleaning up now must not rmdir it under the fetch.
    model_dir = cache.snapshots / "deadbeefdeadbeef"
    async with cache.model_lock("deadbeefdeadbeef"):
        model_dir.mkdir()
        cache.remove_old_revisions(min_age_seconds=0)
        assert model_dir.is_dir()
        b = Build(cache, "deadbeefdeadbeef", "rev1")
        b.create()
        b.discard()
    cache.remove_old_revisions(min_age_seconds=0)
    assert not model_dir.exists(), "an empty directory no fetch holds is still removed"


def test_blobs_no_snapshot_uses_are_swept_once_old_enough(cache: Cache) -> None:
    m = build(cache, "s3://bkt/m/", {"a.txt": b"kept"})
    orphan = cache.blob_path("0" * 32)
    orphan.write_bytes(b"orphan")
    assert cache.sweep_orphan_blobs(min_age_seconds=3600) == 0
    assert cache.sweep_orphan_blobs(min_age_seconds=0) == len(b"orphan")
    assert not orphan.exists()
    assert cache.blob_path(m.files[0].xxh3_128).exists()


def test_used_bytes_counts_each_blob_once(cache: Cache) -> None:
    build(cache, "s3://bkt/m/", {"a": b"x" * 1000, "b": b"x" * 1000, "c": b"y" * 10})
    assert cache.used_bytes() == 1010


def test_pins_written_by_one_process_are_read_by_another(cache: Cache) -> None:
    cache.write_pins(["abc", "def", "abc"])
    assert Cache(cache.root).read_pins() == {"abc", "def"}


def test_missing_or_garbled_pins_mean_nothing_is_pinned(cache: Cache) -> None:
    assert cache.read_pins() == set()
    (cache.state / "pins.json").write_text("{not json")
    assert cache.read_pins() == set()


def test_the_journal_ignores_a_torn_last_line(cache: Cache) -> None:
    entry = ManifestFile("a.bin", 3, "f" * 32, "m/a.bin", "e1")
    journal_append(cache, "mid", "rev", entry)
    with open(cache.journal_path("mid", "rev"), "a") as f:
        f.write('{"path": "b.bin", "si')
    assert journal_read(cache, "mid", "rev") == {"a.bin": entry}


def test_the_journal_of_an_earlier_boot_is_not_trusted(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    journal_append(cache, "mid", "rev", ManifestFile("a.bin", 3, "f" * 32, "m/a.bin", "e1"))
    monkeypatch.setenv("WEIGHTCACHE_BOOT_ID", "another-boot")
    assert journal_read(cache, "mid", "rev") == {}


@pytest.mark.parametrize("size", [0, 1, 1024 * 1024 - 1, 1024 * 1024, 3 * 1024 * 1024 + 17])
def test_the_file_digest_is_xxh3_128_over_the_xxh3_128_of_each_mib(tmp_path: Path, size: int) -> None:
    p = tmp_path / "f"
    data = os.urandom(size)
    p.write_bytes(data)
    chunks = [xxhash.xxh3_128_digest(data[i:i + 1024 * 1024]) for i in range(0, size, 1024 * 1024)]
    assert hash_file(p) == xxhash.xxh3_128_hexdigest(b"".join(chunks))
    assert hash_file(p, scheme="xxh3-128") == xxhash.xxh3_128_hexdigest(data)


def test_the_chunked_hasher_gives_the_same_digest_however_the_bytes_are_split() -> None:
    data = os.urandom(2 * 1024 * 1024 + 5)
    whole = layout.ChunkedHasher()
    whole.update(data)
    pieces = layout.ChunkedHasher()
    for i in range(0, len(data), 300_001):
        pieces.update(memoryview(data)[i:i + 300_001])
    assert layout.combine_chunk_digests(whole.finish()) == layout.combine_chunk_digests(pieces.finish())


def test_the_revision_changes_with_any_name_size_or_etag() -> None:
    base = [PlannedFile("a", "m/a", 1, "e")]
    rev = compute_revision(base)
    assert compute_revision([PlannedFile("b", "m/b", 1, "e")]) != rev
    assert compute_revision([PlannedFile("a", "m/a", 2, "e")]) != rev
    assert compute_revision([PlannedFile("a", "m/a", 1, "f")]) != rev
    assert compute_revision(list(reversed(base + [PlannedFile("z", "m/z", 0, "e")]))) == \
        compute_revision(base + [PlannedFile("z", "m/z", 0, "e")])


async def test_the_model_lock_excludes_a_second_holder(cache: Cache) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with cache.model_lock("mid"):
            entered.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await entered.wait()
    assert cache.is_locked("mid")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            async with cache.model_lock("mid", poll=0.01):
                pass
    release.set()
    await task
    assert not cache.is_locked("mid")


# ----- recovery ---------------------------------------------------------------------------------------


def test_recovery_removes_a_leftover_staging_directory(cache: Cache) -> None:
    b = Build(cache, "deadbeefdeadbeef", "rev1")
    b.create()
    (b.data / "half.bin").write_bytes(b"half")
    stats = Cache(cache.root).recover(orphan_max_age_seconds=3600)
    assert stats["staging_dirs"] == 1
    assert not b.staging.exists()


def test_recovery_keeps_what_another_working_process_builds(cache: Cache) -> None:
    worker = Cache(cache.root)
    worker.join_activity()  # as every fetch does before it builds
    b = Build(worker, "deadbeefdeadbeef", "rev1")
    b.create()
    (cache.tmp / "junk-dir").mkdir()
    stats = Cache(cache.root).recover(orphan_max_age_seconds=0)
    assert b.staging.exists() and (cache.tmp / "junk-dir").exists()
    assert not any(stats.values())
    worker.close()
    Cache(cache.root).recover(orphan_max_age_seconds=3600)
    assert not b.staging.exists() and not (cache.tmp / "junk-dir").exists()


def test_recovery_removes_a_dangling_pointer(cache: Cache) -> None:
    pointer = cache.models / "s3/bkt/gone"
    pointer.parent.mkdir(parents=True)
    os.symlink("../../../snapshots/nothing/rev", pointer)
    stats = cache.recover(orphan_max_age_seconds=3600)
    assert stats["dangling_pointers"] == 1
    assert not os.path.lexists(pointer)


def test_a_build_whose_manifest_is_gone_is_not_served(cache: Cache) -> None:
    m = build(cache, "s3://bkt/m/", {"a.txt": b"A"})
    (cache.root / m.snapshot / "manifest.json").unlink()
    assert cache.lookup(parse_model_uri("s3://bkt/m/")) is None


def test_recovery_removes_a_stray_temporary_link(cache: Cache) -> None:
    stray = cache.models / "s3/bkt/.m.0123.link"
    stray.parent.mkdir(parents=True)
    os.symlink("nowhere", stray)
    assert cache.recover(orphan_max_age_seconds=3600)["stray_links"] == 1
    assert not os.path.lexists(stray)


def test_recovery_keeps_recent_partial_downloads_for_resume(cache: Cache) -> None:
    tmp = cache.tmp_download_path("abc")
    tmp.write_bytes(b"partial")
    record = tmp.with_suffix(".parts")
    record.write_text(f"weightcache-parts v2 size=7 part=1048576 boot={layout.current_boot_id()}\n")
    cache.recover(orphan_max_age_seconds=3600)
    assert tmp.exists() and record.exists()


def test_recovery_deletes_partial_downloads_older_than_the_age_limit(cache: Cache) -> None:
    tmp = cache.tmp_download_path("abc")
    tmp.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(tmp, (old, old))
    assert cache.recover(orphan_max_age_seconds=3600)["stale_tmp"] == 1
    assert not tmp.exists()


def test_recovery_drops_a_download_killed_after_it_became_a_blob(cache: Cache) -> None:
    # Killed between linking the verified download into blobs/ and removing its temp name: one inode, two names.
    tmp = cache.tmp_download_path("abc")
    tmp.write_bytes(b"verified bytes")
    record = tmp.with_suffix(".parts")
    record.write_text(f"weightcache-parts v2 size=14 part=1048576 boot={layout.current_boot_id()}\n")
    blob = cache.blob_path(digest_of(b"verified bytes"))
    os.link(tmp, blob)
    assert cache.used_bytes() == 14 + record.stat().st_blocks * 512  # the inode is charged once, as the blob
    cache.recover(orphan_max_age_seconds=3600)
    assert not tmp.exists() and not record.exists()
    cache.sweep_orphan_blobs(min_age_seconds=0)  # nothing links it now: an orphan like any other
    assert not blob.exists() and cache.used_bytes() == 0


def test_recovery_leaves_a_ready_model_untouched(cache: Cache) -> None:
    build(cache, "s3://bkt/m/", {"a.txt": b"A"})
    cache.recover(orphan_max_age_seconds=3600)  # the first recovery of a boot records the boot
    assert not any(cache.recover(orphan_max_age_seconds=3600).values())
    assert (cache.root / "models/s3/bkt/m/a.txt").read_bytes() == b"A"


def test_a_version_1_cache_is_rehashed_into_a_version_2_build_at_start_up(tmp_path: Path) -> None:
    # The previous layout: manifests/<id>.json (whole-file xxh3-128) and a snapshot of plain files.
    root = tmp_path / "old"
    uri = parse_model_uri("s3://bkt/m/")
    data = os.urandom(3 * 1024 * 1024 + 1)
    snap = root / "snapshots" / uri.model_id / "rev1"
    snap.mkdir(parents=True)
    (snap / "a.bin").write_bytes(data)
    (root / "manifests").mkdir()
    (root / "manifests" / f"{uri.model_id}.json").write_text(json.dumps({
        "version": 1, "uri": uri.uri, "kind": "prefix", "model_id": uri.model_id, "revision": "rev1",
        "snapshot": f"snapshots/{uri.model_id}/rev1", "path": uri.mirrored_relpath, "total_bytes": len(data),
        "files": [{"path": "a.bin", "size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data), "key": "m/a.bin",
                   "etag": "e"}], "fetched_at": "2024-01-01T00:00:00Z", "last_used": "2024-01-01T00:00:00Z"}))
    pointer = root / uri.mirrored_relpath
    pointer.parent.mkdir(parents=True)
    os.symlink(os.path.relpath(snap, pointer.parent), pointer)
    cache = Cache(root)
    assert cache.recover(orphan_max_age_seconds=3600)["migrated"] == 1
    found = cache.lookup(uri)
    assert found is not None and found.manifest.version == 2
    assert found.manifest.files[0].xxh3_128 == digest_of(data)
    assert (pointer / "a.bin").read_bytes() == data
    assert not (root / "manifests" / f"{uri.model_id}.json").exists() and not snap.exists()


def test_recovery_never_deletes_what_its_own_process_builds(cache: Cache) -> None:
    # flock belongs to the descriptor: a Cache already at work would otherwise "win" the exclusive lock over itself.
    cache.join_activity()
    b = Build(cache, "deadbeefdeadbeef", "rev1")
    b.create()
    assert not any(cache.recover(orphan_max_age_seconds=0).values())
    assert b.staging.exists()
    cache.close()
