"""Asking other agents for bytes: who the peers are, what each holds of a source, and reading verified chunks.

Membership is a static list (``WEIGHTCACHE_PEERS``) or the agent's own pods in its namespace, listed again every
``MEMBERSHIP_REFRESH_SECONDS``. Every agent orders the same members the same way, which is what lets agents that
warm the same file at once split it between them (:mod:`agent.transfer.swarm`).

Chunk reads run in worker threads over keep-alive ``http.client`` connections (one per peer per thread): the body
is read straight into the fetch's buffer, each chunk is checked against the digest the peer sent for it, and only
then handed to ``write``. A peer that fails is dropped for that source (never retried for it); the caller then
takes the bytes from another peer or from S3.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import xxhash

from agent import metrics
from agent.config import AgentSettings
from agent.store import layout
from agent.transfer.peerwire import (
    CHUNKS_HEADER,
    DATA_PATH,
    MAX_STATE_BATCH,
    STATE_PATH,
    PeerAddress,
    PeerToken,
    chunk_count,
    decode_bits,
    parse_peer,
    parse_peer_list,
)

log = logging.getLogger(__name__)

MEMBERSHIP_REFRESH_SECONDS = 15.0
#: A source's peer views are asked for again after this long (waiting fetches poll this often).
VIEW_MAX_AGE_SECONDS = 0.15
STATE_TIMEOUT_SECONDS = 2.0
#: A peer whose state request failed (not up yet, restarting) is asked again after this long.
STATE_RETRY_SECONDS = 1.0
#: A peer whose read answered "not held" is asked again after this long.
NOT_HELD_RETRY_SECONDS = 0.2


class PeerError(Exception):
    """A peer could not supply what was asked; ``reason`` is a ``weightcache_peer_errors_total`` label."""

    def __init__(self, reason: str, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        #: The peer no longer (or not yet) holds what its state said — a file moving into the cache, a model
        #: just evicted: asked again shortly, not written off for the file.
        self.transient = transient


@dataclass(frozen=True, slots=True)
class PeerView:
    """What one peer holds of one source: all of it, or the chunks it has (``have``) and is fetching (``busy``)."""

    peer: PeerAddress
    size: int
    complete: bool
    digest: str | None
    have: bytearray | None = None
    busy: bytearray | None = None

    def holds(self, chunk: int) -> bool:
        return self.complete or (self.have is not None and chunk < len(self.have) and bool(self.have[chunk]))

    def fetching(self, chunk: int) -> bool:
        return self.busy is not None and chunk < len(self.busy) and bool(self.busy[chunk])

    def run(self, first: int, end: int) -> int:
        """How many chunks from ``first`` (up to ``end``) this peer holds in a row."""
        n = 0
        while first + n < end and self.holds(first + n):
            n += 1
        return n


class Membership:
    """The agents this one may ask, and a common order of all of them (itself included)."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        own = settings.peer_address or (f"{settings.pod_ip}:{settings.peer_port}" if settings.pod_ip else "")
        self.own: PeerAddress | None = parse_peer(own, default_port=settings.peer_port) if own else None
        self._identity = str(self.own) if self.own else socket.gethostname()
        self._peers: list[PeerAddress] = []
        if settings.peers:
            self.set(parse_peer_list(settings.peers, default_port=settings.peer_port))

    @property
    def static(self) -> bool:
        return bool(self.settings.peers)

    def set(self, peers: list[PeerAddress]) -> None:
        self._peers = sorted({p for p in peers if p != self.own}, key=str)

    def peers(self) -> list[PeerAddress]:
        return list(self._peers)

    def ranking(self) -> tuple[list[str], int]:
        """Every member's name in the common order, and this agent's index in it."""
        names = sorted({*(str(p) for p in self._peers), self._identity})
        return names, names.index(self._identity)

    async def follow_pods(self, list_pods: Callable[[], Awaitable[list[str]]]) -> None:
        """Keep the member list to the agent's pods (their IPs), listed again every refresh."""
        while True:
            try:
                ips = await list_pods()
                before = self._peers
                self.set([PeerAddress(ip, self.settings.peer_port) for ip in ips])
                if self._peers != before:
                    log.info("peers: %s", ", ".join(map(str, self._peers)) or "none")
            except Exception as e:  # noqa: BLE001  # discovery failing only means fewer peers: S3 still serves
                log.warning("listing peer pods failed (keeping %d peers): %s", len(self._peers), e)
            await asyncio.sleep(MEMBERSHIP_REFRESH_SECONDS)


@dataclass
class _Views:
    at: float = -1.0
    views: list[PeerView] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class PeerClient:
    """Asks peers what they hold of a source and reads verified chunks from them."""

    def __init__(self, settings: AgentSettings, token: PeerToken, membership: Membership) -> None:
        self.settings, self.token, self.membership = settings, token, membership
        self._pool = ThreadPoolExecutor(max_workers=max(2, settings.concurrency), thread_name_prefix="peer")
        self._local = threading.local()
        self._views: dict[str, _Views] = {}
        #: Peers not to ask about a source until a time (monotonic): for good after a failed read, briefly after
        #: a failed state request (a peer whose port is not up yet is asked again, not written off).
        self._dropped: dict[str, dict[PeerAddress, float]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._pending: dict[str, tuple[int, asyncio.Future[list[PeerView]]]] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if self._session is not None:
            await self._session.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def forget(self, source: str) -> None:
        """The fetch of ``source`` ended: drop what was learnt about it."""
        self._views.pop(source, None)
        self._dropped.pop(source, None)

    def drop(self, source: str, peer: PeerAddress, error: PeerError, *, for_seconds: float = math.inf) -> None:
        if error.transient:
            for_seconds = min(for_seconds, NOT_HELD_RETRY_SECONDS)
        dropped = self._dropped.setdefault(source, {})
        if peer not in dropped and for_seconds == math.inf:
            log.warning("peer %s dropped for source %s (%s): %s", peer, source[:12], error.reason, error)
        elif peer not in dropped:
            log.debug("peer %s unavailable for source %s (%s): %s", peer, source[:12], error.reason, error)
        metrics.PEER_ERRORS.labels(reason=error.reason).inc()
        dropped[peer] = max(dropped.get(peer, 0.0), time.monotonic() + for_seconds)
        entry = self._views.get(source)
        if entry is not None:
            entry.views = [v for v in entry.views if v.peer != peer]

    # ----- what peers hold --------------------------------------------------------------------------------

    async def views(self, source: str, size: int) -> list[PeerView]:
        """What each usable peer holds of ``source`` (peers that do not know it are left out); cached briefly.

        Asked in batches: every source asked for in the same turn of the loop goes to each peer in one request,
        so a model of thousands of small files costs a few requests per peer, not thousands.
        """
        entry = self._views.setdefault(source, _Views())
        if time.monotonic() - entry.at < VIEW_MAX_AGE_SECONDS:
            return entry.views
        async with entry.lock:
            if time.monotonic() - entry.at >= VIEW_MAX_AGE_SECONDS:
                future: asyncio.Future[list[PeerView]] = asyncio.get_running_loop().create_future()
                self._pending[source] = (size, future)
                if self._flusher is None or self._flusher.done():
                    self._flusher = asyncio.create_task(self._flush(), name="peer-state")
                entry.views = await future
                entry.at = time.monotonic()
        return entry.views

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let every fetch of this turn add its sources
            batch = dict(list(self._pending.items())[:MAX_STATE_BATCH])
            for source in batch:
                del self._pending[source]
            now = time.monotonic()
            peers = self.membership.peers()
            asked = {p: [s for s in batch if self._dropped.get(s, {}).get(p, 0.0) <= now] for p in peers}
            answers = await asyncio.gather(*(self._states(p, srcs, batch) for p, srcs in asked.items() if srcs))
            for source, (_size, future) in batch.items():
                if not future.done():
                    future.set_result([views[source] for views in answers if source in views])

    async def _states(self, peer: PeerAddress, sources: list[str],
                      batch: dict[str, tuple[int, asyncio.Future[list[PeerView]]]]) -> dict[str, PeerView]:
        """One peer's state of ``sources`` (those it does not know are left out)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=min(STATE_TIMEOUT_SECONDS, self.settings.peer_timeout)))
        out: dict[str, PeerView] = {}
        try:
            async with self._session.post(f"http://{peer}{STATE_PATH}", json={"sources": sources},
                                          headers=self.token.header()) as resp:
                if resp.status in (401, 403):
                    raise PeerError("unauthorized", f"{peer} refused our peer token (HTTP {resp.status})")
                if resp.status != 200:
                    raise PeerError("refused", f"{peer} answered HTTP {resp.status} to a state request")
                body: dict[str, Any] = await resp.json()
            for source, state in (body.get("sources") or {}).items():
                if source in batch and state is not None:
                    view = _view(peer, state, batch[source][0])
                    if view is not None:
                        out[source] = view
            return out
        except PeerError as e:
            for source in sources:
                self.drop(source, peer, e)
        except TimeoutError as e:
            for source in sources:
                self.drop(source, peer, PeerError("stalled", f"state request timed out: {e!r}"),
                          for_seconds=STATE_RETRY_SECONDS)
        except (aiohttp.ClientError, OSError, ValueError, KeyError, TypeError) as e:
            for source in sources:
                self.drop(source, peer, PeerError("connection", f"state request failed: {e!r}"),
                          for_seconds=STATE_RETRY_SECONDS)
        return {}

    # ----- reading chunks ----------------------------------------------------------------------------------

    async def read(self, peer: PeerAddress, source: str, size: int, first: int, count: int, buffer: bytearray,
                   write: Callable[[int, memoryview], None]) -> list[bytes]:
        """Read chunks ``[first, first+count)`` from ``peer``, check each, ``write(offset, view)`` it; digests."""
        job = _ReadJob(peer, source, size, first, count, buffer, write)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._read_blocking, job)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            job.cancel()
            await asyncio.wait([fut])
            if not fut.cancelled():
                fut.exception()
            raise

    def _connection(self, peer: PeerAddress) -> http.client.HTTPConnection:
        conns: dict[PeerAddress, http.client.HTTPConnection] = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(peer)
        if conn is None:
            conn = conns[peer] = http.client.HTTPConnection(peer.host, peer.port, timeout=self.settings.peer_timeout)
        return conn

    def _read_blocking(self, job: _ReadJob) -> list[bytes]:
        conn = self._connection(job.peer)
        job.conn = conn
        chunk = layout.CHUNK_SIZE
        start = job.first * chunk
        length = min(job.count * chunk, job.size - start)
        ok = False
        try:
            conn.request("GET", DATA_PATH.format(source=job.source),
                         headers={**self.token.header(), "Range": f"bytes={start}-{start + length - 1}"})
            resp = conn.getresponse()
            if resp.status != 206:
                resp.read(64 * 1024)
                reason = "unauthorized" if resp.status in (401, 403) else "refused"
                raise PeerError(reason, f"HTTP {resp.status} for chunks {job.first}+{job.count}",
                                transient=resp.status in (404, 409))
            digests = [bytes.fromhex(h) for h in (resp.getheader(CHUNKS_HEADER) or "").split(",") if h]
            if len(digests) != job.count or resp.getheader("Content-Length") != str(length):
                raise PeerError("refused", "answer does not cover the chunks asked for")
            view = memoryview(job.buffer)
            offset = start
            for i, want in enumerate(digests):
                if job.cancelled.is_set():
                    raise PeerError("connection", "cancelled")
                n = min(chunk, job.size - offset)
                _read_exactly(resp, view[:n])
                if xxhash.xxh3_128_digest(view[:n]) != want:
                    raise PeerError("corrupt", f"chunk {job.first + i} does not match its digest")
                job.write(offset, view[:n])
                offset += n
            ok = resp.read(1) == b"" and not resp.will_close
            return digests
        except TimeoutError as e:
            raise PeerError("stalled", f"no bytes for {self.settings.peer_timeout:.0f} s") from e
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise PeerError("connection", repr(e)) from e
        finally:
            job.conn = None
            if not ok:
                conn.close()


@dataclass
class _ReadJob:
    peer: PeerAddress
    source: str
    size: int
    first: int
    count: int
    buffer: bytearray
    write: Callable[[int, memoryview], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    conn: http.client.HTTPConnection | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        conn = self.conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wake the thread blocked in recv


def _read_exactly(resp: http.client.HTTPResponse, view: memoryview) -> None:
    while view:
        n = resp.readinto(view)
        if not n:
            raise PeerError("connection", "the peer closed the connection mid-chunk")
        view = view[n:]


def _view(peer: PeerAddress, body: dict[str, Any], size: int) -> PeerView | None:
    if int(body["size"]) != size or int(body["chunk_size"]) != layout.CHUNK_SIZE:
        return None  # another revision or chunking: nothing to share
    if body.get("complete"):
        return PeerView(peer, size, True, str(body.get("digest") or "") or None)
    n = chunk_count(size, layout.CHUNK_SIZE)
    return PeerView(peer, size, False, None, decode_bits(body.get("have", ""), n), decode_bits(body.get("busy", ""), n))


__all__ = ["Membership", "PeerClient", "PeerError", "PeerView"]
