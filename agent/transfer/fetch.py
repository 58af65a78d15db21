"""Make one model ready: list it, link what the cache already holds, make room, download the rest
(:mod:`agent.transfer.download`), and publish the build — one fetch per model at a time, across tasks and processes.

Durability is not on this path: a model is published as soon as it is verified, and its build is flushed to disk
in the background afterwards (:meth:`Fetcher.drain`), then marked durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from agent.config import AgentSettings
from agent.errors import (
    BudgetExceededError,
    ObjectChangedError,
    ObjectNotFoundError,
    OverlappingModelError,
    S3Error,
    WeightcacheError,
)
from agent.store.cache import Cache, Lookup
from agent.store.eviction import make_room
from agent.store.maintenance import flush_build
from agent.store.manifest import Manifest, ManifestFile, PlannedFile, source_id
from agent.store.publish import Build, journal_clear, journal_read
from agent.transfer.aiotools import gather_all, in_thread
from agent.transfer.download import Downloader, ModelJob, ProgressFn
from agent.transfer.listing import Listing, list_model
from agent.transfer.s3 import S3Client
from agent.transfer.sourceboard import SourceBoard
from agent.uris import ModelUri, parse_model_uri

if TYPE_CHECKING:
    from agent.transfer.swarm import Swarm

log = logging.getLogger(__name__)

#: A model whose objects keep changing under us is re-listed this many times before the fetch fails.
MAX_RELISTS = 3


@runtime_checkable
class TotalAware(Protocol):
    """A progress callback that is also told each model's total bytes (:class:`agent.transfer.progress.Progress`)."""

    def add_total(self, n: int) -> None: ...


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What a demand for one model came to."""

    uri: str
    path: Path
    model_id: str
    revision: str
    total_bytes: int
    downloaded_bytes: int
    seconds: float
    hit: bool
    peer_bytes: int = 0  # of downloaded_bytes, those that came from other agents


class Fetcher:
    """Fetches models into a :class:`Cache`; one fetch per model at a time, across tasks and processes."""

    def __init__(self, settings: AgentSettings, cache: Cache, s3: S3Client, *,
                 pinned: Callable[[], set[str]] | None = None,
                 on_bytes: Callable[[int, str], None] | None = None,
                 flush_in_background: bool = True, swarm: Swarm | None = None) -> None:
        self.settings = settings
        self.cache = cache
        self.s3 = s3
        self.downloader = Downloader(settings, cache, s3, swarm=swarm, on_bytes=on_bytes)
        self._inflight: dict[str, asyncio.Task[FetchResult]] = {}
        self._flushes: set[asyncio.Task[bool]] = set()
        self._flush = settings.fsync and flush_in_background
        self._pinned = pinned or (lambda: set())

    @property
    def board(self) -> SourceBoard:
        """What this agent holds of the files it is fetching (its peer server reads it)."""
        return self.downloader.board

    @property
    def bytes_downloaded(self) -> int:
        return self.downloader.bytes_downloaded

    # ----- public ---------------------------------------------------------------------------------------

    async def ensure(self, uri: ModelUri | str, *, progress: ProgressFn | None = None,
                     force: bool = False) -> FetchResult:
        """Make ``uri`` ready (or confirm it is current) and return where it is. Joins a fetch already running.

        ``force`` builds the current revision again even if it is ready (``verify`` repairs this way: the bad
        blobs are forgotten first, so their files are downloaded again into a new build).
        """
        model = parse_model_uri(uri) if isinstance(uri, str) else uri
        task = self._inflight.get(model.model_id)
        if task is None or force:
            task = asyncio.create_task(self._ensure(model, progress, force=force), name=f"fetch {model.uri}")
            self._inflight[model.model_id] = task
            mid = model.model_id

            def forget(done: asyncio.Task[FetchResult]) -> None:
                if self._inflight.get(mid) is done:
                    self._inflight.pop(mid, None)

            task.add_done_callback(forget)
        return await asyncio.shield(task)

    async def drain(self, *, wait: bool = True) -> None:
        """Wait for (or, with ``wait=False``, abandon) the background flushes of published builds.

        An abandoned flush leaves its build unmarked: it stays trusted for this boot, and after a reboot it is
        re-verified before it is served again.
        """
        tasks = list(self._flushes)
        if not wait:
            for t in tasks:
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def list_model(self, model: ModelUri) -> Listing:
        """What the model is in S3 right now: files with relative paths (validated), sizes, ETags."""
        return await list_model(self.s3, model)

    # ----- one model -------------------------------------------------------------------------------------

    async def _lookup(self, model: ModelUri) -> Lookup | None:
        return await asyncio.to_thread(self.cache.lookup, model)

    async def _hit(self, model: ModelUri, ready: Lookup, started: float) -> FetchResult:
        await asyncio.to_thread(self.cache.touch, ready.manifest.model_id)
        return self._result(model, ready, started, hit=True)

    async def _ensure(self, model: ModelUri, progress: ProgressFn | None, *, force: bool) -> FetchResult:
        started = time.monotonic()
        ready = await self._lookup(model)
        if ready is not None and ready.via_outer and not force:
            return await self._hit(model, ready, started)
        await asyncio.to_thread(self.cache.check_overlap, model)
        for attempt in range(1, MAX_RELISTS + 1):
            try:
                listing = await self.list_model(model)
            except S3Error as e:
                if ready is not None and not isinstance(e, ObjectNotFoundError) and not force:
                    log.warning("%s: cannot check S3 for changes (%s); serving the cached revision", model, e)
                    return await self._hit(model, ready, started)
                raise
            if ready is not None and ready.manifest.revision == listing.revision and not force:
                return await self._hit(model, ready, started)
            try:
                async with self.cache.model_lock(model.model_id):
                    ready = await self._lookup(model)  # another process may have published while we waited
                    if ready is not None and not force and (
                            ready.via_outer or ready.manifest.revision == listing.revision):
                        return await self._hit(model, ready, started)
                    downloaded, peer_bytes = await self._fetch_locked(listing, progress, started)
            except OverlappingModelError:
                # An outer prefix model was published while this one downloaded: serve from it if it can.
                ready = await self._lookup(model)
                if ready is not None and ready.via_outer:
                    return await self._hit(model, ready, started)
                raise
            except ObjectChangedError as e:
                if attempt == MAX_RELISTS:
                    raise
                log.warning("%s: %s; listing again (attempt %d/%d)", model, e, attempt + 1, MAX_RELISTS)
                continue
            ready = await self._lookup(model)
            if ready is None:
                raise WeightcacheError(f"{model}: published but not visible; is the cache root shared oddly?")
            return self._result(model, ready, started, hit=False, downloaded=downloaded, peer_bytes=peer_bytes)
        raise AssertionError("unreachable")

    def _result(self, model: ModelUri, ready: Lookup, started: float, *, hit: bool,
                downloaded: int = 0, peer_bytes: int = 0) -> FetchResult:
        m = ready.manifest
        return FetchResult(uri=model.uri, path=ready.path, model_id=m.model_id, revision=m.revision,
                           total_bytes=m.total_bytes, downloaded_bytes=downloaded,
                           seconds=time.monotonic() - started, hit=hit, peer_bytes=peer_bytes)

    def _plan_reuse(self, listing: Listing, build: Build) -> tuple[list[ManifestFile], list[PlannedFile]]:
        """Link what the cache already holds (this boot's journal, other models' blobs); the rest is to fetch."""
        model, cache = listing.uri, self.cache
        journal = journal_read(cache, model.model_id, listing.revision)
        index = cache.source_index()
        done: list[ManifestFile] = []
        todo: list[PlannedFile] = []
        for f in listing.files:
            known = journal.get(f.relpath)
            digest = known.xxh3_128 if known and known.size == f.size and known.etag == f.etag else None
            digest = digest or index.get((model.bucket, f.key, f.etag, f.size))
            if digest and build.link_existing_blob(digest=digest, size=f.size, relpath=f.relpath):
                done.append(ManifestFile(path=f.relpath, size=f.size, xxh3_128=digest, key=f.key, etag=f.etag))
            else:
                todo.append(f)
        return done, todo

    async def _fetch_locked(self, listing: Listing, progress: ProgressFn | None,
                            started: float) -> tuple[int, int]:
        model, revision = listing.uri, listing.revision
        cache = self.cache
        await asyncio.to_thread(cache.join_activity)  # a recovery elsewhere never deletes what we build
        build = Build(cache, model.model_id, revision)
        await in_thread(build.create)
        downloaded = 0

        def counted(n: int) -> None:
            nonlocal downloaded
            downloaded += n
            if progress:
                progress(n)

        job = ModelJob(model=model, revision=revision, build=build, progress=counted)
        # Every failure from here on (no room, a download, publishing) removes the staging tree: nothing of a
        # failed fetch stays under snapshots/ (partial downloads stay in tmp/, for resume).
        try:
            done, todo = await in_thread(self._plan_reuse, listing, build)
            if progress:
                progress(sum(f.size for f in done))
            if isinstance(progress, TotalAware):
                progress.add_total(listing.total_bytes)
            need = sum(f.size for f in todo) - self._resumable_bytes(model, todo)
            await in_thread(make_room, cache, need_bytes=max(need, 0), settings=self.settings,
                             pinned=self._pinned() | {model.model_id}, for_uri=model.uri)
            log.info("%s: fetching %d files (%d bytes; %d files already cached) revision %s", model, len(todo),
                     sum(f.size for f in todo), len(done), revision)
            self.downloader.owned_first(job, todo)
            results = await gather_all([self.downloader.download_file(job, f) for f in todo])
            done.extend(results)
            done.sort(key=lambda f: f.path)
            await in_thread(build.publish, uri=model, files=done, fetch_seconds=time.monotonic() - started)
        except BaseException:
            await asyncio.to_thread(build.discard)
            raise
        finally:
            self.downloader.finished(job)
        journal_clear(cache, model.model_id, revision)
        if self._flush:
            task = asyncio.create_task(asyncio.to_thread(flush_build, cache, build.final_dir),
                                       name=f"flush {model.uri}")
            self._flushes.add(task)
            task.add_done_callback(self._flush_done)
        return downloaded, job.peer_bytes

    def _flush_done(self, task: asyncio.Task[bool]) -> None:
        self._flushes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("flushing a published build failed (it will be re-verified after a reboot): %s",
                        task.exception())

    def _resumable_bytes(self, model: ModelUri, files: list[PlannedFile]) -> int:
        total = 0
        for f in files:
            tmp = self.cache.tmp_download_path(source_id(model.bucket, f.key, f.etag, f.size))
            with contextlib.suppress(FileNotFoundError):
                total += tmp.stat().st_blocks * 512
        return min(total, sum(f.size for f in files))

async def prefetch_models(uris: list[str], *, cache_dir: Path, settings: AgentSettings | None = None,
                          progress: ProgressFn | None = None) -> list[Path]:
    """Make every model ready in ``cache_dir`` and return their paths (the server's fallback uses this)."""
    from agent.config import load_settings

    settings = settings or load_settings(cache_dir=Path(cache_dir))
    cache = Cache(settings.cache_dir, fsync=settings.fsync)
    await asyncio.to_thread(cache.recover, orphan_max_age_seconds=settings.orphan_max_age_seconds)
    try:
        async with S3Client(settings) as s3:
            # No flush on the way: the model is ready when verified; the node's agent flushes it later, and until
            # then it is trusted for this boot only (see agent.store.layout.is_trusted).
            fetcher = Fetcher(settings, cache, s3, flush_in_background=False)
            results = await asyncio.gather(*(fetcher.ensure(u, progress=progress) for u in uris))
    finally:
        cache.close()
    return [r.path for r in results]


__all__ = [
    "BudgetExceededError",
    "FetchResult",
    "Fetcher",
    "Listing",
    "Manifest",
    "prefetch_models",
]
