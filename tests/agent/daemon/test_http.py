"""``agent.daemon.http``: the read-only API on the metrics port and the control API on a private Unix socket, served by
real aiohttp servers over a real cache and fetcher (moto behind it), reached with real clients.

The control socket's defences are tested the way an attacker would meet them: a forked child that drops to
another uid (these tests run as root) and tries to connect, with the socket's directory private and with it
opened up by mistake (then SO_PEERCRED refuses); and a child whose whole filesystem is the cache root (what an
inference pod mounts), which cannot even name the socket, root or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import metrics
from agent.config import AgentSettings, load_settings
from agent.daemon.http import StatusApi, start_servers
from agent.errors import ConfigError
from agent.store.cache import Cache
from agent.transfer.fetch import Fetcher
from agent.transfer.s3 import S3Client
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
    cache_changes: int = 0  # how often the API told the daemon that the ready models may have changed

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    async def models(self) -> dict[str, dict[str, Any]]:
        async with self.http.get(f"{self.base}/v1/models") as r:
            assert r.status == 200
            return {m["uri"]: m for m in (await r.json())["models"]}


NOBODY = 65534


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """Where the socket's directory goes: under /tmp, world-traversable like /run, so that only the socket's own
    directory can stop another uid (pytest's tmp_path sits below 0700 directories, which would stop it first)."""
    base = Path(tempfile.mkdtemp(prefix="wc-run-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def served(s3_environment: S3Server, models_bucket: str, tmp_path: Path, run_dir: Path) -> AsyncIterator[Served]:
    s3_environment.put(models_bucket, "m1/weights.bin", b"w" * 4000)
    s3_environment.put(models_bucket, "m2.bin", b"2" * 1000)
    settings = load_settings(env={}, cache_dir=tmp_path / "cache", min_free_bytes=0, min_part_size=MiB,
                             control_socket=run_dir / "weightcache" / "agent.sock")
    cache = Cache(settings.cache_dir)
    cache.recover(orphan_max_age_seconds=settings.orphan_max_age_seconds)
    port = free_port()
    async with S3Client(settings) as s3:
        fetcher = Fetcher(settings, cache, s3)
        holder: list[Served] = []
        api = StatusApi(cache=cache, fetcher=fetcher, ready=lambda: holder[0].ready,
                        models_status=lambda: holder[0].live, pinned=lambda: holder[0].pinned,
                        on_cache_change=lambda: setattr(holder[0], "cache_changes", holder[0].cache_changes + 1))
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


async def test_the_control_socket_is_private_and_outside_the_cache_root(served: Served) -> None:
    sock = served.settings.control_socket
    assert not sock.is_relative_to(served.cache.root), "pods mount the root: the socket must not be in it"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700


async def test_a_stale_socket_file_from_a_previous_run_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "agent.sock"
    sock.parent.mkdir(mode=0o755)
    sock.write_text("left over")
    api = StatusApi(cache=Cache(tmp_path / "cache"), fetcher=None,  # type: ignore[arg-type] - never reached
                    ready=lambda: True, models_status=list, pinned=set)
    runners = await start_servers(api, host="127.0.0.1", port=0, socket_path=sock)
    try:
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700, "an existing directory is tightened too"
    finally:
        for r in runners:
            await r.cleanup()


async def test_a_socket_directory_that_another_user_owns_is_refused(run_dir: Path, tmp_path: Path) -> None:
    directory = run_dir / "weightcache"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)  # whoever owns it could swap the socket under the agent
    api = StatusApi(cache=Cache(tmp_path / "cache"), fetcher=None,  # type: ignore[arg-type] - never reached
                    ready=lambda: True, models_status=list, pinned=set)
    with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}"):
        await start_servers(api, host="127.0.0.1", port=0, socket_path=directory / "agent.sock")


async def test_a_second_agent_never_takes_over_a_live_control_socket(served: Served, tmp_path: Path) -> None:
    api = StatusApi(cache=Cache(tmp_path / "cache"), fetcher=None,  # type: ignore[arg-type] - never reached
                    ready=lambda: True, models_status=list, pinned=set)
    with pytest.raises(ConfigError, match="another agent is serving"):
        await start_servers(api, host="127.0.0.1", port=0, socket_path=served.settings.control_socket)
    async with served.control.get("http://agent/v1/models") as r:
        assert r.status == 200, "the first agent still owns its socket"


# ----- the control socket against other callers ----------------------------------------------------------------


def in_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` in a forked child (which may drop privileges for good) and return what it returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            try:
                out = body()
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which asserts on it
                out = {"error": type(e).__name__, "detail": str(e)}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data or b'{"error": "child wrote nothing"}')
    return result


def become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def try_control(sock_path: str) -> dict[str, Any]:
    """Connect and ask for /v1/models over raw HTTP/1.1: how far does this caller get?"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(sock_path)
    except OSError as e:
        return {"uid": os.getuid(), "connect": type(e).__name__}
    with s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return {"uid": os.getuid(), "connect": "connected", "status": int(reply.split(b" ", 2)[1]),
            "body": reply.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")}


def refused() -> float:
    return metrics.CONTROL_REQUESTS.labels(result="refused")._value.get()


async def test_another_uid_cannot_connect_to_the_control_socket(served: Served) -> None:
    sock = str(served.settings.control_socket)

    def probe() -> dict[str, Any]:
        become_nobody()
        return {**try_control(sock), "parent_listable": bool(os.listdir(Path(sock).parent.parent))}

    seen = await asyncio.to_thread(in_child, probe)
    assert seen["uid"] == NOBODY and seen["parent_listable"], seen
    assert seen["connect"] == "PermissionError", seen


async def test_another_uid_is_refused_even_when_the_socket_is_opened_up(served: Served) -> None:
    sock = served.settings.control_socket
    os.chmod(sock.parent, 0o755)  # a mistake on the node: modes no longer protect the socket...
    os.chmod(sock, 0o666)
    before = refused()

    seen = await asyncio.to_thread(in_child, lambda: (become_nobody(), try_control(str(sock)))[1])
    assert seen["connect"] == "connected", seen
    assert seen["status"] == 403 and f"uid {NOBODY}" in seen["body"], seen  # ...SO_PEERCRED still does
    assert refused() == before + 1


async def test_a_process_that_sees_only_the_cache_root_cannot_reach_the_socket(served: Served) -> None:
    """What an inference pod mounts is the cache root: from there, no socket is reachable, root or not."""
    await served.fetcher.ensure(served.uri("m2.bin"))  # something in the root to look at
    root, sock = str(served.cache.root), str(served.settings.control_socket)

    def probe() -> dict[str, Any]:
        os.chroot(root)
        os.chdir("/")
        sockets = [p for d, dirs, files in os.walk("/") for n in dirs + files
                   if _is_socket(p := os.path.join(d, n))]
        return {"sockets": sockets, "entries": sorted(os.listdir("/")), **try_control(sock)}

    seen = await asyncio.to_thread(in_child, probe)
    assert "models" in seen["entries"], seen
    assert seen["sockets"] == [], "no socket anywhere under the cache root"
    assert seen["connect"] == "FileNotFoundError", seen


async def test_every_control_call_is_logged_with_its_caller(served: Served,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="agent.daemon.http"):
        async with served.control.get("http://agent/v1/models") as r:
            assert r.status == 200
    assert f"GET /v1/models from pid={os.getpid()} uid={os.geteuid()} gid={os.getegid()}" in caplog.text


async def test_prefetch_through_the_socket_makes_models_ready(served: Served) -> None:
    async with served.control.post("http://agent/v1/prefetch",
                                   json={"uris": [served.uri("m1/"), served.uri("m2.bin")]}) as r:
        assert r.status == 200, await r.text()
        results = {x["uri"]: x for x in (await r.json())["results"]}
    assert results[served.uri("m2.bin")]["ok"] and results[served.uri("m2.bin")]["bytes"] == 1000
    assert Path(results[served.uri("m1/")]["path"], "weights.bin").read_bytes() == b"w" * 4000
    assert served.cache_changes == 1, "the node's labels follow a prefetch at once"


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


async def test_evict_removes_an_unpinned_model_and_says_the_ready_set_changed(served: Served) -> None:
    await served.fetcher.ensure(served.uri("m2.bin"))
    evictions = metrics.EVICTIONS._value.get()
    async with served.control.post("http://agent/v1/evict", json={"uri": served.uri("m2.bin")}) as r:
        assert r.status == 200 and (await r.json())["freed_bytes"] >= 1000
    assert served.cache.lookup(parse_model_uri(served.uri("m2.bin"))) is None
    assert metrics.EVICTIONS._value.get() == evictions + 1
    assert served.cache_changes == 1, "the node's labels follow an eviction at once"
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


def _is_socket(path: str) -> bool:
    """False for anything else, and for an entry that vanished while we walked (the agent writes temp files)."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
