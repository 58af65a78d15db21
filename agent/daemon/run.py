"""``weightcache-agent run``: wire the pieces together, run them as named tasks, and shut down cleanly.

SIGTERM/SIGINT → stop watching, cancel fetches (each finished part is already recorded, so the next start
resumes), close the HTTP servers, and exit within ``shutdown_grace_seconds``; anything still stuck is named in
the log. One model's failure never stops the daemon; a crash of a core task does (exit 1, so the pod restarts).

Start-up on a tainted node must end with the taint gone, whatever the API does meanwhile: the warm set is
resolved from the node's labels with retries for as long as it takes (each failure a Warning Event on the node
and ``weightcache_warm_set_unresolved`` at 1, never a silently empty warm set), the warm deadline counts from
start-up whether or not the labels could be read, and the taint removal itself never gives up. Whether the node
has the taint is decided by the removal's own read, never assumed from a read that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent import metrics
from agent.cluster.policy import Policy, load_policy
from agent.cluster.reporting import WARNING, LogReporter, Reporter
from agent.config import AgentSettings
from agent.daemon.demand import Reconciler
from agent.daemon.http import StatusApi, start_servers
from agent.daemon.peering import open_peering
from agent.daemon.pins import Pins
from agent.errors import ConfigError
from agent.store.cache import Cache
from agent.store.maintenance import flush_pending
from agent.transfer.fetch import Fetcher
from agent.transfer.s3 import S3Client
from agent.uris import ModelUri

if TYPE_CHECKING:
    from agent.cluster.kube import KubeApi
    from agent.cluster.kubereport import KubeReporter

log = logging.getLogger("agent.daemon.run")


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
    cache = await asyncio.to_thread(Cache, settings.cache_dir, fsync=settings.fsync)
    await asyncio.to_thread(cache.recover, orphan_max_age_seconds=settings.orphan_max_age_seconds)
    policies = PolicyHolder(settings.policy_file)
    if policies.policy.open:
        log.warning("no policy file (WEIGHTCACHE_POLICY_FILE): single-tenant mode, every namespace may use any "
                    "model the agent's S3 credentials can read")

    reporter: Reporter
    kube_api: KubeApi | None = None
    kube: KubeReporter | None = None
    if settings.pods_file is None:
        from agent.cluster.kube import KubeApi
        from agent.cluster.kubereport import KubeReporter

        kube_api = await asyncio.to_thread(KubeApi, settings)
        reporter = kube = KubeReporter(kube_api)
    else:
        reporter = LogReporter()

    peering = open_peering(settings)
    async with S3Client(settings) as s3:
        pins = Pins()  # decided by the reconciler, respected by the fetcher's evictions: made before both
        fetcher = Fetcher(settings, cache, s3, pinned=pins.ids, on_bytes=_count_fetched,
                          swarm=peering.swarm if peering else None)
        reconciler = Reconciler(settings=settings, cache=cache, fetcher=fetcher, reporter=reporter,
                                policy=lambda: policies.policy, model_workers=settings.model_workers, pins=pins)
        api = StatusApi(cache=cache, fetcher=fetcher, ready=lambda: reconciler.synced,
                        models_status=reconciler.models_status, pinned=reconciler.pinned_model_ids,
                        on_cache_change=reconciler.cache_changed)
        runners = await start_servers(api, host=settings.metrics_host, port=settings.metrics_port,
                                      socket_path=settings.control_socket)
        if peering is not None:
            try:
                await peering.start(cache, fetcher.board, kube_api)
            except BaseException:
                await peering.aclose()
                for r in runners:
                    await r.cleanup()
                raise
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(reconciler.run(), name="reconciler"),
            asyncio.create_task(_watch(settings, reconciler, kube_api), name="pod-source"),
            asyncio.create_task(_policy_loop(settings, policies, reconciler, kube), name="policy-reload"),
            asyncio.create_task(_warm_up(settings, policies.policy, reconciler, reporter, kube), name="warm-up"),
        ]
        if settings.fsync:  # builds a one-shot `prefetch` published this boot without flushing them
            flushing = asyncio.create_task(asyncio.to_thread(flush_pending, cache), name="flush-pending")
            flushing.add_done_callback(_log_flush_failure)
            tasks.append(flushing)
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
            if peering is not None:
                await peering.aclose()
            # Published builds still flushing: finish them if the grace allows (unfinished ones stay unmarked and
            # are re-verified after a reboot, never served unchecked).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fetcher.drain(), timeout=settings.shutdown_grace_seconds)
            with contextlib.suppress(OSError):  # ours (start-up refuses a live one): no stale socket left behind
                settings.control_socket.unlink()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    log.info("stopped")
    return exit_code


def _count_fetched(n: int, source: str) -> None:
    metrics.FETCH_BYTES.labels(source=source).inc(n)


def _log_flush_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("flushing earlier builds failed (they are re-verified after a reboot): %r", task.exception())


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


async def _watch(settings: AgentSettings, reconciler: Reconciler, kube_api: KubeApi | None) -> None:
    if kube_api is None:
        from agent.cluster.podsfile import watch_pods_file

        assert settings.pods_file is not None
        await watch_pods_file(settings.pods_file, on_list=reconciler.replace_all,
                              interval=settings.file_poll_interval)
        return
    from agent.cluster.kube import watch_pods
    from agent.cluster.pods import PodInfo

    async def on_event(etype: str, pod: PodInfo) -> None:
        if etype == "DELETED":
            await reconciler.delete(pod.uid)
        else:
            await reconciler.upsert(pod)

    await watch_pods(kube_api, on_list=reconciler.replace_all, on_event=on_event,
                     reconnect_max_delay=settings.reconnect_max_delay)


async def _policy_loop(settings: AgentSettings, policies: PolicyHolder, reconciler: Reconciler,
                       kube: KubeReporter | None) -> None:
    while True:
        await asyncio.sleep(settings.file_poll_interval)
        if await asyncio.to_thread(policies.reload_if_changed):
            await reconciler.policy_changed()
            warm = await _resolve_warm(settings, policies.policy, reconciler.reporter, kube)
            reconciler.demand_warm(warm)


async def _resolve_warm(settings: AgentSettings, policy: Policy, reporter: Reporter,
                        kube: KubeReporter | None) -> list[ModelUri]:
    """The warm set for this node's labels, retried with capped backoff until the labels can be read.

    Every failed read is a Warning Event ``WarmSetUnresolved`` on the node (repeats aggregate into one Event's
    count) and sets ``weightcache_warm_set_unresolved`` to 1: never a silently empty warm set.
    """
    if not policy.warm:
        metrics.WARM_SET_UNRESOLVED.set(0)
        return []
    if kube is None:
        labels = _parse_labels(settings.node_labels)
    else:
        from agent.cluster.kube import backoff_delay, describe_api_error

        failures = 0
        while True:
            try:
                labels = await kube.node_labels()
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - API down, RBAC, timeouts: reported, then retried
                failures += 1
                metrics.WARM_SET_UNRESOLVED.set(1)
                delay = backoff_delay(failures, settings.reconnect_max_delay)
                msg = (f"cannot resolve this node's warm set: reading node {settings.node_name} failed "
                       f"({describe_api_error(e)}); retrying until it can be read")
                log.warning("%s (attempt %d, next in %.1fs)", msg, failures, delay)
                await reporter.node_event(type=WARNING, reason="WarmSetUnresolved", message=msg)
                await asyncio.sleep(delay)
        if failures:
            log.info("warm set resolved after %d failed reads of the node", failures)
    metrics.WARM_SET_UNRESOLVED.set(0)
    models = policy.warm_models(labels)
    if models:
        log.info("warm set for this node: %s", ", ".join(m.uri for m in models))
    return models


async def _warm_up(settings: AgentSettings, policy: Policy, reconciler: Reconciler, reporter: Reporter,
                   kube: KubeReporter | None) -> None:
    """Prefetch the warm set; then lift the startup taint (or at the deadline, with a Warning Event)."""
    deadline = asyncio.get_running_loop().time() + policy.warm_deadline_seconds
    resolving = asyncio.create_task(_resolve_warm(settings, policy, reporter, kube), name="warm-set-resolve")
    try:
        done, _ = await asyncio.wait({resolving}, timeout=policy.warm_deadline_seconds)
        ids: list[str] = []
        ready = False
        if resolving in done:
            ids = reconciler.demand_warm(resolving.result())
            remaining = deadline - asyncio.get_running_loop().time()
            ready = await reconciler.wait_ready(ids, timeout=max(remaining, 0.0))
        if ready and ids:
            log.info("warm set ready (%d models)", len(ids))
        elif not ready:
            what = "not ready" if resolving.done() else "not resolved (the node's labels cannot be read)"
            msg = (f"warm set {what} after {policy.warm_deadline_seconds:.0f}s (warmDeadlineSeconds); "
                   "removing the startup taint anyway")
            log.warning(msg)
            await reporter.node_event(type=WARNING, reason="WarmDeadlineExceeded", message=msg)
        if kube is not None:
            await kube.remove_startup_taint()  # reads the node itself; retried until done
        if not resolving.done():
            reconciler.demand_warm(await resolving)  # late, but the node still gets its warm set
    finally:
        if not resolving.done():
            resolving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await resolving
