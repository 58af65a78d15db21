"""Tests for agent/transfer/fetch.py: making a model ready from a real S3 server (moto and rclone), byte for byte.

Faults come from the fault-injecting proxy in front of the server; crashes are real ``kill -9`` of a ``prefetch``
subprocess. Nothing of the project is patched.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import (
    InvalidUriError,
    ObjectChangedError,
    ObjectNotFoundError,
    OverlappingModelError,
    RetriesExhaustedError,
)
from agent.store.cache import Cache
from agent.transfer.parts import part_size_for, plan_parts
from tests.agent.conftest import (
    REPO,
    MiB,
    agent_cmd,
    agent_env,
    digest_of,
    fetch,
    leftover_downloads,
    make_settings,
    put_all,
    read_tree,
    staging_dirs,
    use_endpoint,
    walk_all,
)
from tests.fixtures.faultproxy import FaultPlan, FaultProxy
from tests.fixtures.s3servers import S3Server, fresh_bucket

#: One model that exercises the edges: nesting, empty and one-byte files, exactly one part and one part + 1 byte
#: (with 1 MiB parts), a file of several parts, unicode and spaces in names.
EDGE_MODEL: dict[str, bytes] = {
    "config.json": b'{"layers": 2}',
    "empty.txt": b"",
    "one.bin": b"\x01",
    "nested/deep/exactly-one-part.bin": os.urandom(MiB),
    "nested/one-part-plus-one.bin": os.urandom(MiB + 1),
    "several-parts.bin": os.urandom(3 * MiB + 5),
    "dir with space/ünïcødé ñame.txt": "grüße".encode(),
}


def mirrored(root: Path, bucket: str, key: str) -> Path:
    return root / "models" / "s3" / bucket / key


def assert_nothing_published(root: Path, bucket: str, key: str) -> None:
    path = mirrored(root, bucket, key)
    assert not os.path.lexists(path), f"{path} is visible"
    assert staging_dirs(root) == []


@pytest.fixture
def moto_bucket(moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A bucket on moto (which stores any key, even hostile ones) with this process's AWS env pointed at it."""
    use_endpoint(monkeypatch, moto_s3)
    name = f"wc-{uuid.uuid4().hex[:16]}"
    moto_s3.create_bucket(name)
    try:
        yield name
    finally:
        client = moto_s3.client()
        # One by one: moto's bulk delete cannot carry a control character in XML.
        for item in client.list_objects_v2(Bucket=name).get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
        client.delete_bucket(Bucket=name)


# ----- planning ----------------------------------------------------------------------------------------------


def test_parts_cover_the_file_exactly_once() -> None:
    for size in (0, 1, MiB, MiB + 1, 3 * MiB + 5):
        parts = plan_parts(size, MiB)
        assert sum(n for _, n in parts) == size
        assert all(parts[i][0] + parts[i][1] == parts[i + 1][0] for i in range(len(parts) - 1))


def test_part_size_grows_with_the_file_but_never_past_64_mib() -> None:
    assert part_size_for(MiB, min_part=MiB, concurrency=8) == MiB
    assert part_size_for(64 * MiB, min_part=MiB, concurrency=8) == 8 * MiB
    assert part_size_for(100 * 1024 * MiB, min_part=MiB, concurrency=8) == 64 * MiB


# ----- the mirror, on both servers ---------------------------------------------------------------------------


@pytest.fixture
def edge_model(s3_env: S3Server, bucket: str) -> str:
    put_all(s3_env, bucket, {f"m/{k}": v for k, v in EDGE_MODEL.items()}
            | {"mx/beside.bin": b"not part of m/", "m-other/x": b"nor this", "top.bin": b"t"})
    return f"s3://{bucket}/m/"


async def test_a_prefix_model_is_mirrored_byte_identical(edge_model: str, bucket: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "root")
    result = await fetch(settings, edge_model)
    path = mirrored(settings.cache_dir, bucket, "m")
    assert result.path == path and not result.hit
    assert read_tree(path) == EDGE_MODEL


async def test_objects_beside_the_prefix_are_not_part_of_the_model(
        edge_model: str, bucket: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "root")
    await fetch(settings, edge_model)
    assert set(read_tree(mirrored(settings.cache_dir, bucket, "m"))) == set(EDGE_MODEL)
    assert not mirrored(settings.cache_dir, bucket, "mx").exists()


async def test_the_manifest_records_the_chunked_xxh3_128_of_every_file(
        edge_model: str, bucket: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "root")
    result = await fetch(settings, edge_model)
    manifest = Cache(settings.cache_dir).read_manifest(result.model_id)
    assert manifest is not None
    assert {f.path: (f.size, f.xxh3_128) for f in manifest.files} == {
        p: (len(d), digest_of(d)) for p, d in EDGE_MODEL.items()}
    assert manifest.digest_scheme == "xxh3-128-chunked" and manifest.chunk_size == MiB
    assert manifest.total_bytes == result.total_bytes == sum(map(len, EDGE_MODEL.values()))


async def test_a_single_object_uri_is_published_as_a_file(s3_env: S3Server, bucket: str, tmp_path: Path) -> None:
    data = os.urandom(MiB + 1)
    put_all(s3_env, bucket, {"tok/sub/t ü.bin": data})
    settings = make_settings(tmp_path / "root")
    result = await fetch(settings, f"s3://{bucket}/tok/sub/t ü.bin")
    path = mirrored(settings.cache_dir, bucket, "tok/sub/t ü.bin")
    assert result.path == path
    assert path.is_file() and path.read_bytes() == data


async def test_a_ready_model_is_a_hit_that_downloads_nothing(edge_model: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "root")
    await fetch(settings, edge_model)
    again = await fetch(settings, edge_model)
    assert again.hit and again.downloaded_bytes == 0


async def test_the_first_fetch_counts_every_byte_once(edge_model: str, tmp_path: Path) -> None:
    result = await fetch(make_settings(tmp_path / "root"), edge_model)
    assert result.downloaded_bytes == sum(map(len, EDGE_MODEL.values()))


async def test_an_empty_prefix_is_not_found(s3_env: S3Server, bucket: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "root")
    with pytest.raises(ObjectNotFoundError, match="no objects under"):
        await fetch(settings, f"s3://{bucket}/nothing/")
    assert_nothing_published(settings.cache_dir, bucket, "nothing")


async def test_a_missing_object_is_not_found(s3_env: S3Server, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError):
        await fetch(make_settings(tmp_path / "root"), f"s3://{bucket}/missing.bin")


async def test_directory_markers_are_skipped(moto_s3: S3Server, moto_bucket: str, tmp_path: Path) -> None:
    # moto lists a console's "m/sub/" marker as S3 does; rclone stores it as a plain object "m/sub".
    put_all(moto_s3, moto_bucket, {"m/a.txt": b"a", "m/sub/": b""})
    settings = make_settings(tmp_path / "root")
    await fetch(settings, f"s3://{moto_bucket}/m/")
    assert read_tree(mirrored(settings.cache_dir, moto_bucket, "m")) == {"a.txt": b"a"}


async def test_a_key_that_is_both_a_file_and_a_directory_is_refused(
        moto_s3: S3Server, moto_bucket: str, tmp_path: Path) -> None:
    # Only moto can hold both (rclone serves a filesystem).
    put_all(moto_s3, moto_bucket, {"m/a": b"file", "m/a/b": b"under it"})
    settings = make_settings(tmp_path / "root")
    with pytest.raises(InvalidUriError, match="also an object"):
        await fetch(settings, f"s3://{moto_bucket}/m/")
    assert_nothing_published(settings.cache_dir, moto_bucket, "m")


# ----- revisions -------------------------------------------------------------------------------------------


@pytest.fixture
def two_file_model(s3_env: S3Server, bucket: str) -> dict[str, bytes]:
    files = {"big.bin": os.urandom(2 * MiB), "config.json": b'{"v": 1}'}
    put_all(s3_env, bucket, {f"m/{k}": v for k, v in files.items()})
    return files


async def test_a_changed_object_is_published_as_a_new_revision_beside_the_old(
        s3_env: S3Server, bucket: str, two_file_model: dict[str, bytes], tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "root")
    first = await fetch(settings, f"s3://{bucket}/m/")
    s3_env.put(bucket, "m/config.json", b'{"v": 2}')
    second = await fetch(settings, f"s3://{bucket}/m/")
    assert second.revision != first.revision
    snapshots = settings.cache_dir / "snapshots" / first.model_id
    builds = sorted(p.name.split(".")[0] for p in snapshots.iterdir() if p.is_dir())
    assert builds == sorted([first.revision, second.revision])
    assert read_tree(second.path) == {**two_file_model, "config.json": b'{"v": 2}'}


async def test_a_file_opened_before_a_new_revision_keeps_reading_the_old_bytes(
        s3_env: S3Server, bucket: str, two_file_model: dict[str, bytes], tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "root")
    first = await fetch(settings, f"s3://{bucket}/m/")
    with await asyncio.to_thread(open, first.path / "config.json", "rb") as old:
        s3_env.put(bucket, "m/config.json", b'{"v": 2, "bigger": true}')
        await fetch(settings, f"s3://{bucket}/m/")
        assert (first.path / "config.json").read_bytes() == b'{"v": 2, "bigger": true}'
        assert old.read() == b'{"v": 1}'


async def test_unchanged_files_are_not_downloaded_again_for_a_new_revision(
        s3_env: S3Server, bucket: str, two_file_model: dict[str, bytes], tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "root")
    await fetch(settings, f"s3://{bucket}/m/")
    s3_env.put(bucket, "m/config.json", b'{"v": 22}')
    second = await fetch(settings, f"s3://{bucket}/m/")
    assert second.downloaded_bytes == len(b'{"v": 22}')


# ----- overlapping URIs --------------------------------------------------------------------------------------


async def test_an_inner_uri_is_served_from_a_ready_outer_model(
        s3_env: S3Server, bucket: str, two_file_model: dict[str, bytes], tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "root")
    outer = await fetch(settings, f"s3://{bucket}/m/")
    inner = await fetch(settings, f"s3://{bucket}/m/config.json")
    assert inner.hit and inner.downloaded_bytes == 0
    assert inner.model_id == outer.model_id
    assert inner.path == mirrored(settings.cache_dir, bucket, "m/config.json")
    assert inner.path.read_bytes() == b'{"v": 1}'


async def test_an_outer_uri_after_a_ready_inner_one_is_refused(
        s3_env: S3Server, bucket: str, two_file_model: dict[str, bytes], tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "root")
    await fetch(settings, f"s3://{bucket}/m/config.json")
    with pytest.raises(OverlappingModelError, match="overlaps models already cached inside it") as info:
        await fetch(settings, f"s3://{bucket}/m/")
    assert info.value.reason == "OverlappingModel"
    assert mirrored(settings.cache_dir, bucket, "m/config.json").read_bytes() == b'{"v": 1}'


async def test_outer_and_inner_fetched_together_never_corrupt_each_other(
        s3_env: S3Server, bucket: str, two_file_model: dict[str, bytes], tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "root")
    outcomes = await asyncio.gather(fetch(settings, f"s3://{bucket}/m/"),
                                    fetch(settings, f"s3://{bucket}/m/config.json"), return_exceptions=True)
    for outcome in outcomes:  # whichever publishes second is served from the first, or refused cleanly
        assert not isinstance(outcome, BaseException) or isinstance(outcome, OverlappingModelError), outcome
    m = mirrored(settings.cache_dir, bucket, "m")
    if m.is_symlink():
        assert read_tree(m) == two_file_model
    assert mirrored(settings.cache_dir, bucket, "m/config.json").read_bytes() == b'{"v": 1}'


# ----- keys that would escape the root (moto stores them; rclone refuses them at PUT) ---------------------


@pytest.mark.parametrize("hostile", ["m/../escaped.txt", "m/./dot.txt", "m//empty-segment.txt", "m/a\x01b"])
async def test_a_listed_key_that_would_escape_the_root_refuses_the_model(
        moto_s3: S3Server, moto_bucket: str, hostile: str, tmp_path: Path) -> None:
    put_all(moto_s3, moto_bucket, {"m/fine.txt": b"fine", hostile: b"hostile"})
    assert hostile in [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=moto_bucket)["Contents"]]
    root = tmp_path / "root"
    with pytest.raises(InvalidUriError) as info:
        await fetch(make_settings(root), f"s3://{moto_bucket}/m/")
    assert repr(hostile) in str(info.value)
    assert_nothing_published(root, moto_bucket, "m")
    assert [p for p in walk_all(tmp_path) if not p.is_relative_to(root)] == []  # nothing beside the root
    assert not any(p.is_file() and p.read_bytes() == b"hostile" for p in walk_all(root))


async def test_an_absolute_key_in_a_whole_bucket_model_is_refused(
        moto_s3: S3Server, moto_bucket: str, tmp_path: Path) -> None:
    put_all(moto_s3, moto_bucket, {"ok.txt": b"ok", "/etc/evil": b"hostile"})
    root = tmp_path / "root"
    with pytest.raises(InvalidUriError, match="must not be absolute"):
        await fetch(make_settings(root), f"s3://{moto_bucket}/")
    assert not os.path.lexists(root / "models" / "s3" / moto_bucket)


# ----- a changing object -----------------------------------------------------------------------------------


async def test_an_object_overwritten_mid_download_is_never_published_mixed(
        s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = os.urandom(3 * MiB), os.urandom(3 * MiB)
    put_all(s3_server, bucket, {"m/w.bin": old})
    settings = make_settings(tmp_path / "root", concurrency=1, read_timeout=1.0)
    # The ranged GET stalls half-way; the object is overwritten meanwhile; the read times out, and the resumed
    # read of the second half must notice the new revision instead of appending its bytes to the old first half.
    with FaultProxy(s3_server, FaultPlan(always="stall", stall_seconds=5.0, max_faults=1)) as proxy:
        use_endpoint(monkeypatch, s3_server, proxy.url)
        task = asyncio.create_task(fetch(settings, f"s3://{bucket}/m/w.bin"))
        while not proxy.faults_injected:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(s3_server.put, bucket, "m/w.bin", new)
        try:
            result = await task
        except ObjectChangedError:
            assert_nothing_published(settings.cache_dir, bucket, "m/w.bin")
            return
    published = result.path.read_bytes()
    assert published in (old, new), "a mix of two revisions was published"
    assert published == new  # the old half was dropped, the new revision fetched whole


async def test_an_object_that_keeps_changing_fails_as_object_changed_and_publishes_nothing(
        s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_all(s3_server, bucket, {"m/w.bin": os.urandom(MiB + 1)})
    settings = make_settings(tmp_path / "root")
    with FaultProxy(s3_server, FaultPlan(always="wrong_etag")) as proxy:
        use_endpoint(monkeypatch, s3_server, proxy.url)
        with pytest.raises(ObjectChangedError) as info:
            await fetch(settings, f"s3://{bucket}/m/")
    assert info.value.reason == "ObjectChanged"
    assert_nothing_published(settings.cache_dir, bucket, "m")


# ----- transient and permanent faults ------------------------------------------------------------------------


@pytest.mark.parametrize("direct_io", [False, True], ids=["page-cache", "o-direct"])
async def test_transient_faults_are_survived_and_the_result_is_byte_identical(
        s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_io: bool) -> None:
    files = {f"m/shard-{i}.bin": os.urandom(2 * MiB + i) for i in range(8)} | {"m/config.json": b"{}"}
    put_all(s3_server, bucket, files)
    # Presigned GETs carry a fresh signature in their path, so the schedule differs run to run: fetch again into a
    # fresh cache until the plan has injected something (each round must come out byte-identical).
    with FaultProxy(s3_server, FaultPlan()) as proxy:  # 5% 503, 2% resets, 2% truncated bodies
        use_endpoint(monkeypatch, s3_server, proxy.url)
        for round_ in range(5):
            settings = make_settings(tmp_path / f"root{round_}", concurrency=4, direct_io=direct_io)
            result = await fetch(settings, f"s3://{bucket}/m/")
            assert read_tree(result.path) == {k[2:]: v for k, v in files.items()}
            if proxy.faults_injected:
                break
        assert proxy.faults_injected, "no fault injected in 5 rounds of ~25 ranged GETs"


@pytest.mark.parametrize("kind", ["slowdown_503", "reset_mid_body", "truncate"])
async def test_faults_that_never_stop_fail_after_the_retry_budget_and_publish_nothing(
        s3_server: S3Server, bucket: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_all(s3_server, bucket, {"m/a.bin": os.urandom(MiB + 1), "m/b.bin": b"small"})
    settings = make_settings(tmp_path / "root", max_attempts=3)
    with FaultProxy(s3_server, FaultPlan(always=kind)) as proxy:  # type: ignore[arg-type]
        use_endpoint(monkeypatch, s3_server, proxy.url)
        with pytest.raises(RetriesExhaustedError, match="gave up after 3 attempts") as info:
            await fetch(settings, f"s3://{bucket}/m/")
    assert info.value.reason == "RetriesExhausted"
    assert_nothing_published(settings.cache_dir, bucket, "m")
    assert [p for p in walk_all(settings.cache_dir / "models") if not p.is_dir()] == []


async def test_a_server_that_stalls_forever_fails_after_the_read_timeout_retries(
        rclone_s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"wc-{uuid.uuid4().hex[:16]}"
    rclone_s3.create_bucket(name)
    try:
        put_all(rclone_s3, name, {"m/a.bin": os.urandom(200_000)})
        settings = make_settings(tmp_path / "root", max_attempts=2, read_timeout=0.3)
        with FaultProxy(rclone_s3, FaultPlan(always="stall", stall_seconds=5)) as proxy:
            use_endpoint(monkeypatch, rclone_s3, proxy.url)
            with pytest.raises(RetriesExhaustedError, match="gave up after 2 attempts"):
                await fetch(settings, f"s3://{name}/m/")
        assert_nothing_published(settings.cache_dir, name, "m")
    finally:
        rclone_s3.delete_bucket(name)


# ----- crashes and concurrent processes (real `prefetch` subprocesses, rclone) --------------------------------


@pytest.fixture
def rclone_bucket(rclone_s3: S3Server) -> Iterator[str]:
    yield from fresh_bucket(rclone_s3)


def finished_parts(root: Path) -> tuple[int, int]:
    """Parts recorded as finished in the ``.parts`` records of downloads in progress, and their bytes.

    The bytes come from each record's header (``size=… part=…``): a file's last part is usually shorter. Each
    line is ``<index> <chunk digests>``.
    """
    count = nbytes = 0
    for record in (root / "tmp").glob("*.parts") if (root / "tmp").exists() else []:
        try:
            header, *lines = record.read_text().splitlines()
        except (FileNotFoundError, ValueError):
            continue
        fields = dict(kv.split("=", 1) for kv in header.split() if "=" in kv)
        size, part = int(fields["size"]), int(fields["part"])
        for line in lines:
            index = line.split(" ", 1)[0]
            if index.isdigit():
                count += 1
                nbytes += min(part, size - int(index) * part)
    return count, nbytes


@pytest.mark.parametrize("direct_io", ["false", "true"], ids=["page-cache", "o-direct"])
def test_a_download_killed_mid_way_resumes_and_fetches_only_what_was_unfinished(
        rclone_s3: S3Server, rclone_bucket: str, tmp_path: Path, direct_io: str) -> None:
    files = {f"m/shard-{i}.bin": os.urandom(24 * MiB) for i in range(3)}
    put_all(rclone_s3, rclone_bucket, files)
    total = sum(map(len, files.values()))
    root = tmp_path / "root"
    uri = f"s3://{rclone_bucket}/m/"
    # 8 GETs at once: 4 MiB parts, 6 per file, so finished parts stay on record while others are in flight.
    args = ("prefetch", uri, "--cache-dir", str(root), "--part-size", "1MiB", "--concurrency", "8",
            "--retry-base-delay", "0.01")
    # Some parts stall for a while, so the process is surely killed with parts finished and parts in flight.
    with FaultProxy(rclone_s3, FaultPlan(rates={"stall": 0.3}, stall_seconds=3.0)) as proxy:
        env = agent_env(rclone_s3, endpoint_url=proxy.url, WEIGHTCACHE_DIRECT_IO=direct_io)
        proc = subprocess.Popen(agent_cmd(*args), env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while finished_parts(root)[0] < 2:
                assert proc.poll() is None, proc.communicate()
                assert not os.path.lexists(mirrored(root, rclone_bucket, "m"))
                assert time.monotonic() < deadline, "no part finished within 60 s"
                time.sleep(0.02)
            proc.kill()
            proc.wait()
            _, recorded_bytes = finished_parts(root)  # SIGKILL: no cleanup of any kind
        finally:
            proc.kill()
            proc.communicate()
        assert not os.path.lexists(mirrored(root, rclone_bucket, "m")), "killed before it could publish"

    # A fresh proxy counts the second run: the first one may still be answering the killed process's requests
    # (it notices the dead connections only when its loop next runs) and counting their chunks.
    with FaultProxy(rclone_s3, FaultPlan.none()) as proxy:
        env = agent_env(rclone_s3, endpoint_url=proxy.url, WEIGHTCACHE_DIRECT_IO=direct_io)
        done = subprocess.run(agent_cmd(*args), check=False, env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        refetched = proxy.body_bytes_forwarded
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(mirrored(root, rclone_bucket, "m"))
    assert read_tree(mirrored(root, rclone_bucket, "m")) == {k[2:]: v for k, v in files.items()}
    assert refetched < total
    assert refetched <= total - recorded_bytes + 64 * 1024  # (+ the listing's XML)
    assert leftover_downloads(root) == [] and staging_dirs(root) == []


def test_two_processes_prefetching_the_same_model_download_it_once(
        rclone_s3: S3Server, rclone_bucket: str, tmp_path: Path) -> None:
    files = {f"m/shard-{i}.bin": os.urandom(4 * MiB) for i in range(2)}
    put_all(rclone_s3, rclone_bucket, files)
    total = sum(map(len, files.values()))
    root = tmp_path / "root"
    args = ("prefetch", f"s3://{rclone_bucket}/m/", "--cache-dir", str(root), "--part-size", "1MiB",
            "--concurrency", "2")
    with FaultProxy(rclone_s3, FaultPlan.none()) as proxy:
        env = agent_env(rclone_s3, endpoint_url=proxy.url)
        procs = [subprocess.Popen(agent_cmd(*args), env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=120) for p in procs]
        fetched = proxy.body_bytes_forwarded
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all(out.strip() == str(mirrored(root, rclone_bucket, "m")) for out, _ in outputs)
    assert total <= fetched < total + 64 * 1024  # each byte once (+ listings' XML)
    assert read_tree(mirrored(root, rclone_bucket, "m")) == {k[2:]: v for k, v in files.items()}
