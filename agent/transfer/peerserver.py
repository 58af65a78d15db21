"""Serves this agent's verified bytes to other agents (the peer port): the files of its live models and the held
chunks of the files it is fetching right now. See :mod:`agent.transfer.peerwire` for the protocol.

Only immutable bytes leave: a published blob never changes, and a chunk of a download is offered only once it is
written and hashed. Bytes go out with ``sendfile`` (no copy through Python); the chunk digests go with them, so the
fetching side checks every chunk. A live model's chunk digests come from the record written when it was adopted
(:func:`agent.store.publish.read_chunks`); a file without one (adopted by an older agent, or migrated) is not offered.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.typedefs import Handler

from agent import metrics
from agent.store import layout
from agent.store.cache import Cache
from agent.store.manifest import source_id
from agent.store.publish import read_chunks
from agent.transfer.peerwire import (
    CHUNKS_HEADER,
    MAX_STATE_BATCH,
    SOURCE_RE,
    STATE_PATH,
    PeerToken,
    chunk_count,
    encode_bits,
)
from agent.transfer.sourceboard import SharedSource, SourceBoard

log = logging.getLogger(__name__)

#: How stale the index of live files may be: a model published a moment ago is offered this much later.
INDEX_TTL_SECONDS = 2.0
#: One answer covers at most this many chunks (the fetching side asks for less).
MAX_RANGE_CHUNKS = 64
SETTLE_POLLS = 20
_RANGE_RE = re.compile(r"bytes=(\d+)-(\d+)")


@dataclass(frozen=True, slots=True)
class _LiveFile:
    digest: str
    size: int


class PeerServer:
    """The peer port's application: token check first, then the two read-only routes."""

    def __init__(self, cache: Cache, board: SourceBoard, token: PeerToken) -> None:
        self.cache, self.board, self.token = cache, board, token
        self._index: dict[str, _LiveFile] = {}
        self._index_at = -INDEX_TTL_SECONDS
        self._index_lock = asyncio.Lock()
        self._chunks: OrderedDict[str, list[bytes]] = OrderedDict()
        #: Whether a live blob has a consistent chunk record, learnt once per index (state requests come every
        #: ~150 ms from every waiting peer, for every file: they must not re-read the records each time).
        self._offered: dict[str, bool] = {}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post(STATE_PATH, self.state)
        app.router.add_get("/v1/peer/sources/{source}", self.data)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        status = self.token.check(request.headers.get("Authorization"))
        if status == 401:
            metrics.PEER_ERRORS.labels(reason="unauthorized").inc()
            raise web.HTTPUnauthorized(text="peer token required\n", headers={"WWW-Authenticate": "Bearer"})
        if status == 403:
            metrics.PEER_ERRORS.labels(reason="unauthorized").inc()
            log.warning("peer request from %s with a wrong token", request.remote)
            raise web.HTTPForbidden(text="wrong peer token\n")
        return await handler(request)

    # ----- routes ---------------------------------------------------------------------------------------

    async def state(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            sources = body["sources"]
            if not isinstance(sources, list) or len(sources) > MAX_STATE_BATCH:
                raise ValueError(f"sources: a list of at most {MAX_STATE_BATCH}")
        except (ValueError, KeyError, TypeError) as e:
            raise web.HTTPBadRequest(text=f"expected {{\"sources\": [source ids]}}: {e}\n") from None
        out: dict[str, dict[str, object] | None] = {}
        for source in sources:
            if isinstance(source, str) and SOURCE_RE.fullmatch(source):
                out[source] = await self._state_of(source)
        return web.json_response({"sources": out})

    async def _state_of(self, source: str) -> dict[str, object] | None:
        entry = self.board.get(source)
        if entry is not None:
            complete = bool(entry.digest)
            body: dict[str, object] = {"size": entry.size, "chunk_size": layout.CHUNK_SIZE, "complete": complete,
                                       "digest": entry.digest or None}
            if not complete:
                body["have"] = encode_bits(entry.have_bits())
                body["busy"] = encode_bits(bytes(entry.busy))
            return body
        live = await self._live(source)
        if live is None or not await self._is_offered(live):
            return None
        return {"size": live.size, "chunk_size": layout.CHUNK_SIZE, "complete": True, "digest": live.digest}

    async def data(self, request: web.Request) -> web.StreamResponse:
        source = _source(request)
        entry = self.board.get(source)
        if entry is not None:
            await _settled(entry)
            path, size = entry.path, entry.size
            first, count = _chunk_range(request, size)
            digests = entry.held(first, count)
        else:
            live = await self._live(source)
            if live is None:
                raise web.HTTPNotFound(text="source not held\n")
            path, size = self.cache.blob_path(live.digest), live.size
            first, count = _chunk_range(request, size)
            all_chunks = await self._live_chunks(live)
            digests = all_chunks[first:first + count] if all_chunks is not None else None
        if digests is None:
            raise web.HTTPConflict(text="chunks not held (yet)\n")
        start = first * layout.CHUNK_SIZE
        length = min(count * layout.CHUNK_SIZE, size - start)
        # A download adopted (tmp → blob) between the lookup and the open answers 404: the caller asks again.
        return _CountedFile(path, length, headers={CHUNKS_HEADER: ",".join(d.hex() for d in digests),
                                                   "Cache-Control": "no-store"})

    # ----- what is held -------------------------------------------------------------------------------

    async def _live(self, source: str) -> _LiveFile | None:
        if time.monotonic() - self._index_at >= INDEX_TTL_SECONDS:
            async with self._index_lock:
                if time.monotonic() - self._index_at >= INDEX_TTL_SECONDS:
                    self._index = await asyncio.to_thread(self._build_index)
                    self._index_at = time.monotonic()
                    held = {f.digest for f in self._index.values()}
                    self._offered = {d: ok for d, ok in self._offered.items() if d in held}
        return self._index.get(source)

    def _build_index(self) -> dict[str, _LiveFile]:
        index: dict[str, _LiveFile] = {}
        for (bucket, key, etag, size), digest in self.cache.source_index().items():
            index[source_id(bucket, key, etag, size)] = _LiveFile(digest, size)
        return index

    async def _is_offered(self, live: _LiveFile) -> bool:
        offered = self._offered.get(live.digest)
        if offered is None:
            offered = self._offered[live.digest] = await self._live_chunks(live) is not None
        return offered

    async def _live_chunks(self, live: _LiveFile) -> list[bytes] | None:
        cached = self._chunks.get(live.digest)
        if cached is not None:
            self._chunks.move_to_end(live.digest)
            return cached
        chunks = await asyncio.to_thread(read_chunks, self.cache, live.digest, live.size)
        if chunks is not None:
            self._chunks[live.digest] = chunks
            while len(self._chunks) > 16:
                self._chunks.popitem(last=False)
        return chunks


async def _settled(entry: SharedSource) -> None:
    """Wait out the moment a finished download moves from tmp/ into blobs/ (its old path gone, the new not set)."""
    for _ in range(SETTLE_POLLS):
        if entry.digest:
            return
        if await asyncio.to_thread(entry.path.exists):
            return
        await asyncio.sleep(0.01)


class _CountedFile(web.FileResponse):
    """``sendfile`` of the range; counted in ``weightcache_peer_served_bytes_total`` once sent."""

    def __init__(self, path: Path, length: int, *, headers: dict[str, str]) -> None:
        super().__init__(path, headers=headers)
        self._length = length

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        if self.status == 206:
            metrics.PEER_SERVED_BYTES.inc(self._length)
        return writer


def _source(request: web.Request) -> str:
    source = request.match_info["source"]
    if not SOURCE_RE.fullmatch(source):
        raise web.HTTPNotFound(text="no such source\n")
    return source


def _chunk_range(request: web.Request, size: int) -> tuple[int, int]:
    """The chunks a ``Range: bytes=a-b`` covers; it must start and end on chunk boundaries (or the file's end)."""
    m = _RANGE_RE.fullmatch(request.headers.get("Range", "").strip())
    if not m:
        raise web.HTTPBadRequest(text="a chunk-aligned Range: bytes=a-b is required\n")
    a, b = int(m.group(1)), int(m.group(2))
    chunk = layout.CHUNK_SIZE
    end = b + 1
    if a % chunk or a >= size or b < a or (end % chunk and end != size) or end > size:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    first, count = a // chunk, chunk_count(end - a, chunk)
    if count > MAX_RANGE_CHUNKS:
        raise web.HTTPRequestRangeNotSatisfiable(text=f"at most {MAX_RANGE_CHUNKS} chunks per request\n")
    return first, count


async def start_peer_server(server: PeerServer, *, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("peer exchange on %s:%d", host, port)
    return runner


__all__ = ["PeerServer", "start_peer_server"]
