"""Keep the cache under its byte budget and above its free-space floor: plan, log the plan, then execute it.

Least-recently-used models go first. A model is never evicted while it is pinned (a pod on the node wants it:
the daemon's pins, in memory and in ``state/pins.json`` for other processes) or locked (being fetched). Removal
deletes pointers before blobs (see :func:`agent.store.maintenance.remove_model`), so a reader never follows a
pointer into nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.config import AgentSettings
from agent.errors import BudgetExceededError, DiskFullError
from agent.store.cache import Cache
from agent.store.maintenance import remove_model, remove_old_revisions
from common.units import format_size

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EvictionItem:
    model_id: str
    uri: str
    bytes_freed: int
    last_used: str


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    """What will be evicted and why; immutable, logged before anything is deleted."""

    need_bytes: int
    used_bytes: int
    max_bytes: int
    free_bytes: int
    min_free_bytes: int
    deficit_bytes: int
    items: tuple[EvictionItem, ...]
    skipped_pinned: tuple[str, ...]

    @property
    def bytes_freed(self) -> int:
        return sum(i.bytes_freed for i in self.items)

    @property
    def shortfall(self) -> int:
        return max(0, self.deficit_bytes - self.bytes_freed)

    def describe(self) -> str:
        what = ", ".join(f"{i.uri} ({format_size(i.bytes_freed)}, last used {i.last_used})" for i in self.items)
        return (f"need {format_size(self.need_bytes)}, used {format_size(self.used_bytes)} of "
                f"{format_size(self.max_bytes) if self.max_bytes else 'no budget'}, free "
                f"{format_size(self.free_bytes)} (floor {format_size(self.min_free_bytes)}); evict: "
                f"{what or 'nothing'}; pinned and kept: {len(self.skipped_pinned)}")


def _unique_bytes(cache: Cache) -> dict[str, int]:
    """Per model: bytes of blobs that only it references (what evicting it frees)."""
    manifests = cache.list_manifests()
    owners: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    for m in manifests:
        for f in m.files:
            owners.setdefault(f.xxh3_128, set()).add(m.model_id)
            sizes[f.xxh3_128] = f.size
    out = {m.model_id: 0 for m in manifests}
    for digest, who in owners.items():
        if len(who) == 1:
            out[next(iter(who))] += sizes[digest]
    return out


def plan_eviction(cache: Cache, *, need_bytes: int, max_bytes: int, min_free_bytes: int,
                  pinned: set[str]) -> EvictionPlan:
    """Choose the least-recently-used unpinned models whose removal covers the deficit."""
    used = cache.used_bytes()
    free = cache.free_bytes()
    deficit = 0
    if max_bytes:
        deficit = max(deficit, used + need_bytes - max_bytes)
    deficit = max(deficit, need_bytes + min_free_bytes - free)
    items: list[EvictionItem] = []
    skipped: list[str] = []
    if deficit > 0:
        unique = _unique_bytes(cache)
        freed = 0
        for m in sorted(cache.list_manifests(), key=lambda m: m.last_used):
            if freed >= deficit:
                break
            if m.model_id in pinned or cache.is_locked(m.model_id):
                skipped.append(m.uri)
                continue
            items.append(EvictionItem(m.model_id, m.uri, unique.get(m.model_id, 0), m.last_used))
            freed += unique.get(m.model_id, 0)
    return EvictionPlan(need_bytes=need_bytes, used_bytes=used, max_bytes=max_bytes, free_bytes=free,
                        min_free_bytes=min_free_bytes, deficit_bytes=max(deficit, 0), items=tuple(items),
                        skipped_pinned=tuple(skipped))


def execute_plan(cache: Cache, plan: EvictionPlan) -> int:
    """Evict the plan's models (each under its model lock, skipping any that became busy). Returns bytes freed."""
    freed = 0
    for item in plan.items:
        with cache.try_model_lock(item.model_id) as got:
            if not got:
                log.info("not evicting %s: a fetch of it started meanwhile", item.uri)
                continue
            if item.model_id in cache.read_pins():
                log.info("not evicting %s: pinned meanwhile", item.uri)
                continue
            n = remove_model(cache, item.model_id)
            freed += n
            log.info("evicted %s (%s freed)", item.uri, format_size(n))
            _record_eviction(n)
    return freed


def _record_eviction(nbytes: int) -> None:
    from agent import metrics

    metrics.EVICTIONS.inc()
    metrics.EVICTED_BYTES.inc(nbytes)


def make_room(cache: Cache, *, need_bytes: int, settings: AgentSettings, pinned: set[str],
              for_uri: str = "") -> EvictionPlan:
    """Ensure ``need_bytes`` more fit; evict LRU models if needed; raise if they cannot fit at all."""
    max_bytes = settings.max_bytes
    if max_bytes and need_bytes > max_bytes:
        raise BudgetExceededError(
            f"{for_uri or 'model'} needs {format_size(need_bytes)}, more than the whole cache budget "
            f"({format_size(max_bytes)}, WEIGHTCACHE_MAX_BYTES)")
    remove_old_revisions(cache, grace_seconds=settings.old_revision_grace_seconds)
    pinned = pinned | cache.read_pins()
    plan = plan_eviction(cache, need_bytes=need_bytes, max_bytes=max_bytes,
                         min_free_bytes=settings.min_free_bytes, pinned=pinned)
    if plan.deficit_bytes <= 0:
        return plan
    log.info("eviction plan for %s: %s", for_uri or "gc", plan.describe())
    if plan.shortfall > 0:
        kind = BudgetExceededError if max_bytes and plan.used_bytes + need_bytes - max_bytes >= plan.deficit_bytes \
            else DiskFullError
        raise kind(f"{for_uri or 'cache'}: cannot make room for {format_size(need_bytes)}: "
                   f"{plan.describe()}; still short by {format_size(plan.shortfall)}")
    execute_plan(cache, plan)
    return plan
