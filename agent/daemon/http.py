"""The agent's HTTP surfaces (aiohttp).

* The metrics port (default 9400), read-only: ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/models``.
* A Unix socket (``WEIGHTCACHE_CONTROL_SOCKET``, default ``/run/weightcache/agent.sock``) for what changes the
  cache: ``POST /v1/prefetch`` and ``POST /v1/evict``. Never on a network port, and never inside the cache root:
  inference pods mount the root, and a read-only mount does not stop a process from ``connect()``-ing to a socket
  in it. The socket's directory belongs to the agent's user and is 0700, the socket 0600; on top of that every
  request is checked with ``SO_PEERCRED``: the caller must run as the agent's uid or as root (who owns the node
  anyway), and is logged by pid/uid/gid (pid 0: a process in a pid namespace the agent cannot see, such as the
  host's or another pod's).

Nothing here may block the event loop: cache reads (manifests, pins) run in worker threads, and the daemon's
own state is read on the loop and handed to those threads as copies, never iterated from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import metrics
from agent.errors import ConfigError, WeightcacheError
from agent.store.cache import Cache
from agent.transfer.fetch import Fetcher
from agent.uris import parse_model_uri

log = logging.getLogger(__name__)


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class StatusApi:
    """Builds both aiohttp apps over the daemon's state."""

    def __init__(self, *, cache: Cache, fetcher: Fetcher, ready: Callable[[], bool],
                 models_status: Callable[[], list[dict[str, Any]]], pinned: Callable[[], set[str]],
                 on_cache_change: Callable[[], None] | None = None) -> None:
        self.cache = cache
        self.fetcher = fetcher
        self._ready = ready
        self._models_status = models_status
        self._pinned = pinned
        # Tells the daemon that the set of ready models may have changed (node labels follow it).
        self._on_cache_change = on_cache_change or (lambda: None)

    # ----- read-only ---------------------------------------------------------------------------------------

    def public_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        return app

    async def healthz(self, _req: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _req: web.Request) -> web.Response:
        if self._ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting", "reason": "initial pod listing not done"}, status=503)

    async def metrics(self, _req: web.Request) -> web.Response:
        body = generate_latest(metrics.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, _req: web.Request) -> web.Response:
        # The daemon's dicts are read here, on the loop; the thread gets copies (a dict iterated from a thread
        # while the loop changes it raises "dictionary changed size during iteration").
        pinned = set(self._pinned())
        live = {m["uri"]: dict(m) for m in self._models_status()}
        return web.json_response({"models": await asyncio.to_thread(self._models_json, pinned, live)})

    def _models_json(self, pinned: set[str], live: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        pins = pinned | self.cache.read_pins()
        out: list[dict[str, Any]] = []
        for m in self.cache.list_manifests():
            ready = False
            with contextlib.suppress(WeightcacheError):
                ready = self.cache.lookup(m.model_uri) is not None
            state = live.pop(m.uri, {}).get("state", "ready" if ready else "stale")
            out.append({"uri": m.uri, "state": state if not ready or state != "pending" else "ready",
                        "bytes": m.total_bytes, "files": len(m.files), "path": str(self.cache.root / m.path),
                        "revision": m.revision, "last_used": m.last_used, "fetched_at": m.fetched_at,
                        "pinned": m.model_id in pins})
        for uri, status in live.items():
            out.append({"uri": uri, "state": status["state"], "bytes": status.get("bytes"), "files": None,
                        "path": None, "revision": None, "last_used": None, "fetched_at": None,
                        "pinned": status["waiters"] > 0, "error": status.get("error")})
        return out

    # ----- control (unix socket only) --------------------------------------------------------------------

    def control_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024, middlewares=[_peer_check])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/prefetch", self.prefetch)
        app.router.add_post("/v1/evict", self.evict)
        return app

    async def prefetch(self, req: web.Request) -> web.Response:
        body = await _json_body(req)
        uris = body.get("uris")
        if not isinstance(uris, list) or not uris:
            raise web.HTTPBadRequest(text='expected {"uris": ["s3://..."]}')
        try:
            models = [parse_model_uri(str(u)) for u in uris]
        except WeightcacheError as e:
            raise web.HTTPBadRequest(text=str(e)) from e
        results = await asyncio.gather(*(self.fetcher.ensure(m) for m in models), return_exceptions=True)
        out = []
        for m, r in zip(models, results):
            if isinstance(r, BaseException):
                out.append({"uri": m.uri, "ok": False, "error": str(r), "reason": getattr(r, "reason", "Error")})
            else:
                out.append({"uri": m.uri, "ok": True, "path": str(r.path), "hit": r.hit, "bytes": r.total_bytes})
        if any(o["ok"] for o in out):
            self._on_cache_change()
        return web.json_response({"results": out}, status=200 if all(o["ok"] for o in out) else 502)

    async def evict(self, req: web.Request) -> web.Response:
        body = await _json_body(req)
        try:
            model = parse_model_uri(str(body.get("uri", "")))
        except WeightcacheError as e:
            raise web.HTTPBadRequest(text=str(e)) from e
        pinned = set(self._pinned())
        if model.model_id in pinned | await asyncio.to_thread(self.cache.read_pins):
            raise web.HTTPConflict(text=f"{model} is in use by pods on this node")
        if await asyncio.to_thread(self.cache.read_manifest, model.model_id) is None:
            raise web.HTTPNotFound(text=f"{model} is not cached")
        async with self.cache.model_lock(model.model_id):
            freed = await asyncio.to_thread(self.cache.remove_model, model.model_id)
        metrics.EVICTIONS.inc()
        metrics.EVICTED_BYTES.inc(freed)
        self._on_cache_change()
        return web.json_response({"uri": model.uri, "freed_bytes": freed})


def peer_credentials(transport: Any) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel recorded it at connect.

    The kernel translates them into our namespaces: the pid is 0 for a caller in a pid namespace we cannot see,
    the uid is the overflow uid (65534) for one in a user namespace that does not map to ours.
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


@web.middleware
async def _peer_check(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Only the agent's own user (or root) may use the control API, whatever the file modes say; log every caller."""
    creds = peer_credentials(request.transport)
    if creds is None:
        why = "no peer credentials"
    elif creds[1] not in (os.geteuid(), 0):
        why = f"uid {creds[1]} is neither the agent's ({os.geteuid()}) nor root"
    else:
        why = ""
    who = "pid=? uid=? gid=?" if creds is None else "pid={} uid={} gid={}".format(*creds)
    if why:
        metrics.CONTROL_REQUESTS.labels(result="refused").inc()
        log.warning("control API: refused %s %s from %s: %s", request.method, request.path, who, why,
                    extra={"peer": who})
        raise web.HTTPForbidden(text=f"refused: {why}\n")
    metrics.CONTROL_REQUESTS.labels(result="allowed").inc()
    log.info("control API: %s %s from %s", request.method, request.path, who, extra={"peer": who})
    return await handler(request)


async def _json_body(req: web.Request) -> dict[str, Any]:
    try:
        body = await req.json()
    except ValueError as e:
        raise web.HTTPBadRequest(text=f"invalid JSON: {e}") from e
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return body


def _prepare_socket_path(socket_path: Path) -> None:
    """A private directory for the socket, and no socket file left there unless an agent still answers on it."""
    directory = socket_path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.geteuid():
        raise ConfigError(f"the control socket's directory {directory} belongs to uid {st.st_uid}, not to the "
                          f"agent's user ({os.geteuid()}): create it owned by that user, mode 0700")
    os.chmod(directory, 0o700)
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(socket_path))
        except OSError:
            pass  # nobody listens: a socket left by a previous run
        else:
            raise ConfigError(f"another agent is serving the control socket {socket_path}; stop it, or give this "
                              "one its own WEIGHTCACHE_CONTROL_SOCKET")
        finally:
            probe.close()
    socket_path.unlink()


async def start_servers(api: StatusApi, *, host: str, port: int, socket_path: Path) -> list[web.AppRunner]:
    """Start the public server (if port > 0) and the control socket; return runners to clean up."""
    runners: list[web.AppRunner] = []
    await asyncio.to_thread(_prepare_socket_path, socket_path)
    if port > 0:
        runner = web.AppRunner(api.public_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
        log.info("HTTP API on %s:%d (/healthz /readyz /metrics /v1/models)", host, port)
    crunner = web.AppRunner(api.control_app(), access_log=None)
    await crunner.setup()
    runners.append(crunner)
    try:
        await web.UnixSite(crunner, str(socket_path)).start()
        # The directory (0700) already keeps every other user out while the socket has the umask's mode.
        os.chmod(socket_path, 0o600)
    except BaseException:
        for r in runners:
            with contextlib.suppress(Exception):
                await r.cleanup()
        raise
    log.info("control API on unix:%s", socket_path)
    return runners
