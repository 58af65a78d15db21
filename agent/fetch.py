"""Make one model ready: list it, plan parts, download in parallel, verify, hand it to the cache to publish.

Every ranged GET of every file of every model goes through one global semaphore (``concurrency``), so a node
never opens more connections than configured however many pods ask at once. Parts are written with ``os.pwrite``
into a preallocated temp file from a worker thread; each finished part is appended to a ``.parts`` record, so a
crash (even ``kill -9``) loses only the parts in flight. The xxh3-128 of a file is computed while it downloads,
reading back the contiguous prefix of finished parts from the page cache, and recorded in the manifest.
Memory is bounded: one buffer of at most ``BUFFER_SIZE`` per GET in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import xxhash

from agent.cache import Cache, Lookup
from agent.config import AgentSettings
from agent.errors import (
    BudgetExceededError,
    DiskFullError,
    InvalidUriError,
    ObjectChangedError,
    ObjectNotFoundError,
    OverlappingModelError,
    S3Error,
    WeightcacheError,
)
from agent.eviction import make_room
from agent.manifest import Manifest, ManifestFile, PlannedFile, compute_revision, source_id
from agent.s3 import S3Client
from agent.uris import ModelUri, parse_model_uri, validate_relative_key

log = logging.getLogger(__name__)

T = TypeVar("T")

BUFFER_SIZE = 4 * 1024 * 1024
MAX_PART_SIZE = 64 * 1024 * 1024
#: A model whose objects keep changing under us is re-listed this many times before the fetch fails.
MAX_RELISTS = 3

ProgressFn = Callable[[int], None]


@runtime_checkable
class TotalAware(Protocol):
    """A progress callback that is also told each model's total bytes (:class:`agent.progress.Progress`)."""

    def add_total(self, n: int) -> None: ...


def part_size_for(size: int, *, min_part: int, concurrency: int) -> int:
    """Parts big enough to keep request overhead low, small enough that one file fans out over the pool."""
    target = -(-size // max(concurrency, 1))
    part = min_part
    while part < target and part < MAX_PART_SIZE:
        part *= 2
    return min(part, MAX_PART_SIZE)


def plan_parts(size: int, part: int) -> list[tuple[int, int]]:
    return [(start, min(part, size - start)) for start in range(0, size, part)]


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


@dataclass(frozen=True, slots=True)
class Listing:
    uri: ModelUri
    files: tuple[PlannedFile, ...]
    revision: str

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class Fetcher:
    """Fetches models into a :class:`Cache`; one fetch per model at a time, across tasks and processes."""

    def __init__(self, settings: AgentSettings, cache: Cache, s3: S3Client, *,
                 pinned: Callable[[], set[str]] | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.cache = cache
        self.s3 = s3
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._buffers: list[bytearray] = []
        self._inflight: dict[str, asyncio.Task[FetchResult]] = {}
        self._pinned = pinned or (lambda: set())
        self._on_bytes = on_bytes
        self.bytes_downloaded = 0

    # ----- public ---------------------------------------------------------------------------------------

    async def ensure(self, uri: ModelUri | str, *, progress: ProgressFn | None = None) -> FetchResult:
        """Make ``uri`` ready (or confirm it is current) and return where it is. Joins a fetch already running."""
        model = parse_model_uri(uri) if isinstance(uri, str) else uri
        task = self._inflight.get(model.model_id)
        if task is None:
            task = asyncio.create_task(self._ensure(model, progress), name=f"fetch {model.uri}")
            self._inflight[model.model_id] = task
            mid = model.model_id

            def forget(_task: asyncio.Task[FetchResult]) -> None:
                self._inflight.pop(mid, None)

            task.add_done_callback(forget)
        return await asyncio.shield(task)

    def lookup(self, uri: ModelUri) -> Lookup | None:
        return self.cache.lookup(uri)

    async def list_model(self, model: ModelUri) -> Listing:
        """What the model is in S3 right now: files with relative paths (validated), sizes, ETags."""
        if model.is_prefix:
            objects = await self.s3.list_objects(model.bucket, model.list_prefix)
            files: list[PlannedFile] = []
            for o in objects:
                rel = o.key[len(model.list_prefix):]
                if rel.endswith("/") and o.size == 0:
                    continue  # a "directory marker" made by consoles and sync tools
                validate_relative_key(rel, key=o.key)
                files.append(PlannedFile(relpath=rel, key=o.key, size=o.size, etag=o.etag))
            if not files:
                raise ObjectNotFoundError(f"{model}: no objects under s3://{model.bucket}/{model.list_prefix}")
            names = {f.relpath for f in files}
            for f in files:
                parts = f.relpath.split("/")
                for i in range(1, len(parts)):
                    if "/".join(parts[:i]) in names:
                        raise InvalidUriError(
                            f"{model}: key {f.key!r} needs {'/'.join(parts[:i])!r} to be a directory, "
                            "but it is also an object")
        else:
            o = await self.s3.head_object(model.bucket, model.key)
            files = [PlannedFile(relpath=model.key.rsplit("/", 1)[-1], key=o.key, size=o.size, etag=o.etag)]
        return Listing(uri=model, files=tuple(files), revision=compute_revision(files))

    # ----- one model -------------------------------------------------------------------------------------

    async def _ensure(self, model: ModelUri, progress: ProgressFn | None) -> FetchResult:
        started = time.monotonic()
        ready = self.cache.lookup(model)
        if ready is not None and ready.via_outer:
            self.cache.touch(ready.manifest.model_id)
            return self._result(model, ready, started, hit=True)
        self.cache.check_overlap(model)
        for attempt in range(1, MAX_RELISTS + 1):
            try:
                listing = await self.list_model(model)
            except S3Error as e:
                if ready is not None and not isinstance(e, ObjectNotFoundError):
                    log.warning("%s: cannot check S3 for changes (%s); serving the cached revision", model, e)
                    self.cache.touch(ready.manifest.model_id)
                    return self._result(model, ready, started, hit=True)
                raise
            if ready is not None and ready.manifest.revision == listing.revision:
                self.cache.touch(ready.manifest.model_id)
                return self._result(model, ready, started, hit=True)
            try:
                async with self.cache.model_lock(model.model_id):
                    ready = self.cache.lookup(model)  # another process may have published while we waited
                    if ready is not None and (ready.via_outer or ready.manifest.revision == listing.revision):
                        self.cache.touch(ready.manifest.model_id)
                        return self._result(model, ready, started, hit=True)
                    downloaded = await self._fetch_locked(listing, progress, started)
            except OverlappingModelError:
                # An outer prefix model was published while this one downloaded: serve from it if it can.
                ready = self.cache.lookup(model)
                if ready is not None and ready.via_outer:
                    self.cache.touch(ready.manifest.model_id)
                    return self._result(model, ready, started, hit=True)
                raise
            except ObjectChangedError as e:
                if attempt == MAX_RELISTS:
                    raise
                log.warning("%s: %s; listing again (attempt %d/%d)", model, e, attempt + 1, MAX_RELISTS)
                continue
            ready = self.cache.lookup(model)
            if ready is None:
                raise WeightcacheError(f"{model}: published but not visible; is the cache root shared oddly?")
            return self._result(model, ready, started, hit=False, downloaded=downloaded)
        raise AssertionError("unreachable")

    def _result(self, model: ModelUri, ready: Lookup, started: float, *, hit: bool,
                downloaded: int = 0) -> FetchResult:
        m = ready.manifest
        return FetchResult(uri=model.uri, path=ready.path, model_id=m.model_id, revision=m.revision,
                           total_bytes=m.total_bytes, downloaded_bytes=downloaded,
                           seconds=time.monotonic() - started, hit=hit)

    async def _fetch_locked(self, listing: Listing, progress: ProgressFn | None, started: float) -> int:
        model, revision = listing.uri, listing.revision
        cache = self.cache
        journal = cache.journal_read(model.model_id, revision)
        index = cache.source_index()
        staging = cache.reset_staging(model.model_id, revision)
        done: list[ManifestFile] = []
        todo: list[PlannedFile] = []
        for f in listing.files:
            known = journal.get(f.relpath)
            digest = known.xxh3_128 if known and known.size == f.size and known.etag == f.etag else None
            digest = digest or index.get((model.bucket, f.key, f.etag, f.size))
            if digest and cache.link_existing_blob(digest=digest, size=f.size, staging=staging, relpath=f.relpath):
                done.append(ManifestFile(path=f.relpath, size=f.size, xxh3_128=digest, key=f.key, etag=f.etag))
                if progress:
                    progress(f.size)
            else:
                todo.append(f)
        if isinstance(progress, TotalAware):
            progress.add_total(listing.total_bytes)
        downloaded = 0

        def counted(n: int) -> None:
            nonlocal downloaded
            downloaded += n
            if progress:
                progress(n)

        # Every failure from here on (no room, a download, publishing) removes the staging tree: nothing of a
        # failed fetch stays under snapshots/ (partial downloads stay in tmp/, for resume).
        try:
            need = sum(f.size for f in todo) - self._resumable_bytes(model, todo)
            await _in_thread(make_room, cache, need_bytes=max(need, 0), settings=self.settings,
                                    pinned=self._pinned() | {model.model_id}, for_uri=model.uri)
            log.info("%s: fetching %d files (%d bytes; %d files already cached) revision %s", model, len(todo),
                     sum(f.size for f in todo), len(done), revision)
            results = await _gather_all(self._fetch_file(model, revision, f, staging, counted) for f in todo)
            done.extend(results)
            done.sort(key=lambda f: f.path)
            await _in_thread(cache.publish, uri=model, revision=revision, files=done,
                                    fetch_seconds=time.monotonic() - started)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                staging.parent.rmdir()  # only if empty: no other revision of this model lives there
            raise
        cache.journal_clear(model.model_id, revision)
        return downloaded

    def _resumable_bytes(self, model: ModelUri, files: list[PlannedFile]) -> int:
        total = 0
        for f in files:
            tmp = self.cache.tmp_download_path(source_id(model.bucket, f.key, f.etag, f.size))
            with contextlib.suppress(FileNotFoundError):
                total += tmp.stat().st_blocks * 512
        return min(total, sum(f.size for f in files))

    # ----- one file ----------------------------------------------------------------------------------------

    async def _fetch_file(self, model: ModelUri, revision: str, f: PlannedFile, staging: Path,
                          progress: ProgressFn | None) -> ManifestFile:
        src = source_id(model.bucket, f.key, f.etag, f.size)
        async with self.cache.source_lock(src):
            return await self._fetch_file_locked(model, revision, f, staging, progress, src)

    async def _fetch_file_locked(self, model: ModelUri, revision: str, f: PlannedFile, staging: Path,
                                 progress: ProgressFn | None, src: str) -> ManifestFile:
        tmp = self.cache.tmp_download_path(src)
        record = tmp.with_suffix(".parts")
        part = part_size_for(f.size, min_part=self.settings.min_part_size, concurrency=self.settings.concurrency)
        parts = plan_parts(f.size, part)
        header = f"weightcache-parts v1 size={f.size} part={part}\n"
        if len(parts) <= 1:  # one GET: hash as the bytes stream in, no part record, no read-back
            digest = await self._fetch_whole(model, f, tmp, progress)
            return await self._adopt(model, revision, f, tmp, digest, staging)
        finished = await _in_thread(_open_record, tmp, record, header, f.size)
        if finished:
            log.info("%s: resuming: %d of %d parts already on disk", f.key, len(finished), len(parts))
        fd = os.open(tmp, os.O_RDWR)
        try:
            hasher = _FrontierHasher(fd, parts, finished)
            hash_task = asyncio.create_task(hasher.run(), name=f"hash {f.key}")
            try:
                async with asyncio.TaskGroup() as tg:
                    for i, (start, length) in enumerate(parts):
                        if i not in finished:
                            tg.create_task(self._fetch_part(model, f, fd, record, i, start, length, hasher, progress),
                                           name=f"part {i} of {f.key}")
                digest = await hash_task
            finally:
                if not hash_task.done():
                    hash_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await hash_task
        finally:
            os.close(fd)
        entry = await self._adopt(model, revision, f, tmp, digest, staging)
        with contextlib.suppress(FileNotFoundError):
            record.unlink()
        return entry

    async def _adopt(self, model: ModelUri, revision: str, f: PlannedFile, tmp: Path, digest: str,
                     staging: Path) -> ManifestFile:
        size = os.stat(tmp).st_size
        if size != f.size:
            raise S3Error(f"{f.key}: downloaded {size} bytes, expected {f.size}")
        entry = ManifestFile(path=f.relpath, size=f.size, xxh3_128=digest, key=f.key, etag=f.etag)
        await _in_thread(self.cache.adopt_file, tmp, digest=digest, size=f.size, staging=staging,
                                relpath=f.relpath)
        self.cache.journal_append(model.model_id, revision, entry)
        return entry

    def _progress_fn(self, progress: ProgressFn | None) -> Callable[[int], None]:
        def on_progress(n: int) -> None:
            self.bytes_downloaded += n
            if self._on_bytes:
                self._on_bytes(n)
            if progress:
                progress(n)

        return on_progress

    def _take_buffer(self, length: int) -> bytearray:
        want = min(BUFFER_SIZE, max(length, 1))
        buffer = self._buffers.pop() if self._buffers else bytearray(want)
        return buffer if len(buffer) >= want else bytearray(want)

    def _writer(self, fd: int, hasher: xxhash.xxh3_128 | None = None) -> Callable[[int, memoryview], None]:
        """Runs in the GET's worker thread: pwrite, and hash in stream order if asked.

        No early write-back (``sync_file_range`` per chunk): measured on the 1 GiB bench model it made the whole
        fetch slower (median 4.1 s → 3.4 s without it), the disk's writes competing with the download; the
        parallel fsyncs at publish flush everything at once instead.
        """

        def write(offset: int, view: memoryview) -> None:
            _pwrite_all(fd, view, offset)
            if hasher is not None:
                hasher.update(view)

        return write

    async def _fetch_whole(self, model: ModelUri, f: PlannedFile, tmp: Path, progress: ProgressFn | None) -> str:
        h = xxhash.xxh3_128()

        def abandon(fd: int) -> None:
            os.close(fd)
            tmp.unlink(missing_ok=True)

        async with self._slots:
            fd = await _in_thread(_create_preallocated, tmp, f.size, on_abandon=abandon)
            buffer = self._take_buffer(f.size)
            try:
                if f.size:
                    await self.s3.read_range(bucket=model.bucket, key=f.key, etag=f.etag, start=0, length=f.size,
                                             buffer=buffer, write=self._writer(fd, h),
                                             on_progress=self._progress_fn(progress))
            except BaseException:
                # One GET, no part record: a partial file here could never be resumed, so it goes now (a
                # multi-part download keeps its finished parts in tmp/ instead, for the next attempt).
                tmp.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
                self._buffers.append(buffer)
        return h.hexdigest()

    async def _fetch_part(self, model: ModelUri, f: PlannedFile, fd: int, record: Path, index: int, start: int,
                          length: int, hasher: _FrontierHasher, progress: ProgressFn | None) -> None:
        async with self._slots:
            buffer = self._take_buffer(length)
            try:
                await self.s3.read_range(bucket=model.bucket, key=f.key, etag=f.etag, start=start, length=length,
                                         buffer=buffer, write=self._writer(fd),
                                         on_progress=self._progress_fn(progress))
            finally:
                self._buffers.append(buffer)
        await _in_thread(_append_record, record, index)
        hasher.part_done(index)


class _FrontierHasher:
    """Hashes a file in order while its parts finish out of order, reading finished parts back via pread."""

    def __init__(self, fd: int, parts: list[tuple[int, int]], finished: set[int]) -> None:
        self._fd = fd
        self._parts = parts
        self._done = set(finished)
        self._changed = asyncio.Event()
        self._changed.set()
        self._buffer = bytearray(min(BUFFER_SIZE, max((parts[-1][0] + parts[-1][1]) if parts else 1, 1)))

    def part_done(self, index: int) -> None:
        self._done.add(index)
        self._changed.set()

    async def run(self) -> str:
        h = xxhash.xxh3_128()
        nxt = 0
        while nxt < len(self._parts):
            await self._changed.wait()
            self._changed.clear()
            end = nxt
            while end < len(self._parts) and end in self._done:
                end += 1
            if end > nxt:
                start = self._parts[nxt][0]
                stop = self._parts[end - 1][0] + self._parts[end - 1][1]
                await _in_thread(_hash_range, self._fd, h, start, stop, self._buffer)
                nxt = end
        return h.hexdigest()


def _hash_range(fd: int, h: xxhash.xxh3_128, start: int, stop: int, buf: bytearray) -> None:
    view = memoryview(buf)
    pos = start
    while pos < stop:
        n = os.preadv(fd, [view[: min(len(buf), stop - pos)]], pos)
        if n <= 0:
            raise S3Error(f"short read while hashing at {pos}")
        h.update(view[:n])
        pos += n


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _open_record(tmp: Path, record: Path, header: str, size: int) -> set[int]:
    """Open (or start) a resumable download: returns the parts already on disk."""
    finished: set[int] = set()
    try:
        lines = record.read_text("ascii", errors="replace").splitlines()
        if lines and lines[0] + "\n" == header and tmp.exists() and tmp.stat().st_size == size:
            for line in lines[1:]:
                if line.isdigit():
                    finished.add(int(line))
            return finished
    except FileNotFoundError:
        pass
    os.close(_create_preallocated(tmp, size))
    record.write_text(header, "ascii")
    return finished


def _create_preallocated(path: Path, size: int) -> int:
    """Create (truncate) ``path`` with ``size`` bytes reserved; return an O_RDWR fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _preallocate(fd, size, path)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def _preallocate(fd: int, size: int, path: Path) -> None:
    if not size:
        return
    try:
        os.posix_fallocate(fd, 0, size)  # claim the space now: ENOSPC before, not after, the download
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space for a {size}-byte file in {path.parent}") from e
        os.ftruncate(fd, size)  # filesystems without fallocate




def _append_record(record: Path, index: int) -> None:
    fd = os.open(record, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"{index}\n".encode())
    finally:
        os.close(fd)


async def _in_thread(fn: Callable[..., T], /, *args: Any, on_abandon: Callable[[T], None] | None = None,
                     **kwargs: Any) -> T:
    """``asyncio.to_thread`` that, when cancelled, waits for the thread before re-raising.

    A cancelled ``to_thread`` returns at once while its thread runs on; the caller's cleanup (deleting the
    staging tree, closing the fd) would then race file work still in flight — a late adopt re-creating a deleted
    tree, a publish swapping the pointer after its snapshot was removed, a pread on a closed (or reused) fd. If
    the thread succeeded after all, ``on_abandon`` gets its result (to close an fd nobody will use).
    """
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                continue  # cancelled again: still wait; the CancelledError below is raised all the same
        if not future.cancelled() and future.exception() is None and on_abandon is not None:
            on_abandon(future.result())
        raise


async def _gather_all(coros: object) -> list[ManifestFile]:
    """Run all, fail fast: the first error cancels the rest (a TaskGroup), re-raised unwrapped."""
    results: list[ManifestFile] = []
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]  # type: ignore[attr-defined]
    except BaseExceptionGroup as eg:
        raise _first_error(eg) from None
    for t in tasks:
        results.append(t.result())
    return results


def _first_error(eg: BaseExceptionGroup) -> BaseException:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first_error(e)
        if not isinstance(e, asyncio.CancelledError):
            return e
    return eg.exceptions[0]


async def prefetch_models(uris: list[str], *, cache_dir: Path, settings: AgentSettings | None = None,
                          progress: ProgressFn | None = None) -> list[Path]:
    """Make every model ready in ``cache_dir`` and return their paths (the server's fallback uses this)."""
    from agent.config import load_settings

    settings = settings or load_settings(cache_dir=Path(cache_dir))
    cache = Cache(settings.cache_dir, fsync=settings.fsync)
    cache.recover(orphan_max_age_seconds=settings.orphan_max_age_seconds)
    async with S3Client(settings) as s3:
        fetcher = Fetcher(settings, cache, s3)
        results = await asyncio.gather(*(fetcher.ensure(u, progress=progress) for u in uris))
    return [r.path for r in results]


__all__ = [
    "BudgetExceededError",
    "FetchResult",
    "Fetcher",
    "Listing",
    "Manifest",
    "part_size_for",
    "plan_parts",
    "prefetch_models",
]
