"""Tests for agent/store/eviction.py: LRU within the byte budget, pins honoured, plans before deletes.

The first tests build models through the Cache API (no network); the last ones fill a cache from a real S3 server
through the fetcher, as `prefetch` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import BudgetExceededError
from agent.store.cache import Cache
from agent.store.eviction import execute_plan, make_room, plan_eviction
from agent.store.manifest import Manifest
from agent.uris import parse_model_uri
from tests.agent.conftest import (
    MiB,
    blob_files,
    build_model,
    fetch,
    leftover_downloads,
    make_settings,
    put_all,
    staging_dirs,
)
from tests.fixtures.s3servers import S3Server


def used_at(cache: Cache, m: Manifest, when: str) -> None:
    """Record a last use at a chosen time, so LRU order does not depend on the clock."""
    (cache.state / "used" / m.model_id).write_text(when)


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    c = Cache(tmp_path / "root", fsync=False)
    c.ensure_layout()
    return c


@pytest.fixture
def three_models(cache: Cache) -> list[Manifest]:
    """Three 1000-byte models used oldest (m0) to newest (m2)."""
    out = []
    for i in range(3):
        m = build_model(cache, f"s3://bkt/m{i}/", {"w.bin": bytes([i]) * 1000})
        used_at(cache, m, f"2024-01-0{i + 1}T00:00:00.000+00:00")
        out.append(m)
    return out


def ready(cache: Cache, uri: str) -> bool:
    return cache.lookup(parse_model_uri(uri)) is not None


def test_nothing_is_planned_while_the_cache_is_within_its_budget(cache: Cache, three_models: list[Manifest]) -> None:
    plan = plan_eviction(cache, need_bytes=500, max_bytes=10_000, min_free_bytes=0, pinned=set())
    assert plan.deficit_bytes == 0 and plan.items == ()


def test_the_least_recently_used_model_is_planned_first(cache: Cache, three_models: list[Manifest]) -> None:
    plan = plan_eviction(cache, need_bytes=1000, max_bytes=3000, min_free_bytes=0, pinned=set())
    assert [i.uri for i in plan.items] == ["s3://bkt/m0/"]
    assert plan.bytes_freed == 1000 and plan.shortfall == 0


def test_a_pinned_model_is_skipped_by_the_plan(cache: Cache, three_models: list[Manifest]) -> None:
    plan = plan_eviction(cache, need_bytes=1000, max_bytes=3000, min_free_bytes=0,
                         pinned={three_models[0].model_id})
    assert [i.uri for i in plan.items] == ["s3://bkt/m1/"]
    assert plan.skipped_pinned == ("s3://bkt/m0/",)


async def test_a_model_being_fetched_is_skipped_by_the_plan(cache: Cache, three_models: list[Manifest]) -> None:
    async with cache.model_lock(three_models[0].model_id):
        plan = plan_eviction(cache, need_bytes=1000, max_bytes=3000, min_free_bytes=0, pinned=set())
    assert [i.uri for i in plan.items] == ["s3://bkt/m1/"]


def test_blobs_shared_with_another_model_do_not_count_as_freed(cache: Cache) -> None:
    a = build_model(cache, "s3://bkt/a/", {"shared.bin": b"s" * 1000, "own.bin": b"o" * 10})
    b = build_model(cache, "s3://bkt/b/", {"shared.bin": b"s" * 1000})
    used_at(cache, a, "2024-01-01T00:00:00.000+00:00")
    used_at(cache, b, "2024-01-02T00:00:00.000+00:00")
    plan = plan_eviction(cache, need_bytes=5, max_bytes=1010, min_free_bytes=0, pinned=set())
    assert plan.items[0].uri == "s3://bkt/a/" and plan.items[0].bytes_freed == 10


def test_the_plan_description_names_what_goes_and_why(cache: Cache, three_models: list[Manifest]) -> None:
    plan = plan_eviction(cache, need_bytes=1000, max_bytes=3000, min_free_bytes=0, pinned=set())
    text = plan.describe()
    assert "s3://bkt/m0/" in text and "need" in text and "evict" in text


def test_make_room_evicts_least_recently_used_models_down_to_the_budget(
        cache: Cache, three_models: list[Manifest], tmp_path: Path) -> None:
    settings = make_settings(cache.root, max_bytes=3000)
    plan = make_room(cache, need_bytes=2000, settings=settings, pinned=set())
    assert [i.uri for i in plan.items] == ["s3://bkt/m0/", "s3://bkt/m1/"]
    assert not ready(cache, "s3://bkt/m0/") and not ready(cache, "s3://bkt/m1/")
    assert ready(cache, "s3://bkt/m2/")
    assert cache.used_bytes() == 1000


def test_make_room_honours_pins_written_to_the_cache(cache: Cache, three_models: list[Manifest]) -> None:
    cache.write_pins([three_models[0].model_id])
    make_room(cache, need_bytes=1000, settings=make_settings(cache.root, max_bytes=3000), pinned=set())
    assert ready(cache, "s3://bkt/m0/")
    assert not ready(cache, "s3://bkt/m1/")


def test_a_need_larger_than_the_whole_budget_fails_and_evicts_nothing(
        cache: Cache, three_models: list[Manifest]) -> None:
    with pytest.raises(BudgetExceededError, match="more than the whole cache budget"):
        make_room(cache, need_bytes=5000, settings=make_settings(cache.root, max_bytes=4000), pinned=set())
    assert all(ready(cache, f"s3://bkt/m{i}/") for i in range(3))


def test_when_everything_is_pinned_make_room_fails_and_evicts_nothing(
        cache: Cache, three_models: list[Manifest]) -> None:
    with pytest.raises(BudgetExceededError, match="still short by"):
        make_room(cache, need_bytes=1000, settings=make_settings(cache.root, max_bytes=3000),
                  pinned={m.model_id for m in three_models})
    assert all(ready(cache, f"s3://bkt/m{i}/") for i in range(3))


def test_executing_a_plan_skips_a_model_pinned_since_it_was_made(
        cache: Cache, three_models: list[Manifest]) -> None:
    plan = plan_eviction(cache, need_bytes=1000, max_bytes=3000, min_free_bytes=0, pinned=set())
    cache.write_pins([three_models[0].model_id])
    assert execute_plan(cache, plan) == 0
    assert ready(cache, "s3://bkt/m0/")


async def test_executing_a_plan_skips_a_model_whose_fetch_started_since(
        cache: Cache, three_models: list[Manifest]) -> None:
    plan = plan_eviction(cache, need_bytes=1000, max_bytes=3000, min_free_bytes=0, pinned=set())
    async with cache.model_lock(three_models[0].model_id):
        assert execute_plan(cache, plan) == 0
    assert ready(cache, "s3://bkt/m0/")


def test_eviction_removes_the_pointer_and_leaves_no_empty_directories(cache: Cache) -> None:
    m = build_model(cache, "s3://bkt/deep/er/m/", {"w.bin": b"w" * 100})
    used_at(cache, m, "2024-01-01T00:00:00.000+00:00")
    make_room(cache, need_bytes=100, settings=make_settings(cache.root, max_bytes=100), pinned=set())
    assert not (cache.models / "s3" / "bkt").exists()


# ----- through the fetcher, against a real S3 server ----------------------------------------------------


@pytest.fixture
def s3(rclone_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for k, v in rclone_s3.env().items():
        monkeypatch.setenv(k, v)
    return rclone_s3


@pytest.fixture
def rbucket(s3: S3Server) -> str:
    import uuid

    name = f"wc-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(name)
    yield name  # type: ignore[misc]
    s3.delete_bucket(name)


async def test_filling_past_the_budget_evicts_the_least_recently_used_unpinned_model(
        s3: S3Server, rbucket: str, tmp_path: Path) -> None:
    put_all(s3, rbucket, {f"m{i}/w.bin": os.urandom(MiB) for i in range(4)})
    settings = make_settings(tmp_path / "root", max_bytes=int(3.5 * MiB))
    cache = Cache(settings.cache_dir)
    for i in range(3):
        await fetch(settings, f"s3://{rbucket}/m{i}/")
    await fetch(settings, f"s3://{rbucket}/m0/")  # a hit: m0 becomes the most recently used
    cache.write_pins([parse_model_uri(f"s3://{rbucket}/m1/").model_id])

    await fetch(settings, f"s3://{rbucket}/m3/")

    assert [ready(cache, f"s3://{rbucket}/m{i}/") for i in range(4)] == [True, True, False, True]
    assert cache.used_bytes() <= settings.max_bytes


async def test_a_model_larger_than_the_budget_fails_and_leaves_nothing_behind(
        s3: S3Server, rbucket: str, tmp_path: Path) -> None:
    put_all(s3, rbucket, {"big/a.bin": os.urandom(MiB), "big/b.bin": os.urandom(MiB)})
    settings = make_settings(tmp_path / "root", max_bytes=int(1.5 * MiB))
    with pytest.raises(BudgetExceededError) as info:
        await fetch(settings, f"s3://{rbucket}/big/")
    assert info.value.reason == "BudgetExceeded"
    root = settings.cache_dir
    assert not os.path.lexists(root / f"models/s3/{rbucket}/big")
    assert blob_files(root) == [] and leftover_downloads(root) == [] and staging_dirs(root) == []
    assert list((root / "snapshots").iterdir()) == []
