"""Re-check every cached file against its recorded xxh3-128, and repair what is bad by fetching it again.

A repair never unpublishes a good model: the bad file is downloaded again, checked against the digest in the
manifest, and swapped in with ``os.replace`` (readers that opened the old file keep it). If S3 now holds different
bytes (the object changed), the model is unpublished instead, so the next demand fetches the new revision whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from agent.cache import Cache
from agent.errors import IntegrityError, WeightcacheError
from agent.fetch import Fetcher
from agent.manifest import Manifest, ManifestFile, PlannedFile, hash_file

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Problem:
    uri: str
    path: str
    detail: str
    repaired: bool = False


def check_model(cache: Cache, m: Manifest) -> list[tuple[ManifestFile, str]]:
    """The files of one model whose bytes are missing, of the wrong size, or of the wrong digest."""
    bad: list[tuple[ManifestFile, str]] = []
    snap = cache.root / m.snapshot
    for f in m.files:
        p = snap / f.path
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            bad.append((f, "missing"))
            continue
        if size != f.size:
            bad.append((f, f"size {size} != {f.size}"))
            continue
        digest = hash_file(p)
        if digest != f.xxh3_128:
            bad.append((f, f"xxh3 {digest} != {f.xxh3_128}"))
    return bad


async def verify(cache: Cache, fetcher: Fetcher | None, *, uris: set[str] | None = None) -> list[Problem]:
    """Check every model (or those in ``uris``); repair with ``fetcher`` when given. Returns what was wrong."""
    problems: list[Problem] = []
    for m in cache.list_manifests():
        if uris and m.uri not in uris:
            continue
        bad = await asyncio.to_thread(check_model, cache, m)
        for f, detail in bad:
            log.warning("verify: %s: %s: %s", m.uri, f.path, detail)
        if not bad:
            continue
        repaired = False
        if fetcher is not None:
            try:
                async with cache.model_lock(m.model_id):
                    await _repair(cache, fetcher, m, [f for f, _ in bad])
                repaired = True
            except WeightcacheError as e:
                log.error("verify: could not repair %s: %s; unpublishing it", m.uri, e)
                await asyncio.to_thread(_unpublish, cache, m)
        problems.extend(Problem(m.uri, f.path, detail, repaired) for f, detail in bad)
    return problems


async def _repair(cache: Cache, fetcher: Fetcher, m: Manifest, bad: list[ManifestFile]) -> None:
    model = m.model_uri
    staging = cache.root / "tmp" / f"repair-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        for f in bad:
            with cache.blob_lock(), contextlib.suppress(FileNotFoundError):
                cache.blob_path(f.xxh3_128).unlink()  # the damaged inode stays only where readers hold it
            planned = PlannedFile(relpath=f.path, key=f.key, size=f.size, etag=f.etag)
            entry = await fetcher._fetch_file(model, f"repair-{m.revision}", planned, staging, None)
            if entry.xxh3_128 != f.xxh3_128:
                raise IntegrityError(f"{m.uri}: {f.path} changed in S3 (digest {entry.xxh3_128})")
            _swap_in(cache, staging / f.path, f.xxh3_128)
            log.info("verify: repaired %s: %s", m.uri, f.path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        cache.journal_clear(m.model_id, f"repair-{m.revision}")


def _swap_in(cache: Cache, fresh: Path, digest: str) -> None:
    """Point every snapshot file with this digest at the fresh inode, atomically per file."""
    for other in cache.list_manifests():
        for f in other.files:
            if f.xxh3_128 != digest:
                continue
            dest = cache.root / other.snapshot / f.path
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.repair")
            os.link(fresh, tmp)
            os.replace(tmp, dest)


def _unpublish(cache: Cache, m: Manifest) -> None:
    pointer = cache.root / m.path
    with contextlib.suppress(FileNotFoundError):
        pointer.unlink()
    with contextlib.suppress(FileNotFoundError):
        cache.manifest_path(m.model_id).unlink()
