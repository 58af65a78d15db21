"""``agent.daemon.demand.Reconciler`` in-process: a real cache, a real Fetcher on a real S3 server (moto), and a Reporter
that records what the pods and the node are told. Hit/miss counting, one fetch per model, pins (and reading them
from threads), failures and retries, rejections, policy changes, the warm set, the node's ready-model labels
following publish and evict signals rather than polling — and malformed annotations fuzzed with hypothesis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import metrics
from agent.cluster.pods import PodInfo, pod_from_dict
from agent.cluster.policy import Policy, parse_policy
from agent.config import AgentSettings, load_settings
from agent.daemon.demand import Reconciler
from agent.daemon.pins import Pins
from agent.store.cache import Cache
from agent.transfer.fetch import Fetcher
from agent.transfer.s3 import S3Client
from agent.uris import parse_annotation, parse_model_uri
from tests.agent.daemon_helpers import (
    RecordingReporter,
    entries_outside,
    escaping_links,
    pod_manifest,
)
from tests.fixtures.s3servers import S3Server

MiB = 1024 * 1024

# The fakes and fixtures these tests share (kube, models_bucket, agents, s3_environment).
pytest_plugins = ["tests.agent.daemon_helpers"]


@dataclass
class World:
    settings: AgentSettings
    cache: Cache
    fetcher: Fetcher
    reporter: RecordingReporter
    reconciler: Reconciler
    run_task: asyncio.Task[None]
    policy: list[Policy]  # the current policy, swappable (the daemon's PolicyHolder does this on file change)

    def pins(self) -> set[str]:
        try:
            return set(json.loads((self.cache.root / "state" / "pins.json").read_text())["model_ids"])
        except FileNotFoundError:
            return set()


@contextlib.asynccontextmanager
async def make_world(root: Path, *, policy: Policy | None = None) -> AsyncIterator[World]:
    settings_ = load_settings(env={}, cache_dir=root, min_free_bytes=0, min_part_size=MiB,
                              retry_base_delay=0.01, retry_max_delay=0.05, read_timeout=10.0)
    cache = Cache(root)
    cache.recover(orphan_max_age_seconds=settings_.orphan_max_age_seconds)
    current = [policy or Policy()]
    async with S3Client(settings_) as s3:
        pins = Pins()
        fetcher = Fetcher(settings_, cache, s3, pinned=pins.ids)
        reporter = RecordingReporter()
        reconciler = Reconciler(settings=settings_, cache=cache, fetcher=fetcher, reporter=reporter,
                                policy=lambda: current[0], model_workers=2, pins=pins)
        task = asyncio.create_task(reconciler.run(), name="reconciler")
        try:
            yield World(settings_, cache, fetcher, reporter, reconciler, task, current)
        finally:
            task.cancel()
            await reconciler.aclose()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # As the daemon's shutdown does: fetches still in flight (shielded from their waiters) are
            # cancelled too, so no task outlives the world.
            leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()
                         and t.get_name().startswith("fetch ")]
            for t in leftovers:
                t.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)


@pytest.fixture
def bucket(s3_environment: S3Server, models_bucket: str) -> str:
    s3_environment.put(models_bucket, "m1/weights.bin", b"w" * 5000)
    s3_environment.put(models_bucket, "m1/config.json", b"{}")
    s3_environment.put(models_bucket, "m2.bin", b"2" * 700)
    return models_bucket


@pytest.fixture
async def world(bucket: str, tmp_path: Path) -> AsyncIterator[World]:
    async with make_world(tmp_path / "cache") as w:
        yield w


def pod(name: str, models: str | None, **kw: Any) -> PodInfo:
    manifest = pod_manifest(name, models, **kw)
    manifest["metadata"]["uid"] = str(uuid.uuid4())
    return pod_from_dict(manifest)


async def eventually(predicate: Callable[[], Any], *, timeout: float = 15.0, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


def requests_count(result: str) -> float:
    return metrics.CACHE_REQUESTS.labels(result=result)._value.get()


# ----- hits, misses, one fetch per model ----------------------------------------------------------------------


async def test_the_first_demand_is_a_miss_and_the_next_pods_is_a_hit(world: World, bucket: str) -> None:
    uri = f"s3://{bucket}/m1/"
    hits, misses = requests_count("hit"), requests_count("miss")
    first = pod("first", uri)
    await world.reconciler.upsert(first)
    await eventually(lambda: world.reporter.for_pod(first.key, "WeightsReady"), what="first ready")
    second = pod("second", uri)
    await world.reconciler.upsert(second)
    ready = await eventually(lambda: world.reporter.for_pod(second.key, "WeightsReady"), what="second ready")

    assert (requests_count("hit") - hits, requests_count("miss") - misses) == (1, 1)
    assert "cache miss" in world.reporter.for_pod(first.key, "WeightsReady")[0].message
    assert "cache hit" in ready[0].message
    assert not world.reporter.for_pod(second.key, "WeightsFetching")


async def test_many_pods_asking_at_once_fetch_the_model_once(world: World, bucket: str) -> None:
    uri = f"s3://{bucket}/m1/"
    pods = [pod(f"p{i}", uri) for i in range(6)]
    for p in pods:
        await world.reconciler.upsert(p)
    for p in pods:
        await eventually(lambda p=p: world.reporter.for_pod(p.key, "WeightsReady"), what=f"{p.key} ready")
    assert world.fetcher.bytes_downloaded == 5002, "one download however many pods want it"


async def test_a_model_stays_pinned_while_any_pod_wants_it(world: World, bucket: str) -> None:
    uri = f"s3://{bucket}/m1/"
    mid = parse_model_uri(uri).model_id
    a, b = pod("a", uri), pod("b", f"{uri} s3://{bucket}/m2.bin")
    await world.reconciler.upsert(a)
    await world.reconciler.upsert(b)
    assert world.pins() == {mid, parse_model_uri(f"s3://{bucket}/m2.bin").model_id}

    await world.reconciler.delete(b.uid)
    assert world.pins() == {mid}
    await world.reconciler.delete(a.uid)
    assert world.pins() == set()


async def test_a_finished_or_terminating_pod_releases_its_models(world: World, bucket: str) -> None:
    uri = f"s3://{bucket}/m2.bin"
    running = pod("job", uri)
    await world.reconciler.upsert(running)
    assert world.pins()
    manifest = pod_manifest("job", uri)
    manifest["metadata"]["uid"] = running.uid
    manifest["status"]["phase"] = "Succeeded"
    await world.reconciler.upsert(pod_from_dict(manifest))
    assert world.pins() == set()


async def test_a_changed_annotation_moves_the_pin(world: World, bucket: str) -> None:
    old, new = f"s3://{bucket}/m1/", f"s3://{bucket}/m2.bin"
    p = pod("p", old)
    await world.reconciler.upsert(p)
    manifest = pod_manifest("p", new)
    manifest["metadata"]["uid"] = p.uid
    await world.reconciler.upsert(pod_from_dict(manifest))
    assert world.pins() == {parse_model_uri(new).model_id}


async def test_a_relist_forgets_pods_that_are_gone(world: World, bucket: str) -> None:
    kept, gone = pod("kept", f"s3://{bucket}/m1/"), pod("gone", f"s3://{bucket}/m2.bin")
    await world.reconciler.replace_all([kept, gone])
    assert world.reconciler.synced
    await world.reconciler.replace_all([kept])
    assert world.pins() == {parse_model_uri(f"s3://{bucket}/m1/").model_id}


# ----- failures and retries -----------------------------------------------------------------------------------


async def test_a_failed_fetch_is_reported_and_retried_until_it_works(world: World, bucket: str,
                                                                     s3_environment: S3Server) -> None:
    uri = f"s3://{bucket}/late.bin"
    p = pod("waiting", uri, gate=True)
    await world.reconciler.upsert(p)
    failed = await eventually(lambda: world.reporter.for_pod(p.key, "WeightsFailed"), what="a failure event")
    assert failed[0].type == "Warning" and "NotFound" in failed[0].message
    assert world.reporter.conditions[p.key][-1][:2] == (False, "WeightsFailed")

    s3_environment.put(bucket, "late.bin", b"finally")  # the retry (after its backoff) finds it
    await eventually(lambda: world.reporter.for_pod(p.key, "WeightsReady"), timeout=20, what="a retried fetch")
    assert world.reporter.conditions[p.key][-1][:2] == (True, "WeightsReady")
    assert not world.run_task.done()


async def test_an_invalid_uri_is_a_warning_and_the_gate_says_rejected(world: World) -> None:
    p = pod("bad", "s3://bucket-x/../etc/passwd", gate=True)
    await world.reconciler.upsert(p)
    (warning,) = world.reporter.for_pod(p.key)
    assert (warning.type, warning.reason) == ("Warning", "InvalidModelURI")
    assert world.reporter.conditions[p.key] == [(False, "WeightsRejected", warning.message.split(": ", 1)[1])]
    assert world.pins() == set()


async def test_a_pod_without_models_passes_its_gate(world: World) -> None:
    p = pod("plain", "", gate=True)
    await world.reconciler.upsert(p)
    assert world.reporter.conditions[p.key] == [(True, "WeightsReady", "no models requested")]
    assert world.reporter.events == []


# ----- policy and warm set ---------------------------------------------------------------------------------------


async def test_a_policy_change_re_evaluates_every_pod(world: World, bucket: str) -> None:
    world.policy[0] = parse_policy("allow: [s3://shared-models/]\n")
    p = pod("p", f"s3://{bucket}/m2.bin", namespace="team-a")
    await world.reconciler.upsert(p)
    assert [e.reason for e in world.reporter.for_pod(p.key)] == ["PolicyDenied"]
    assert world.pins() == set()

    world.policy[0] = parse_policy(f"namespaces: {{team-a: [s3://{bucket}/]}}\n")
    await world.reconciler.policy_changed()
    await eventually(lambda: world.reporter.for_pod(p.key, "WeightsReady"), what="allowed now")


async def test_the_warm_set_is_fetched_and_waited_for(world: World, bucket: str) -> None:
    ids = world.reconciler.demand_warm([parse_model_uri(f"s3://{bucket}/m2.bin")])
    assert await world.reconciler.wait_ready(ids, timeout=15) is True
    missing = world.reconciler.demand_warm([parse_model_uri(f"s3://{bucket}/nothing/")])
    started = time.monotonic()
    assert await world.reconciler.wait_ready(missing, timeout=0.5) is False
    assert time.monotonic() - started < 3


# ----- the node's ready-model labels ------------------------------------------------------------------------------


async def test_a_fetched_model_reaches_the_node_at_once(world: World, bucket: str) -> None:
    uri = f"s3://{bucket}/m2.bin"
    await eventually(lambda: world.reporter.ready_models == [[]], what="the node's first report")
    await world.reconciler.upsert(pod("p", uri))
    await eventually(lambda: world.reporter.ready_models[-1:] == [[uri]], timeout=5,
                     what="the node told, long before the periodic resync")


async def test_the_node_follows_signals_not_polling(world: World, bucket: str) -> None:
    """A model published behind the agent's back (another process) waits for a signal or the slow resync."""
    uri = f"s3://{bucket}/m1/"
    await eventually(lambda: world.reporter.ready_models == [[]], what="the node's first report")
    async with S3Client(world.settings) as s3:  # a `weightcache-agent prefetch` in another process
        await Fetcher(world.settings, Cache(world.cache.root), s3).ensure(uri)
    await asyncio.sleep(1.5)
    assert world.reporter.ready_models == [[]], "the cache is not polled"
    world.reconciler.cache_changed()  # what the control socket's prefetch/evict and a finished fetch do
    await eventually(lambda: world.reporter.ready_models[-1:] == [[uri]], timeout=5, what="the node told")


async def test_pinned_models_can_be_read_from_threads_while_pods_come_and_go(world: World, bucket: str) -> None:
    """Eviction reads the pinned set from worker threads; the loop changes it all the time meanwhile."""
    stop, errors, reads = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                world.reconciler.pinned_model_ids()
                reads[0] += 1
            except RuntimeError as e:  # "dictionary changed size during iteration"
                errors.append(e)
            time.sleep(0)  # hand the GIL back: a hot loop would starve the event loop, not test it

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for i in range(100):
            p = pod(f"churn-{i}", f"s3://{bucket}/m1/ s3://{bucket}/m2.bin")
            await world.reconciler.upsert(p)
            await world.reconciler.delete(p.uid)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert errors == [] and reads[0] > 0
    assert world.reconciler.pinned_model_ids() == set() == world.pins()


# ----- malformed annotations, fuzzed ---------------------------------------------------------------------------------

_PIECES = st.sampled_from([
    "s3://", "s3://allowed-bkt/", "s3://allowed-bkt/m/", "s3://Bad_Bucket/", "s3://ab/", "..", "../", "/", "//",
    ".", ",", " ", "\t", "\n", "\x00", "\x1b", "\x7f", "é", "\U0001f642", "x", "m/", "http://", "s3:/", "%2e%2e",
    "a" * 300, "?", "#", "\\", "~", "$HOME", "\ud800",
])
ANNOTATIONS = st.one_of(st.lists(_PIECES, max_size=14).map("".join), st.text(max_size=80))


def test_malformed_annotations_are_warned_about_and_write_nothing_outside_the_root(
        s3_environment: S3Server, tmp_path: Path) -> None:
    """50 fuzzed annotations through one reconciler: Warning events, no crash, nothing outside the root."""
    root = tmp_path / "cache"
    loop = asyncio.new_event_loop()
    ctx = make_world(root, policy=parse_policy("allow: [s3://allowed-bkt/]\n"))
    world = loop.run_until_complete(ctx.__aenter__())

    @settings(max_examples=50, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(value=ANNOTATIONS)
    def check(value: str) -> None:
        p = pod(f"fuzz-{uuid.uuid4().hex[:8]}", value, gate=True)
        loop.run_until_complete(world.reconciler.upsert(p))
        expected = parse_annotation(value)
        events = world.reporter.for_pod(p.key)
        invalid = [e for e in events if e.reason == "InvalidModelURI"]
        denied = [e for e in events if e.reason == "PolicyDenied"]
        assert len(invalid) == len(expected.errors)
        assert len(denied) == sum(not u.uri.startswith("s3://allowed-bkt/") for u in expected.uris)
        assert all(e.type == "Warning" for e in invalid + denied)
        if expected.errors and not expected.uris:
            assert world.reporter.conditions[p.key][-1][:2] == (False, "WeightsRejected")
        loop.run_until_complete(world.reconciler.delete(p.uid))
        assert not world.run_task.done(), "the reconciler keeps running"

    try:
        check()
        assert world.pins() == set()
    finally:
        loop.run_until_complete(ctx.__aexit__(None, None, None))
        loop.close()
    assert entries_outside(tmp_path, {"cache"}) == []
    assert escaping_links(root) == []
    models = root / "models"
    assert not models.exists() or [p for p in models.rglob("*") if not p.is_dir()] == [], "nothing published"
