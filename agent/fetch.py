"""Make one model ready: list it, plan parts, download in parallel, verify, hand it to the cache to publish.

Every ranged GET of every file of every model goes through one global semaphore (``concurrency``), so a node
never opens more connections than configured however many pods ask at once; files open at once are bounded too
(``MAX_OPEN_FILES_PER_SLOT`` per GET slot). Parts are written with ``os.pwrite`` into a preallocated temp file from
the worker thread that received them, and hashed there while the bytes are hot: parts are whole multiples of the
digest's chunk size, so each part yields its own chunk digests and nothing is ever read back (the file digest is
the xxh3-128 over the chunk digests, see :mod:`agent.layout`). Each finished part is appended, with its chunk
digests and the boot id, to a ``.parts`` record, so a crash (even ``kill -9``) loses only the parts in flight and a
reboot (whose page cache is gone) discards the record. Memory is bounded: one buffer per GET in flight.

Durability is not on this path: a model is published as soon as it is verified, and its build is flushed to disk
in the background afterwards (:meth:`Fetcher.drain`), then marked durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from agent import layout
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
from agent.maintenance import flush_build
from agent.manifest import Manifest, ManifestFile, PlannedFile, compute_revision, source_id
from agent.publish import Build, journal_append, journal_clear, journal_read
from agent.s3 import S3Client
from agent.sourceboard import SharedSource, SourceBoard
from agent.uris import ModelUri, parse_model_uri, validate_relative_key

if TYPE_CHECKING:
    from agent.swarm import Swarm

log = logging.getLogger(__name__)

T = TypeVar("T")

BUFFER_SIZE = 4 * 1024 * 1024
MAX_PART_SIZE = 64 * 1024 * 1024
#: Files downloading at once, per GET slot: enough to keep every slot busy on small files, few enough that the
#: fds and page-cache dirtying stay bounded for models of thousands of files.
MAX_OPEN_FILES_PER_SLOT = 2
PARTS_FORMAT = "weightcache-parts v2"
#: A fetched model's files stay on the peer board this long after its fetch ends (> the peer index's refresh).
BOARD_LINGER_SECONDS = 3.0
#: A model whose objects keep changing under us is re-listed this many times before the fetch fails.
MAX_RELISTS = 3

ProgressFn = Callable[[int], None]


@runtime_checkable
class TotalAware(Protocol):
    """A progress callback that is also told each model's total bytes (:class:`agent.progress.Progress`)."""

    def add_total(self, n: int) -> None: ...


def part_size_for(size: int, *, min_part: int, concurrency: int) -> int:
    """Parts big enough to keep request overhead low, small enough that one file fans out over the pool.

    Always a whole number of digest chunks, so every part hashes on its own.
    """
    chunk = layout.CHUNK_SIZE
    target = -(-size // max(concurrency, 1))
    part = max(chunk, -(-min_part // chunk) * chunk)
    while part < target and part < MAX_PART_SIZE:
        part *= 2
    return max(chunk, min(part, MAX_PART_SIZE) // chunk * chunk)


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
    peer_bytes: int = 0  # of downloaded_bytes, those that came from other agents


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
                 on_bytes: Callable[[int, str], None] | None = None,
                 flush_in_background: bool = True, swarm: Swarm | None = None) -> None:
        self.settings = settings
        self.cache = cache
        self.s3 = s3
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._open_files = asyncio.Semaphore(settings.concurrency * MAX_OPEN_FILES_PER_SLOT)
        self._buffers: list[bytearray] = []
        self._inflight: dict[str, asyncio.Task[FetchResult]] = {}
        self._flushes: set[asyncio.Task[bool]] = set()
        self._flush = settings.fsync and flush_in_background
        self._pinned = pinned or (lambda: set())
        self._on_bytes = on_bytes
        self.bytes_downloaded = 0  # from S3 and peers alike
        self.swarm = swarm
        #: What this agent holds of the files it is fetching, for its peer server.
        self.board = SourceBoard()
        self._model_sources: dict[str, list[SharedSource]] = {}
        self._peer_bytes: dict[str, int] = {}
        self._model_started: dict[str, float] = {}

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
        await _in_thread(build.create)
        downloaded = 0

        def counted(n: int) -> None:
            nonlocal downloaded
            downloaded += n
            if progress:
                progress(n)

        # Every failure from here on (no room, a download, publishing) removes the staging tree: nothing of a
        # failed fetch stays under snapshots/ (partial downloads stay in tmp/, for resume).
        self._model_sources[model.model_id] = []
        self._peer_bytes[model.model_id] = 0
        self._model_started[model.model_id] = time.monotonic()
        try:
            done, todo = await _in_thread(self._plan_reuse, listing, build)
            if progress:
                progress(sum(f.size for f in done))
            if isinstance(progress, TotalAware):
                progress.add_total(listing.total_bytes)
            need = sum(f.size for f in todo) - self._resumable_bytes(model, todo)
            await _in_thread(make_room, cache, need_bytes=max(need, 0), settings=self.settings,
                             pinned=self._pinned() | {model.model_id}, for_uri=model.uri)
            log.info("%s: fetching %d files (%d bytes; %d files already cached) revision %s", model, len(todo),
                     sum(f.size for f in todo), len(done), revision)
            if self.swarm is not None:  # files this agent fetches from S3 when all warm at once go first
                swarm = self.swarm
                todo.sort(key=lambda f: not swarm.first_mine(
                    source_id(model.bucket, f.key, f.etag, f.size), 0, 1, -(-f.size // layout.CHUNK_SIZE)))
            results = await _gather_all(self.download_file(model, revision, f, build, counted) for f in todo)
            done.extend(results)
            done.sort(key=lambda f: f.path)
            await _in_thread(build.publish, uri=model, files=done, fetch_seconds=time.monotonic() - started)
        except BaseException:
            await asyncio.to_thread(build.discard)
            raise
        finally:
            # Offered from the board a little longer: until the peer server's index of live models has it.
            entries = self._model_sources.pop(model.model_id, [])
            asyncio.get_running_loop().call_later(BOARD_LINGER_SECONDS, self._unshare, entries)
            peer_bytes = self._peer_bytes.pop(model.model_id, 0)
            self._model_started.pop(model.model_id, None)
        journal_clear(cache, model.model_id, revision)
        if self._flush:
            task = asyncio.create_task(asyncio.to_thread(flush_build, cache, build.final_dir),
                                       name=f"flush {model.uri}")
            self._flushes.add(task)
            task.add_done_callback(self._flush_done)
        return downloaded, peer_bytes

    def _unshare(self, entries: list[SharedSource]) -> None:
        for entry in entries:
            self.board.close(entry)
            if self.swarm is not None:
                self.swarm.client.forget(entry.source)

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

    # ----- one file ----------------------------------------------------------------------------------------

    async def download_file(self, model: ModelUri, revision: str, f: PlannedFile, build: Build,
                            progress: ProgressFn | None) -> ManifestFile:
        """Download one file (resuming this boot's finished parts), verify it, and adopt it into ``build``."""
        src = source_id(model.bucket, f.key, f.etag, f.size)
        async with self._open_files, self.cache.source_lock(src):
            return await self._download_locked(model, revision, f, build, progress, src)

    async def _download_locked(self, model: ModelUri, revision: str, f: PlannedFile, build: Build,
                               progress: ProgressFn | None, src: str) -> ManifestFile:
        tmp = self.cache.tmp_download_path(src)
        record = tmp.with_suffix(".parts")
        part = part_size_for(f.size, min_part=self.settings.min_part_size, concurrency=self.settings.concurrency)
        parts = plan_parts(f.size, part)
        header = (f"{PARTS_FORMAT} size={f.size} part={part} chunk={layout.CHUNK_SIZE} "
                  f"boot={layout.current_boot_id()}\n")
        entry = self.board.open(src, f.size, tmp, since=self._model_started.get(model.model_id))
        self._model_sources.setdefault(model.model_id, []).append(entry)
        if len(parts) <= 1:  # one GET: no part record
            chunks = await self._fetch_whole(model, f, tmp, entry, progress)
            return await self._adopt(model, revision, f, tmp, chunks, build, entry)
        finished = await _in_thread(_open_record, tmp, record, header, f.size)
        if finished:
            log.info("%s: resuming: %d of %d parts already on disk", f.key, len(finished), len(parts))
        for i, chunks in finished.items():
            entry.put(parts[i][0] // layout.CHUNK_SIZE, chunks)
        order = list(range(len(parts)))
        if self.swarm is not None:  # the parts this agent fetches from S3 when all warm at once go first
            swarm = self.swarm
            order.sort(key=lambda i: not swarm.first_mine(src, parts[i][0] // layout.CHUNK_SIZE, 1, entry.chunks))
        fd = await asyncio.to_thread(os.open, tmp, os.O_RDWR)
        try:
            digests: dict[int, list[bytes]] = dict(finished)
            async with asyncio.TaskGroup() as tg:
                for i in order:
                    if i not in finished:
                        tg.create_task(self._fetch_part(model, f, fd, record, entry, i, parts[i], digests, progress),
                                       name=f"part {i} of {f.key}")
        finally:
            os.close(fd)
        entry_ = await self._adopt(model, revision, f, tmp, [d for i in range(len(parts)) for d in digests[i]],
                                   build, entry)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(record.unlink)
        return entry_

    async def _adopt(self, model: ModelUri, revision: str, f: PlannedFile, tmp: Path, chunks: list[bytes],
                     build: Build, shared: SharedSource) -> ManifestFile:
        size = await asyncio.to_thread(lambda: os.stat(tmp).st_size)
        if size != f.size:
            raise S3Error(f"{f.key}: downloaded {size} bytes, expected {f.size}")
        digest = layout.combine_chunk_digests(chunks)
        entry = ManifestFile(path=f.relpath, size=f.size, xxh3_128=digest, key=f.key, etag=f.etag)
        await _in_thread(build.adopt_file, tmp, digest=digest, size=f.size, relpath=f.relpath, chunks=chunks)
        shared.completed(self.cache.blob_path(digest), digest)
        await _in_thread(journal_append, self.cache, model.model_id, revision, entry)
        return entry

    def _progress_fn(self, progress: ProgressFn | None, source: str = "s3") -> Callable[[int], None]:
        def on_progress(n: int) -> None:
            self.bytes_downloaded += n
            if self._on_bytes:
                self._on_bytes(n, source)
            if progress:
                progress(n)

        return on_progress

    def _take_buffer(self, length: int) -> bytearray:
        want = min(BUFFER_SIZE, max(length, 1))
        buffer = self._buffers.pop() if self._buffers else bytearray(want)
        return buffer if len(buffer) >= want else bytearray(want)

    @staticmethod
    def _writer(fd: int, hasher: layout.ChunkedHasher, shared: SharedSource,
                first_chunk: int) -> Callable[[int, memoryview], None]:
        """Runs in the GET's worker thread: pwrite, then hash the same bytes while they are hot in cache.

        The data plane hands over bytes in order (a retry resumes after the last byte handed over), and a range
        starts on a chunk boundary, so the range's chunk digests come out right whatever the retries. Each chunk
        is offered to peers as soon as it is written and hashed.
        """

        def write(offset: int, view: memoryview) -> None:
            _pwrite_all(fd, view, offset)
            before = len(hasher.digests)
            hasher.update(view)
            for k in range(before, len(hasher.digests)):
                shared.digests[first_chunk + k] = hasher.digests[k]

        return write

    async def _fetch_whole(self, model: ModelUri, f: PlannedFile, tmp: Path, shared: SharedSource,
                           progress: ProgressFn | None) -> list[bytes]:
        def abandon(fd: int) -> None:
            os.close(fd)
            tmp.unlink(missing_ok=True)

        fd = await _in_thread(_create_preallocated, tmp, f.size, on_abandon=abandon)
        try:
            return await self._fetch_range(model, f, fd, shared, 0, f.size, progress) if f.size else []
        except BaseException:
            # One GET, no part record: a partial file here could never be resumed, so it goes now (a
            # multi-part download keeps its finished parts in tmp/ instead, for the next attempt).
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    async def _fetch_part(self, model: ModelUri, f: PlannedFile, fd: int, record: Path, shared: SharedSource,
                          index: int, part: tuple[int, int], digests: dict[int, list[bytes]],
                          progress: ProgressFn | None) -> None:
        chunks = await self._fetch_range(model, f, fd, shared, part[0], part[1], progress)
        await _in_thread(_append_record, record, index, chunks)
        digests[index] = chunks

    async def _fetch_range(self, model: ModelUri, f: PlannedFile, fd: int, shared: SharedSource, start: int,
                           length: int, progress: ProgressFn | None) -> list[bytes]:
        """Bring ``[start, start+length)`` (chunk-aligned) to disk; its chunk digests. From S3, or, with peers,
        from whichever peer holds it (:mod:`agent.swarm`)."""
        swarm = self.swarm
        if swarm is None or not swarm.membership.peers():
            return await self._from_s3(model, f, fd, shared, start, length, progress)
        chunk = layout.CHUNK_SIZE
        mid = model.model_id
        on_peer = self._progress_fn(progress, "peer")

        async def s3_read(first: int, count: int) -> list[bytes]:
            a = first * chunk
            return await self._from_s3(model, f, fd, shared, a, min(count * chunk, f.size - a), progress)

        def peer_bytes(n: int) -> None:
            self._peer_bytes[mid] = self._peer_bytes.get(mid, 0) + n
            on_peer(n)

        return await swarm.fill(shared, start // chunk, -(-length // chunk), s3_read=s3_read,
                                write=lambda offset, view: _pwrite_all(fd, view, offset), on_peer_bytes=peer_bytes)

    async def _from_s3(self, model: ModelUri, f: PlannedFile, fd: int, shared: SharedSource, start: int,
                       length: int, progress: ProgressFn | None) -> list[bytes]:
        hasher = layout.ChunkedHasher()
        first_chunk = start // layout.CHUNK_SIZE
        async with self._slots:
            buffer = self._take_buffer(length)
            try:
                await self.s3.read_range(bucket=model.bucket, key=f.key, etag=f.etag, start=start, length=length,
                                         buffer=buffer, write=self._writer(fd, hasher, shared, first_chunk),
                                         on_progress=self._progress_fn(progress))
            finally:
                self._buffers.append(buffer)
        chunks = hasher.finish()
        shared.put(first_chunk, chunks)
        return chunks


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _open_record(tmp: Path, record: Path, header: str, size: int) -> dict[int, list[bytes]]:
    """Open (or start) a resumable download: the parts already written this boot, with their chunk digests.

    A record from another boot (or format, or part size) is discarded: after a reboot the bytes it claims may
    never have reached the disk, and hashing them now would bless zeros.
    """
    finished: dict[int, list[bytes]] = {}
    try:
        lines = record.read_text("ascii", errors="replace").splitlines()
        if lines and lines[0] + "\n" == header and tmp.exists() and tmp.stat().st_size == size:
            for line in lines[1:]:
                index, _, hexes = line.partition(" ")
                try:
                    finished[int(index)] = [bytes.fromhex(h) for h in hexes.split(",") if h]
                except ValueError:
                    continue  # a torn last line
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


def _append_record(record: Path, index: int, chunks: list[bytes]) -> None:
    """Record a finished part (one ``write`` of one line: a crash tears at most this line)."""
    fd = os.open(record, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"{index} {','.join(c.hex() for c in chunks)}\n".encode())
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
    await asyncio.to_thread(cache.recover, orphan_max_age_seconds=settings.orphan_max_age_seconds)
    try:
        async with S3Client(settings) as s3:
            # No flush on the way: the model is ready when verified; the node's agent flushes it later, and until
            # then it is trusted for this boot only (see agent.layout.is_trusted).
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
    "part_size_for",
    "plan_parts",
    "prefetch_models",
]
