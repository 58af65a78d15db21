"""The agent's HTTP surfaces (aiohttp).

* The metrics port (default 9400), read-only: ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/models``.
* A Unix socket at ``<root>/.control/agent.sock`` (directory 0700, socket 0600: only the agent's user), for what
  changes the cache: ``POST /v1/prefetch`` and ``POST /v1/evict``. Never on a network port, and not reachable
  from inference pods, which mount the root read-only as another user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import metrics
from agent.cache import Cache
from agent.errors import WeightcacheError
from agent.fetch import Fetcher
from agent.uris import parse_model_uri

log = logging.getLogger(__name__)


class StatusApi:
    """Builds both aiohttp apps over the daemon's state."""

    def __init__(self, *, cache: Cache, fetcher: Fetcher, ready: Callable[[], bool],
                 models_status: Callable[[], list[dict[str, Any]]], pinned: Callable[[], set[str]]) -> None:
        self.cache = cache
        self.fetcher = fetcher
        self._ready = ready
        self._models_status = models_status
        self._pinned = pinned

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
        return web.json_response({"models": await asyncio.to_thread(self._models_json)})

    def _models_json(self) -> list[dict[str, Any]]:
        pins = self._pinned() | self.cache.read_pins()
        live = {m["uri"]: m for m in self._models_status()}
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
        app = web.Application(client_max_size=64 * 1024)
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
        return web.json_response({"results": out}, status=200 if all(o["ok"] for o in out) else 502)

    async def evict(self, req: web.Request) -> web.Response:
        body = await _json_body(req)
        try:
            model = parse_model_uri(str(body.get("uri", "")))
        except WeightcacheError as e:
            raise web.HTTPBadRequest(text=str(e)) from e
        if model.model_id in self._pinned() | self.cache.read_pins():
            raise web.HTTPConflict(text=f"{model} is in use by pods on this node")
        if self.cache.read_manifest(model.model_id) is None:
            raise web.HTTPNotFound(text=f"{model} is not cached")
        async with self.cache.model_lock(model.model_id):
            freed = await asyncio.to_thread(self.cache.remove_model, model.model_id)
        metrics.EVICTIONS.inc()
        metrics.EVICTED_BYTES.inc(freed)
        return web.json_response({"uri": model.uri, "freed_bytes": freed})


async def _json_body(req: web.Request) -> dict[str, Any]:
    try:
        body = await req.json()
    except ValueError as e:
        raise web.HTTPBadRequest(text=f"invalid JSON: {e}") from e
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return body


async def start_servers(api: StatusApi, *, host: str, port: int, socket_path: Path) -> list[web.AppRunner]:
    """Start the public server (if port > 0) and the control socket; return runners to clean up."""
    runners: list[web.AppRunner] = []
    if port > 0:
        runner = web.AppRunner(api.public_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
        log.info("HTTP API on %s:%d (/healthz /readyz /metrics /v1/models)", host, port)
    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(socket_path.parent, 0o700)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    crunner = web.AppRunner(api.control_app(), access_log=None)
    await crunner.setup()
    old_umask = os.umask(0o177)
    try:
        await web.UnixSite(crunner, str(socket_path)).start()
    finally:
        os.umask(old_umask)
    runners.append(crunner)
    log.info("control API on unix:%s", socket_path)
    return runners
