"""What the node is told about its cache, and the housekeeping that keeps the cache in shape.

The node's model labels and annotation say which models are ready here (the scheduler and operators read them);
they are patched when the set may have changed — a fetch published, an eviction, another process — debounced, and
re-derived from the cache every ``node_resync_seconds`` anyway. The same loop runs the periodic maintenance
(replaced revisions past their grace, orphan blobs, the byte budget) and refreshes the cache gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from agent import metrics
from agent.cluster.reporting import Reporter
from agent.config import AgentSettings
from agent.daemon.pins import Pins
from agent.errors import WeightcacheError
from agent.store.cache import Cache
from common.units import format_size

log = logging.getLogger(__name__)

#: Housekeeping (replaced revisions, orphan blobs, budget) runs this often; it only stats and unlinks.
MAINTENANCE_INTERVAL_SECONDS = 300.0
#: After a signal, wait this long for more (a burst of models finishing together is one node patch).
NODE_DEBOUNCE_SECONDS = 0.2
#: A failed node patch is retried after a backoff growing to this (the node may be unreachable for a while).
NODE_RETRY_MAX_SECONDS = 30.0


class NodeState:
    """Keeps the node's labels in step with the cache; runs the cache's maintenance."""

    def __init__(self, *, settings: AgentSettings, cache: Cache, reporter: Reporter, pins: Pins) -> None:
        self.settings, self.cache, self.reporter, self.pins = settings, cache, reporter, pins
        self._changed = asyncio.Event()  # the set of ready models may differ: re-label the node
        self._changed.set()  # the first round labels the node
        self.ready: frozenset[str] = frozenset()  # the URIs the node was last told are ready

    def changed(self) -> None:
        """Something may have published or evicted a model: re-read the cache at once."""
        self._changed.set()

    async def run(self) -> None:
        """Tell the node which models are ready (labels + annotation) when that set may have changed.

        Woken by :meth:`cache_changed` (debounced) or every ``node_resync_seconds``; the cache is read in a
        thread. A failed patch is retried with backoff until it goes through. Also runs the periodic maintenance
        and keeps the cache gauges fresh.
        """
        last: list[str] | None = None
        failures = 0
        next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL_SECONDS
        while True:
            wait = self.settings.node_resync_seconds
            if failures:
                wait = min(NODE_RETRY_MAX_SECONDS, 0.5 * 2.0 ** min(failures, 10))
            wait = min(wait, max(next_maintenance - time.monotonic(), 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=wait)
                await asyncio.sleep(NODE_DEBOUNCE_SECONDS)
            self._changed.clear()
            if time.monotonic() >= next_maintenance:
                next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL_SECONDS
                try:
                    await asyncio.to_thread(self._maintenance, self.pins.snapshot())
                except Exception as e:  # noqa: BLE001 - housekeeping must never stop the loop
                    log.warning("cache maintenance failed: %s", e)
            try:
                ready = await asyncio.to_thread(self._ready_uris)
                if ready != last or failures:
                    await self.reporter.node_models(ready)
                    last, self.ready = ready, frozenset(ready)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the API may be down: retried with backoff
                failures += 1
                log.warning("cannot update node model labels (attempt %d): %s", failures, e)
            try:
                await asyncio.to_thread(self._update_cache_gauges)
            except Exception as e:  # noqa: BLE001 - a gauge must never stop the loop
                log.warning("cannot read cache usage: %s", e)

    def _maintenance(self, pinned: frozenset[str]) -> None:
        """Drop replaced revisions past their grace, orphan blobs, and anything over the budget (LRU first).

        Runs in a worker thread: it gets the pinned set as an argument and touches none of the loop's state.
        """
        from agent.store.eviction import make_room

        self.cache.remove_old_revisions(min_age_seconds=self.settings.old_revision_grace_seconds)
        freed = self.cache.sweep_orphan_blobs()
        if freed:
            log.info("maintenance: removed orphan blobs (%s)", format_size(freed))
        make_room(self.cache, need_bytes=0, settings=self.settings, pinned=set(pinned), for_uri="maintenance")

    def _ready_uris(self) -> list[str]:
        out = []
        for m in self.cache.list_manifests():
            try:
                if self.cache.lookup(m.model_uri) is not None:
                    out.append(m.uri)
            except WeightcacheError:
                continue
        return sorted(out)

    def _update_cache_gauges(self) -> None:
        used = self.cache.used_bytes()
        metrics.CACHE_BYTES_USED.set(used)
        cap = self.settings.max_bytes or max(used + self.cache.free_bytes() - self.settings.min_free_bytes, 0)
        metrics.CACHE_BYTES_CAPACITY.set(cap)
