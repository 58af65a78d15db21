"""``agent.http``: the read-only API on the metrics port and the control API on a private Unix socket, served by
real aiohttp servers over a real cache and fetcher (moto behind it), reached with real clients.
"""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import metrics
from agent.cache import Cache
from agent.config import AgentSettings, load_settings
from agent.fetch import Fetcher
from agent.http import StatusApi, start_servers
from agent.s3 import S3Client
from agent.uris import parse_model_uri
from tests.agent.daemon_helpers import (
    parse_metrics,
)
from tests.fixtures.s3servers import S3Server, free_port

MiB = 1024 * 1024

# The fakes and fixtures these tests share (kube, models_bucket, agents, s3_environment).
pytest_plugins = ["tests.agent.daemon_helpers"]


@dataclass
class Served:
    """The two servers, clients for each, and the daemon-side state they read (switchable by the test)."""

    settings: AgentSettings
    cache: Cache
    fetcher: Fetcher
    http: aiohttp.ClientSession
    control: aiohttp.ClientSession
    base: str
    bucket: str
    ready: bool = False
    pinned: set[str] = field(default_factory=set)
    live: list[dict[str, Any]] = field(default_factory=list)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    async def models(self) -> dict[str, dict[str, Any]]:
        async with self.http.get(f"{self.base}/v1/models") as r:
            assert r.status == 200
            return {m["uri"]: m for m in (await r.json())["models"]}


@pytest.fixture
async def served(s3_environment: S3Server, models_bucket: str, tmp_path: Path) -> AsyncIterator[Served]:
    s3_environment.put(models_bucket, "m1/weights.bin", b"w" * 4000)
    s3_environment.put(models_bucket, "m2.bin", b"2" * 1000)
    settings = load_settings(env={}, cache_dir=tmp_path / "cache", min_free_bytes=0, min_part_size=MiB)
    cache = Cache(settings.cache_dir)
    cache.recover(orphan_max_age_seconds=settings.orphan_max_age_seconds)
    port = free_port()
    async with S3Client(settings) as s3:
        fetcher = Fetcher(settings, cache, s3)
        holder: list[Served] = []
        api = StatusApi(cache=cache, fetcher=fetcher, ready=lambda: holder[0].ready,
                        models_status=lambda: holder[0].live, pinned=lambda: holder[0].pinned)
        runners = await start_servers(api, host="127.0.0.1", port=port, socket_path=settings.control_socket)
        try:
            async with aiohttp.ClientSession() as http, aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=str(settings.control_socket))) as control:
                holder.append(Served(settings, cache, fetcher, http, control, f"http://127.0.0.1:{port}",
                                     models_bucket))
                yield holder[0]
        finally:
            for r in runners:
                await r.cleanup()


# ----- read-only, on the network port ---------------------------------------------------------------------------


async def test_healthz_is_always_ok_and_readyz_waits_for_the_first_listing(served: Served) -> None:
    async with served.http.get(f"{served.base}/healthz") as r:
        assert r.status == 200
    async with served.http.get(f"{served.base}/readyz") as r:
        assert r.status == 503
    served.ready = True
    async with served.http.get(f"{served.base}/readyz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ready"


async def test_metrics_are_prometheus_text_with_the_contract_names(served: Served) -> None:
    async with served.http.get(f"{served.base}/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        samples = parse_metrics(await r.text())
    names = {name for name, _ in samples}
    assert ("weightcache_cache_requests_total", frozenset({("result", "hit")})) in samples
    assert ("weightcache_cache_requests_total", frozenset({("result", "miss")})) in samples
    assert {"weightcache_fetch_bytes_total", "weightcache_fetch_duration_seconds_count",
            "weightcache_cache_bytes_used", "weightcache_cache_bytes_capacity", "weightcache_evictions_total",
            "weightcache_demand_to_event_seconds_count"} <= names
    assert not any(n.endswith("_created") for n in names)


async def test_v1_models_lists_cached_and_in_flight_models(served: Served) -> None:
    await served.fetcher.ensure(served.uri("m1/"))
    served.pinned = {parse_model_uri(served.uri("m1/")).model_id}
    served.live = [{"uri": served.uri("m1/"), "state": "ready", "waiters": 1},
                   {"uri": served.uri("m2.bin"), "state": "fetching", "waiters": 2, "bytes": None}]

    models = await served.models()
    m1 = models[served.uri("m1/")]
    assert (m1["state"], m1["bytes"], m1["files"], m1["pinned"]) == ("ready", 4000, 1, True)
    assert Path(m1["path"]) == served.cache.root / "models" / "s3" / served.bucket / "m1"
    assert m1["last_used"] and m1["revision"]
    assert models[served.uri("m2.bin")]["state"] == "fetching"


async def test_the_network_port_changes_nothing(served: Served) -> None:
    for path in ("/v1/prefetch", "/v1/evict"):
        async with served.http.post(f"{served.base}{path}", json={"uris": [served.uri("m2.bin")]}) as r:
            assert r.status in (404, 405), path
    assert await served.models() == {}


# ----- control, on the Unix socket --------------------------------------------------------------------------------


async def test_the_control_socket_is_private_to_the_agents_user(served: Served) -> None:
    sock = served.settings.control_socket
    assert sock.is_relative_to(served.cache.root)
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700


async def test_a_stale_socket_file_from_a_previous_run_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / ".control" / "agent.sock"
    sock.parent.mkdir(mode=0o755)
    sock.write_text("left over")
    api = StatusApi(cache=Cache(tmp_path), fetcher=None,  # type: ignore[arg-type] - never reached here
                    ready=lambda: True, models_status=list, pinned=set)
    runners = await start_servers(api, host="127.0.0.1", port=0, socket_path=sock)
    try:
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700, "an existing directory is tightened too"
    finally:
        for r in runners:
            await r.cleanup()


async def test_prefetch_through_the_socket_makes_models_ready(served: Served) -> None:
    async with served.control.post("http://agent/v1/prefetch",
                                   json={"uris": [served.uri("m1/"), served.uri("m2.bin")]}) as r:
        assert r.status == 200, await r.text()
        results = {x["uri"]: x for x in (await r.json())["results"]}
    assert results[served.uri("m2.bin")]["ok"] and results[served.uri("m2.bin")]["bytes"] == 1000
    assert Path(results[served.uri("m1/")]["path"], "weights.bin").read_bytes() == b"w" * 4000


async def test_prefetch_reports_each_failure_with_its_reason(served: Served) -> None:
    async with served.control.post("http://agent/v1/prefetch",
                                   json={"uris": [served.uri("m2.bin"), served.uri("nope/")]}) as r:
        assert r.status == 502
        results = {x["uri"]: x for x in (await r.json())["results"]}
    assert results[served.uri("m2.bin")]["ok"] is True
    assert (results[served.uri("nope/")]["ok"], results[served.uri("nope/")]["reason"]) == (False, "NotFound")


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"uris": []}', b'{"uris": ["s3://b/../x"]}',
                                  b'{"uris": ["gs://b/x"]}'])
async def test_a_bad_prefetch_request_is_a_400(served: Served, body: bytes) -> None:
    async with served.control.post("http://agent/v1/prefetch", data=body,
                                   headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400, await r.text()


async def test_evict_removes_an_unpinned_model(served: Served) -> None:
    await served.fetcher.ensure(served.uri("m2.bin"))
    evictions = metrics.EVICTIONS._value.get()
    async with served.control.post("http://agent/v1/evict", json={"uri": served.uri("m2.bin")}) as r:
        assert r.status == 200 and (await r.json())["freed_bytes"] >= 1000
    assert served.cache.lookup(parse_model_uri(served.uri("m2.bin"))) is None
    assert metrics.EVICTIONS._value.get() == evictions + 1
    async with served.control.post("http://agent/v1/evict", json={"uri": served.uri("m2.bin")}) as r:
        assert r.status == 404, "already gone"


async def test_evict_of_a_model_pods_use_is_a_409(served: Served) -> None:
    uri = served.uri("m1/")
    await served.fetcher.ensure(uri)
    served.pinned = {parse_model_uri(uri).model_id}
    async with served.control.post("http://agent/v1/evict", json={"uri": uri}) as r:
        assert r.status == 409
    served.pinned = set()
    served.cache.write_pins([parse_model_uri(uri).model_id])  # pinned on disk, by another agent process
    async with served.control.post("http://agent/v1/evict", json={"uri": uri}) as r:
        assert r.status == 409
    assert served.cache.lookup(parse_model_uri(uri)) is not None


async def test_the_socket_also_answers_v1_models(served: Served) -> None:
    await served.fetcher.ensure(served.uri("m2.bin"))
    async with served.control.get("http://agent/v1/models") as r:
        assert r.status == 200
        assert [m["uri"] for m in json.loads(await r.text())["models"]] == [served.uri("m2.bin")]
