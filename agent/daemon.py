"""``weightcache-agent run``: wire the pieces together, run them as named tasks, and shut down cleanly.

SIGTERM/SIGINT → stop watching, cancel fetches (each finished part is already recorded, so the next start
resumes), close the HTTP servers, and exit within ``shutdown_grace_seconds``; anything still stuck is named in
the log. One model's failure never stops the daemon; a crash of a core task does (exit 1, so the pod restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from agent import metrics
from agent.cache import Cache
from agent.config import AgentSettings
from agent.demand import Reconciler
from agent.errors import ConfigError, WeightcacheError
from agent.fetch import Fetcher
from agent.http import StatusApi, start_servers
from agent.policy import Policy, load_policy
from agent.reporting import WARNING, LogReporter, Reporter
from agent.s3 import S3Client

log = logging.getLogger("agent.daemon")


class PolicyHolder:
    """The current policy, re-read when the file's content changes (a bad edit keeps the old one)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.policy = load_policy(path)
        self._digest = self._read_digest()

    def _read_digest(self) -> str:
        if self.path is None:
            return ""
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return ""

    def reload_if_changed(self) -> bool:
        if self.path is None:
            return False
        digest = self._read_digest()
        if not digest or digest == self._digest:
            return False
        try:
            policy = load_policy(self.path)
        except ConfigError as e:
            log.error("policy file changed but is invalid; keeping the previous policy: %s", e)
            self._digest = digest
            return False
        self.policy, self._digest = policy, digest
        log.info("policy reloaded from %s", self.path)
        return True


def _parse_labels(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = v.strip()
    return out


async def run_daemon(settings: AgentSettings) -> int:
    if settings.pods_file is None and not settings.node_name:
        raise ConfigError("NODE_NAME (--node-name) is required to watch pods; or use --pods-file")
    cache = Cache(settings.cache_dir, fsync=settings.fsync)
    await asyncio.to_thread(cache.recover, orphan_max_age_seconds=settings.orphan_max_age_seconds)
    policies = PolicyHolder(settings.policy_file)
    if policies.policy.open:
        log.warning("no policy file (WEIGHTCACHE_POLICY_FILE): single-tenant mode, every namespace may use any "
                    "model the agent's S3 credentials can read")

    reporter: Reporter
    kube_api = None
    if settings.pods_file is None:
        from agent.kube import KubeApi, KubeReporter

        kube_api = KubeApi(settings)
        reporter = KubeReporter(kube_api)
    else:
        reporter = LogReporter()

    async with S3Client(settings) as s3:
        holder: dict[str, Reconciler] = {}
        fetcher = Fetcher(settings, cache, s3, pinned=lambda: holder["r"].pinned_model_ids() if holder else set(),
                          on_bytes=metrics.FETCH_BYTES.inc)
        reconciler = Reconciler(settings=settings, cache=cache, fetcher=fetcher, reporter=reporter,
                                policy=lambda: policies.policy, model_workers=settings.model_workers)
        holder["r"] = reconciler
        api = StatusApi(cache=cache, fetcher=fetcher, ready=lambda: reconciler.synced,
                        models_status=reconciler.models_status, pinned=reconciler.pinned_model_ids)
        runners = await start_servers(api, host=settings.metrics_host, port=settings.metrics_port,
                                      socket_path=settings.control_socket)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        tasks = [
            asyncio.create_task(reconciler.run(), name="reconciler"),
            asyncio.create_task(_watch(settings, reconciler, kube_api), name="pod-source"),
            asyncio.create_task(_policy_loop(settings, policies, reconciler), name="policy-reload"),
            asyncio.create_task(_warm_up(settings, policies.policy, reconciler, reporter), name="warm-up"),
        ]
        stopper = asyncio.create_task(stop.wait(), name="stop-signal")
        exit_code = 0
        tasks[3].add_done_callback(_log_warm_failure)
        try:
            done, _ = await asyncio.wait([stopper, *tasks[:3]], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper:
                    log.error("task %s stopped unexpectedly: %r", t.get_name(),
                              "cancelled" if t.cancelled() else t.exception())
                    exit_code = 1
            log.info("shutting down")
        finally:
            await _shutdown([*tasks, stopper], reconciler, runners, grace=settings.shutdown_grace_seconds)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    log.info("stopped")
    return exit_code


def _log_warm_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("warm-up failed: %r", task.exception())


async def _shutdown(tasks: list[asyncio.Task[object]], reconciler: Reconciler,
                    runners: Sequence[web.BaseRunner], *, grace: float) -> None:
    for t in tasks:
        t.cancel()
    await reconciler.aclose()
    _done, pending = await asyncio.wait(tasks, timeout=grace)
    for t in pending:
        log.error("task %s did not stop within %.0fs of SIGTERM", t.get_name(), grace)
    for r in runners:
        with contextlib.suppress(Exception):
            await r.cleanup()
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    for t in leftovers:
        t.cancel()
    if leftovers:
        await asyncio.wait(leftovers, timeout=max(1.0, grace / 5))


async def _watch(settings: AgentSettings, reconciler: Reconciler, kube_api: object) -> None:
    if settings.pods_file is not None:
        from agent.podsfile import watch_pods_file

        await watch_pods_file(settings.pods_file, on_list=reconciler.replace_all,
                              interval=settings.file_poll_interval)
        return
    from agent.kube import watch_pods

    async def on_event(etype: str, pod: object) -> None:
        if etype == "DELETED":
            await reconciler.delete(pod.uid)  # type: ignore[attr-defined]
        else:
            await reconciler.upsert(pod)  # type: ignore[arg-type]

    await watch_pods(kube_api, on_list=reconciler.replace_all, on_event=on_event,  # type: ignore[arg-type]
                     reconnect_max_delay=settings.reconnect_max_delay)


async def _policy_loop(settings: AgentSettings, policies: PolicyHolder, reconciler: Reconciler) -> None:
    while True:
        await asyncio.sleep(settings.file_poll_interval)
        if await asyncio.to_thread(policies.reload_if_changed):
            await reconciler.policy_changed()
            await _demand_warm(settings, policies.policy, reconciler, reconciler.reporter)


async def _node_labels(settings: AgentSettings, reporter: Reporter) -> dict[str, str]:
    if settings.pods_file is not None:
        return _parse_labels(settings.node_labels)
    for attempt in range(5):
        try:
            return await reporter.node_labels()  # type: ignore[attr-defined,no-any-return]
        except Exception as e:  # noqa: BLE001 - API not reachable yet: retry a few times
            log.warning("cannot read node labels (%s); retrying", e)
            await asyncio.sleep(min(2 ** attempt, 10))
    return {}


async def _demand_warm(settings: AgentSettings, policy: Policy, reconciler: Reconciler,
                       reporter: Reporter) -> list[str]:
    labels = await _node_labels(settings, reporter)
    models = policy.warm_models(labels)
    if models:
        log.info("warm set for this node: %s", ", ".join(m.uri for m in models))
    return reconciler.demand_warm(models)


async def _warm_up(settings: AgentSettings, policy: Policy, reconciler: Reconciler, reporter: Reporter) -> None:
    """Prefetch the warm set; then lift the startup taint (or at the deadline, with a Warning Event)."""
    ids = await _demand_warm(settings, policy, reconciler, reporter)
    has_taint = False
    if settings.pods_file is None:
        try:
            has_taint = await reporter.node_has_startup_taint()  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001
            log.warning("cannot read node taints: %s", e)
    if not ids and not has_taint:
        return
    ready = await reconciler.wait_ready(ids, timeout=policy.warm_deadline_seconds)
    if ready:
        log.info("warm set ready (%d models)", len(ids))
    else:
        msg = (f"warm set not ready after {policy.warm_deadline_seconds:.0f}s (warmDeadlineSeconds); "
               "removing the startup taint anyway")
        log.warning(msg)
        with contextlib.suppress(Exception):
            await reporter.node_event(type=WARNING, reason="WarmDeadlineExceeded", message=msg)
    if has_taint:
        for attempt in range(10):
            try:
                await reporter.remove_startup_taint()
                return
            except WeightcacheError:
                raise
            except Exception as e:  # noqa: BLE001 - API hiccup: retry
                log.warning("cannot remove the startup taint (%s); retrying", e)
                await asyncio.sleep(min(2 ** attempt, 30))
