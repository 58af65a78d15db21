"""Bringing one file to disk, verified, into a build: its parts in parallel under one GET limit, each from S3 or
(with peers) from another agent, hashed where it is received, recorded for resume, then adopted into the cache.

Every ranged GET of every file of every model goes through one semaphore (``concurrency``), so a node never opens
more connections than configured however many pods ask at once; files open at once are bounded too
(``MAX_OPEN_FILES_PER_SLOT`` per GET slot). Parts are written into a preallocated temp file from the worker thread
that received them — through the page cache, where the loader finds them next, or with ``WEIGHTCACHE_DIRECT_IO``
``O_DIRECT`` from the page-aligned buffer (:class:`agent.transfer.parts.PartWriter`) — and hashed there while the
bytes are hot in the buffer: parts are whole multiples of the digest's chunk size, so each part yields its own
chunk digests and nothing is ever read back (the file digest is the xxh3-128 over the chunk digests, see
:mod:`agent.store.layout`). Each finished part is appended, with its chunk digests and the boot id, to a ``.parts``
record (:mod:`agent.transfer.parts`). Memory is bounded: one buffer per GET in flight. Every chunk written is
offered to peers at once (:mod:`agent.transfer.sourceboard`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import AgentSettings
from agent.errors import S3Error
from agent.store import layout
from agent.store.cache import Cache
from agent.store.manifest import ManifestFile, PlannedFile, source_id
from agent.store.publish import Build, journal_append
from agent.transfer.aiotools import in_thread
from agent.transfer.parts import (
    PartWriter,
    aligned_buffer,
    append_record,
    create_preallocated,
    open_record,
    part_size_for,
    plan_parts,
    pwrite_all,
    record_header,
)
from agent.transfer.s3 import S3Client
from agent.transfer.sourceboard import SharedSource, SourceBoard
from agent.uris import ModelUri

if TYPE_CHECKING:
    from agent.transfer.swarm import Swarm

log = logging.getLogger(__name__)

BUFFER_SIZE = 4 * 1024 * 1024
#: Files downloading at once, per GET slot: enough to keep every slot busy on small files, few enough that the
#: fds and page-cache dirtying stay bounded for models of thousands of files.
MAX_OPEN_FILES_PER_SLOT = 2
#: A fetched model's files stay on the peer board this long after its fetch ends (> the peer index's refresh).
BOARD_LINGER_SECONDS = 3.0

#: Smaller single-GET files are written through the page cache: a direct write waits for the device, and for a
#: few MiB the copy costs less than the wait.
DIRECT_MIN_FILE_SIZE = 8 * 1024 * 1024

ProgressFn = Callable[[int], None]


@dataclass
class ModelJob:
    """One model's fetch, as its file downloads see it: where files go, whom to tell, what came from peers."""

    model: ModelUri
    revision: str
    build: Build
    progress: ProgressFn | None
    started: float = field(default_factory=time.monotonic)
    sources: list[SharedSource] = field(default_factory=list)
    peer_bytes: int = 0


class Downloader:
    """Downloads files for any number of model fetches at once, under one GET limit."""

    def __init__(self, settings: AgentSettings, cache: Cache, s3: S3Client, *, swarm: Swarm | None = None,
                 on_bytes: Callable[[int, str], None] | None = None) -> None:
        self.settings, self.cache, self.s3, self.swarm = settings, cache, s3, swarm
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._open_files = asyncio.Semaphore(settings.concurrency * MAX_OPEN_FILES_PER_SLOT)
        self._buffers: list[mmap.mmap] = []
        self._on_bytes = on_bytes
        self.bytes_downloaded = 0  # from S3 and peers alike
        #: What this agent holds of the files it is fetching, for its peer server.
        self.board = SourceBoard()

    def finished(self, job: ModelJob) -> None:
        """The job's fetch ended: its files stay offered a little longer (until the live index has them)."""
        asyncio.get_running_loop().call_later(BOARD_LINGER_SECONDS, self._unshare, list(job.sources))

    def _unshare(self, entries: list[SharedSource]) -> None:
        for entry in entries:
            self.board.close(entry)
            if self.swarm is not None:
                self.swarm.client.forget(entry.source)

    def owned_first(self, job: ModelJob, files: list[PlannedFile]) -> None:
        """Order ``files`` so that those this agent fetches from S3 when all warm at once come first."""
        swarm = self.swarm
        if swarm is not None:
            bucket = job.model.bucket
            files.sort(key=lambda f: not swarm.first_mine(
                source_id(bucket, f.key, f.etag, f.size), 0, 1, -(-f.size // layout.CHUNK_SIZE)))

    async def download_file(self, job: ModelJob, f: PlannedFile) -> ManifestFile:
        """Download one file (resuming this boot's finished parts), verify it, and adopt it into the job's build."""
        src = source_id(job.model.bucket, f.key, f.etag, f.size)
        async with self._open_files, self.cache.source_lock(src):
            return await self._download_locked(job, f, src)

    async def _download_locked(self, job: ModelJob, f: PlannedFile, src: str) -> ManifestFile:
        tmp = self.cache.tmp_download_path(src)
        record = tmp.with_suffix(".parts")
        part = part_size_for(f.size, min_part=self.settings.min_part_size, concurrency=self.settings.concurrency)
        parts = plan_parts(f.size, part)
        header = record_header(f.size, part)
        entry = self.board.open(src, f.size, tmp, since=job.started)
        job.sources.append(entry)
        if len(parts) <= 1:  # one GET: no part record
            chunks = await self._fetch_whole(job, f, tmp, entry)
            return await self._adopt(job, f, tmp, chunks, entry)
        finished = await in_thread(open_record, tmp, record, header, f.size)
        if finished:
            log.info("%s: resuming: %d of %d parts already on disk", f.key, len(finished), len(parts))
        for i, chunks in finished.items():
            entry.put(parts[i][0] // layout.CHUNK_SIZE, chunks)
        order = list(range(len(parts)))
        if self.swarm is not None:  # the parts this agent fetches from S3 when all warm at once go first
            swarm = self.swarm
            order.sort(key=lambda i: not swarm.first_mine(src, parts[i][0] // layout.CHUNK_SIZE, 1, entry.chunks))
        fd = await asyncio.to_thread(os.open, tmp, os.O_RDWR)
        writer = PartWriter(fd, tmp, direct=self.settings.direct_io)
        try:
            digests: dict[int, list[bytes]] = dict(finished)
            async with asyncio.TaskGroup() as tg:
                for i in order:
                    if i not in finished:
                        tg.create_task(self._fetch_part(job, f, writer, record, entry, i, parts[i], digests),
                                       name=f"part {i} of {f.key}")
        finally:
            writer.close()
            os.close(fd)
        entry_ = await self._adopt(job, f, tmp, [d for i in range(len(parts)) for d in digests[i]], entry)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(record.unlink)
        return entry_

    async def _adopt(self, job: ModelJob, f: PlannedFile, tmp: Path, chunks: list[bytes],
                     shared: SharedSource) -> ManifestFile:
        digest = layout.combine_chunk_digests(chunks)
        entry = ManifestFile(path=f.relpath, size=f.size, xxh3_128=digest, key=f.key, etag=f.etag)

        def adopt() -> None:  # one trip to a worker thread per file, not three
            size = os.stat(tmp).st_size
            if size != f.size:
                raise S3Error(f"{f.key}: downloaded {size} bytes, expected {f.size}")
            job.build.adopt_file(tmp, digest=digest, size=f.size, relpath=f.relpath, chunks=chunks)
            shared.completed(self.cache.blob_path(digest), digest)
            journal_append(self.cache, job.model.model_id, job.revision, entry)

        await in_thread(adopt)
        return entry

    def _progress_fn(self, progress: ProgressFn | None, source: str = "s3") -> Callable[[int], None]:
        def on_progress(n: int) -> None:
            self.bytes_downloaded += n
            if self._on_bytes:
                self._on_bytes(n, source)
            if progress:
                progress(n)

        return on_progress

    def _take_buffer(self) -> mmap.mmap:
        return self._buffers.pop() if self._buffers else aligned_buffer(BUFFER_SIZE)

    @staticmethod
    def _writer(writer: PartWriter, hasher: layout.ChunkedHasher, shared: SharedSource,
                first_chunk: int) -> Callable[[int, memoryview], None]:
        """Runs in the GET's worker thread: write (direct where it can), then hash the same bytes while they are
        hot in cache.

        The data plane hands over bytes in order (a retry resumes after the last byte handed over), and a range
        starts on a chunk boundary, so the range's chunk digests come out right whatever the retries. Each chunk
        is offered to peers as soon as it is written and hashed.
        """

        def write(offset: int, view: memoryview) -> None:
            writer.write(offset, view)
            before = len(hasher.digests)
            hasher.update(view)
            for k in range(before, len(hasher.digests)):
                shared.digests[first_chunk + k] = hasher.digests[k]

        return write

    async def _fetch_whole(self, job: ModelJob, f: PlannedFile, tmp: Path, shared: SharedSource) -> list[bytes]:
        def abandon(fd: int) -> None:
            os.close(fd)
            tmp.unlink(missing_ok=True)

        fd = await in_thread(create_preallocated, tmp, f.size, on_abandon=abandon)
        writer = PartWriter(fd, tmp, direct=self.settings.direct_io and f.size >= DIRECT_MIN_FILE_SIZE)
        try:
            return await self._fetch_range(job, f, writer, shared, 0, f.size) if f.size else []
        except BaseException:
            # One GET, no part record: a partial file here could never be resumed, so it goes now (a
            # multi-part download keeps its finished parts in tmp/ instead, for the next attempt).
            tmp.unlink(missing_ok=True)
            raise
        finally:
            writer.close()
            os.close(fd)

    async def _fetch_part(self, job: ModelJob, f: PlannedFile, writer: PartWriter, record: Path,
                          shared: SharedSource, index: int, part: tuple[int, int],
                          digests: dict[int, list[bytes]]) -> None:
        chunks = await self._fetch_range(job, f, writer, shared, part[0], part[1])
        await in_thread(append_record, record, index, chunks)
        digests[index] = chunks

    async def _fetch_range(self, job: ModelJob, f: PlannedFile, writer: PartWriter, shared: SharedSource,
                           start: int, length: int) -> list[bytes]:
        """Bring ``[start, start+length)`` (chunk-aligned) to disk; its chunk digests. From S3, or, with peers,
        from whichever peer holds it (:mod:`agent.transfer.swarm`)."""
        swarm = self.swarm
        if swarm is None or not swarm.membership.peers():
            return await self._from_s3(job, f, writer, shared, start, length)
        chunk = layout.CHUNK_SIZE
        on_peer = self._progress_fn(job.progress, "peer")

        async def s3_read(first: int, count: int) -> list[bytes]:
            a = first * chunk
            return await self._from_s3(job, f, writer, shared, a, min(count * chunk, f.size - a))

        def peer_bytes(n: int) -> None:
            job.peer_bytes += n
            on_peer(n)

        return await swarm.fill(shared, start // chunk, -(-length // chunk), s3_read=s3_read,
                                write=lambda offset, view: pwrite_all(writer.fd, view, offset),
                                on_peer_bytes=peer_bytes)

    async def _from_s3(self, job: ModelJob, f: PlannedFile, writer: PartWriter, shared: SharedSource, start: int,
                       length: int) -> list[bytes]:
        hasher = layout.ChunkedHasher()
        first_chunk = start // layout.CHUNK_SIZE
        async with self._slots:
            buffer = self._take_buffer()
            try:
                await self.s3.read_range(bucket=job.model.bucket, key=f.key, etag=f.etag, start=start,
                                         length=length, buffer=buffer,
                                         write=self._writer(writer, hasher, shared, first_chunk),
                                         on_progress=self._progress_fn(job.progress))
            finally:
                self._buffers.append(buffer)
        chunks = hasher.finish()
        shared.put(first_chunk, chunks)
        return chunks
