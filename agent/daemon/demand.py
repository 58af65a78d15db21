"""Desired state: which pods on this node want which models, and the loop that makes those models ready.

A pod's annotation becomes demands (pod, model). A demand first seen counts one ``hit`` (the model was already
ready on the node) or ``miss``. Models whose demand is a miss queue for fetching (pod demands before warm-set
ones), with one fetch per model however many pods want it; hits skip the queue and are confirmed at once. Every
model a live pod wants is pinned against eviction, and unpinned when its last pod goes. Pods hear how it went
through the :class:`~agent.cluster.reporting.Reporter` (Events, readiness-gate condition); the node hears which models
are ready. A fetch that crashes is reported and retried with backoff; it never takes the daemon down.

Threads: the reconciler's dicts live on the event loop and are never iterated from a worker thread. What threads
need (the pinned set, for eviction) is an immutable snapshot, replaced whole on the loop. Cache calls that touch
the disk (lookups, listing manifests, writing pins) run in threads, never on the loop.

The node's labels follow the set of ready models: a change is signalled (:meth:`Reconciler.cache_changed`) by the
paths that publish or evict (a fetch finishing, the control socket's prefetch and evict, maintenance), and the
node reporter re-reads the cache only then — plus every ``node_resync_seconds`` (30 s), for what other processes
change without telling the daemon (``weightcache-agent gc`` on the node).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent import metrics
from agent.cluster.pods import PodInfo
from agent.cluster.policy import Policy
from agent.cluster.reporting import NORMAL, WARNING, Reporter
from agent.config import AgentSettings
from agent.daemon.nodestate import NodeState
from agent.daemon.pins import Pins
from agent.errors import InvalidUriError, OverlappingModelError, PolicyDeniedError, WeightcacheError
from agent.store.cache import Cache
from agent.transfer.fetch import Fetcher, FetchResult
from agent.uris import ModelUri, parse_annotation
from common.units import format_size

log = logging.getLogger(__name__)

POD_PRIORITY, WARM_PRIORITY = 0, 1
#: Errors that another try will not fix: reported once, not retried.
PERMANENT_ERRORS = (InvalidUriError, OverlappingModelError, PolicyDeniedError)
RETRY_BASE_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0
GATE_REASONS = {"ready": "WeightsReady", "failed": "WeightsFailed", "fetching": "WeightsFetching",
                "rejected": "WeightsRejected"}


@dataclass
class ModelEntry:
    """The agent's view of one model: its state, who waits for it, the last outcome."""

    uri: ModelUri
    state: str = "pending"  # pending | fetching | ready | failed
    waiters: set[str] = field(default_factory=set)  # pod uids
    warm: bool = False
    queued: bool = False
    attempts: int = 0
    result: FetchResult | None = None
    error: str = ""
    error_reason: str = ""
    retry_handle: asyncio.TimerHandle | None = None


@dataclass
class PodDemand:
    pod: PodInfo
    models: dict[str, ModelUri] = field(default_factory=dict)  # model_id → uri (allowed, valid)
    rejected: list[str] = field(default_factory=list)  # messages (invalid or denied)
    seen_at: dict[str, float] = field(default_factory=dict)  # model_id → when the demand was first seen
    results: dict[str, str] = field(default_factory=dict)  # model_id → "hit" | "miss"
    told_ready: dict[str, str] = field(default_factory=dict)  # model_id → revision the pod was told is ready
    last_condition: tuple[bool, str] | None = None


class Reconciler:
    """Turns pod demands into ready models. All methods run on the event loop; none blocks it for long."""

    def __init__(self, *, settings: AgentSettings, cache: Cache, fetcher: Fetcher, reporter: Reporter,
                 policy: Callable[[], Policy], model_workers: int = 4, pins: Pins | None = None) -> None:
        self.settings = settings
        self.cache = cache
        self.fetcher = fetcher
        self.reporter = reporter
        self._policy = policy
        self._pods: dict[str, PodDemand] = {}
        self._models: dict[str, ModelEntry] = {}
        self._queue: asyncio.PriorityQueue[tuple[int, int, str]] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._model_workers = model_workers
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self.pins = pins if pins is not None else Pins()  # the fetcher reads the same one (see agent.daemon.pins)
        self._written_pins: frozenset[str] | None = None
        self._pins_lock = asyncio.Lock()
        self.node = NodeState(settings=settings, cache=cache, reporter=reporter, pins=self.pins)
        self.synced = False

    # ----- lifecycle -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the fetch workers and the node reporter until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for i in range(self._model_workers):
                tg.create_task(self._worker(), name=f"model-worker-{i}")
            tg.create_task(self.node.run(), name="node-reporter")

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for m in self._models.values():
            if m.retry_handle:
                m.retry_handle.cancel()

    def pinned_model_ids(self) -> set[str]:
        """Models a live pod wants. Safe from any thread: a copy of a snapshot the loop replaces whole."""
        return self.pins.ids()

    def cache_changed(self) -> None:
        """Something may have published or evicted a model: the node reporter re-reads the cache at once."""
        self.node.changed()

    # ----- pod events ----------------------------------------------------------------------------------

    async def replace_all(self, pods: Iterable[PodInfo]) -> None:
        """A full listing (start-up or relist after 410): upsert all, delete those no longer there."""
        fresh = {p.uid: p for p in pods}
        for uid in [u for u in self._pods if u not in fresh]:
            await self.delete(uid)
        for p in fresh.values():
            await self.upsert(p)
        self.synced = True

    async def upsert(self, pod: PodInfo) -> None:
        if not pod.active:
            await self.delete(pod.uid)
            return
        demand = self._pods.get(pod.uid)
        if demand is not None and demand.pod.annotation == pod.annotation:
            demand.pod = pod
            await self._update_condition(demand)
            return
        if demand is None:
            demand = PodDemand(pod=pod)
            self._pods[pod.uid] = demand
        demand.pod = pod
        await self._apply_annotation(demand)

    async def delete(self, uid: str) -> None:
        demand = self._pods.pop(uid, None)
        if demand is None:
            return
        for mid in demand.models:
            entry = self._models.get(mid)
            if entry is not None:
                entry.waiters.discard(uid)
        await self._sync_pins()
        self._gc_models()

    async def policy_changed(self) -> None:
        """Re-evaluate every pod's demands under the new policy."""
        for demand in list(self._pods.values()):
            await self._apply_annotation(demand)

    # ----- warm set ------------------------------------------------------------------------------------

    def demand_warm(self, uris: Iterable[ModelUri]) -> list[str]:
        """Queue the warm set (after pod demands). Returns the model ids to wait for."""
        ids = []
        for uri in uris:
            entry = self._entry(uri)
            entry.warm = True
            ids.append(uri.model_id)
            if entry.state != "ready":
                self._enqueue(entry, WARM_PRIORITY)
        return ids

    async def wait_ready(self, model_ids: list[str], *, timeout: float) -> bool:
        """True once every model is ready; False on timeout (failures keep it waiting, as retries may fix them)."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._models.get(m) and self._models[m].state == "ready" for m in model_ids):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))

    # ----- status ----------------------------------------------------------------------------------------

    def models_status(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for m in self._models.values():
            r = m.result
            out.append({"uri": m.uri.uri, "state": m.state, "waiters": len(m.waiters), "warm": m.warm,
                        "bytes": r.total_bytes if r else None, "path": str(r.path) if r else None,
                        "error": m.error or None})
        return out

    # ----- internals -------------------------------------------------------------------------------------

    async def _apply_annotation(self, demand: PodDemand) -> None:
        pod = demand.pod
        parsed = parse_annotation(pod.annotation or "") if pod.annotation is not None else None
        wanted: dict[str, ModelUri] = {}
        rejected: list[str] = []
        if parsed is not None:
            for err in parsed.errors:
                rejected.append(err)
                metrics.POLICY_REJECTIONS.labels(reason="InvalidURI").inc()
                await self.reporter.pod_event(pod, type=WARNING, reason="InvalidModelURI",
                                              message=f"weightcache.io/models: {err}")
            policy = self._policy()
            for uri in parsed.uris:
                if not policy.allows(pod.namespace, uri):
                    msg = f"{uri} is not allowed for namespace {pod.namespace} by the weightcache policy"
                    rejected.append(msg)
                    metrics.POLICY_REJECTIONS.labels(reason="PolicyDenied").inc()
                    await self.reporter.pod_event(pod, type=WARNING, reason="PolicyDenied", message=msg)
                    continue
                wanted[uri.model_id] = uri
        demand.rejected = rejected
        old = demand.models
        demand.models = wanted
        for mid in old.keys() - wanted.keys():
            entry = self._models.get(mid)
            if entry:
                entry.waiters.discard(pod.uid)
        for mid, uri in wanted.items():
            entry = self._entry(uri)
            entry.waiters.add(pod.uid)
            if mid not in demand.seen_at:
                demand.seen_at[mid] = time.monotonic()
                await self._count_demand(demand, entry)
        await self._sync_pins()
        self._gc_models()
        await self._update_condition(demand)

    async def _count_demand(self, demand: PodDemand, entry: ModelEntry) -> None:
        mid = entry.uri.model_id
        try:
            ready = await asyncio.to_thread(self.cache.lookup, entry.uri)
        except WeightcacheError:
            ready = None
        result = "hit" if ready is not None else "miss"
        demand.results[mid] = result
        metrics.CACHE_REQUESTS.labels(result=result).inc()
        if entry.state == "fetching" or entry.queued:
            if result == "miss":
                await self.reporter.pod_event(demand.pod, type=NORMAL, reason="WeightsFetching",
                                              message=f"fetching {entry.uri} (already in progress on this node)")
            return
        if ready is not None:
            self._spawn(self._process(entry), name=f"confirm {entry.uri}")
        else:
            self._enqueue(entry, POD_PRIORITY)

    def _entry(self, uri: ModelUri) -> ModelEntry:
        entry = self._models.get(uri.model_id)
        if entry is None:
            entry = ModelEntry(uri=uri)
            self._models[uri.model_id] = entry
        return entry

    def _enqueue(self, entry: ModelEntry, priority: int) -> None:
        if entry.queued or entry.state == "fetching":
            return
        entry.queued = True
        entry.state = "pending"
        self._queue.put_nowait((priority, next(self._seq), entry.uri.model_id))
        self._refresh_gauges()

    def _spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _worker(self) -> None:
        while True:
            _prio, _seq, mid = await self._queue.get()
            entry = self._models.get(mid)
            if entry is None:
                continue
            entry.queued = False
            if not entry.waiters and not entry.warm:
                entry.state = "pending"
                continue
            try:
                await self._process(entry)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one model take the worker (and the daemon) down
                log.exception("unexpected error processing %s", entry.uri)

    async def _process(self, entry: ModelEntry) -> None:
        uri = entry.uri
        entry.state = "fetching"
        self._refresh_gauges()
        for uid in list(entry.waiters):
            d = self._pods.get(uid)
            if d and d.results.get(uri.model_id) == "miss" and uri.model_id not in d.told_ready:
                await self.reporter.pod_event(d.pod, type=NORMAL, reason="WeightsFetching",
                                              message=f"fetching {uri} from S3")
                await self._update_condition(d)
        metrics.FETCH_IN_PROGRESS.inc()
        try:
            result = await self.fetcher.ensure(uri)
        except Exception as e:
            reason = e.reason if isinstance(e, WeightcacheError) else "InternalError"
            if not isinstance(e, WeightcacheError):
                log.exception("fetch of %s crashed", uri)
            entry.state, entry.error, entry.error_reason = "failed", str(e), reason
            entry.attempts += 1
            metrics.FETCH_FAILURES.labels(reason=reason).inc()
            log.warning("%s failed (%s): %s", uri, reason, e)
            for uid in list(entry.waiters):
                d = self._pods.get(uid)
                if d:
                    await self.reporter.pod_event(d.pod, type=WARNING, reason="WeightsFailed",
                                                  message=f"{uri}: {reason}: {e}"[:1000])
                    await self._update_condition(d)
            self._schedule_retry(entry, e)
            return
        finally:
            metrics.FETCH_IN_PROGRESS.dec()
            self._changed.set()
        entry.state, entry.result, entry.error, entry.error_reason, entry.attempts = "ready", result, "", "", 0
        if not result.hit:
            metrics.FETCH_DURATION.observe(result.seconds)
        if not result.hit or uri.uri not in self.node.ready:
            self.cache_changed()  # published here, or by another process (a CLI prefetch) since the last look
        for uid in list(entry.waiters):
            d = self._pods.get(uid)
            if d is None or d.told_ready.get(uri.model_id) == result.revision:
                continue  # this pod already heard that this revision is ready
            how = d.results.get(uri.model_id, "hit")
            if result.hit:
                detail = f"cache {how}, checked in {result.seconds:.3f}s"
            else:
                rate = result.downloaded_bytes / result.seconds if result.seconds > 0 else 0.0
                detail = (f"cache {how}, fetched {format_size(result.downloaded_bytes)} in {result.seconds:.2f}s "
                          f"({format_size(rate)}/s; {format_size(result.peer_bytes)} from peers)")
            await self.reporter.pod_event(
                d.pod, type=NORMAL, reason="WeightsReady",
                message=f"{uri} ready at {result.path} ({format_size(result.total_bytes)}; {detail})")
            if uri.model_id not in d.told_ready:
                seen = d.seen_at.get(uri.model_id)
                if seen is not None:
                    metrics.HIT_LATENCY.observe(time.monotonic() - seen)
            d.told_ready[uri.model_id] = result.revision
            await self._update_condition(d)
        self._refresh_gauges()

    def _schedule_retry(self, entry: ModelEntry, error: BaseException) -> None:
        if isinstance(error, PERMANENT_ERRORS):
            return
        delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (entry.attempts - 1))
        loop = asyncio.get_running_loop()

        def again() -> None:
            entry.retry_handle = None
            if entry.waiters or entry.warm:
                self._enqueue(entry, POD_PRIORITY if entry.waiters else WARM_PRIORITY)

        if entry.retry_handle:
            entry.retry_handle.cancel()
        entry.retry_handle = loop.call_later(delay, again)
        log.info("will retry %s in %.0fs", entry.uri, delay)

    async def _update_condition(self, demand: PodDemand) -> None:
        if not demand.pod.has_gate:
            return
        states = [self._models[mid].state if mid in self._models else "pending" for mid in demand.models]
        if demand.rejected and not demand.models:
            ready, key = False, "rejected"
            message = "; ".join(demand.rejected)[:1000]
        elif states and all(s == "ready" for s in states):
            ready, key = True, "ready"
            message = f"{len(states)} model(s) ready"
        elif any(s == "failed" for s in states):
            ready, key = False, "failed"
            failed = [self._models[m] for m in demand.models if self._models[m].state == "failed"]
            message = "; ".join(f"{m.uri}: {m.error_reason}" for m in failed)[:1000]
        elif not states:
            ready, key, message = True, "ready", "no models requested"
        else:
            ready, key = False, "fetching"
            message = f"{sum(s == 'ready' for s in states)}/{len(states)} model(s) ready"
        reason = GATE_REASONS[key]
        if demand.last_condition == (ready, reason):
            return
        demand.last_condition = (ready, reason)
        try:
            await self.reporter.pod_condition(demand.pod, ready=ready, reason=reason, message=message)
        except Exception as e:  # noqa: BLE001 - the pod may be gone; the next change retries
            demand.last_condition = None
            log.warning("cannot set the readiness condition on %s: %s", demand.pod.key, e)

    async def _sync_pins(self) -> None:
        """Snapshot the pinned set (at once, for this process's eviction) and write it for other processes.

        Writers queue on a lock and each writes the newest snapshot, so the file never goes back to an older set
        however the threads finish; the write (a temp file, maybe an fsync, a rename) runs in a thread.
        """
        self.pins.replace(mid for mid, m in self._models.items() if m.waiters)
        async with self._pins_lock:
            pins = self.pins.snapshot()
            if pins == self._written_pins:
                return
            try:
                await asyncio.to_thread(self.cache.write_pins, set(pins))
                self._written_pins = pins
            except (WeightcacheError, OSError) as e:
                log.error("cannot write pins: %s", e)

    def _gc_models(self) -> None:
        """Forget models nobody wants any more (their cache files stay, evictable)."""
        for mid in [m for m, e in self._models.items()
                    if not e.waiters and not e.warm and not e.queued and e.state != "fetching"]:
            entry = self._models.pop(mid)
            if entry.retry_handle:
                entry.retry_handle.cancel()
        self._refresh_gauges()

    def _refresh_gauges(self) -> None:
        counts = dict.fromkeys(metrics.MODEL_STATES, 0)
        for e in self._models.values():
            counts[e.state] = counts.get(e.state, 0) + 1
        counts["rejected"] = sum(len(d.rejected) for d in self._pods.values())
        for state, n in counts.items():
            metrics.MODELS.labels(state=state).set(n)
