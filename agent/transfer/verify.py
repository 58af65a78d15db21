"""Re-check every cached file against its recorded digest, and repair what is bad by building the model again.

Builds are immutable, so a repair never edits one: the bad blobs are forgotten (their names unlinked, so nothing
reuses them), and the model is built again — good files linked from the cache, bad ones downloaded — then swapped
in like any publish. Readers of the damaged build keep it until they let go. If S3 now holds a different
revision, that revision is what gets built; if the model cannot be fetched, it is unpublished instead.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from agent.errors import WeightcacheError
from agent.store.cache import Cache
from agent.store.maintenance import check_build, forget_blobs, unpublish
from agent.transfer.fetch import Fetcher

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Problem:
    uri: str
    path: str
    detail: str
    repaired: bool = False


async def verify(cache: Cache, fetcher: Fetcher | None, *, uris: set[str] | None = None) -> list[Problem]:
    """Check every model (or those in ``uris``); repair with ``fetcher`` when given. Returns what was wrong."""
    problems: list[Problem] = []
    for m in await asyncio.to_thread(cache.list_manifests):
        if uris and m.uri not in uris:
            continue
        build = cache.root / m.snapshot  # resolved once: every file is read from this one build
        bad = await asyncio.to_thread(check_build, cache, build, m)
        for f, detail in bad:
            log.warning("verify: %s: %s: %s", m.uri, f.path, detail)
        if not bad:
            continue
        repaired = False
        await asyncio.to_thread(forget_blobs, cache, {f.xxh3_128 for f, _ in bad})
        if fetcher is not None:
            try:
                await fetcher.ensure(m.model_uri, force=True)
                repaired = True
                log.info("verify: repaired %s (%d files fetched again)", m.uri, len(bad))
            except WeightcacheError as e:
                log.error("verify: could not repair %s: %s; unpublishing it", m.uri, e)
                async with cache.model_lock(m.model_id):
                    await asyncio.to_thread(unpublish, cache, m.model_id)
        problems.extend(Problem(m.uri, f.path, detail, repaired) for f, detail in bad)
    return problems


__all__ = ["Problem", "verify"]
