"""How one file's chunks are split between S3 and peers, so that agents warming the same file at once pull about
one copy from S3 in all, and an agent that arrives later pulls almost nothing from it.

Every member orders the members the same way (:meth:`agent.transfer.peerclient.Membership.ranking`) and so agrees on an
*owner* for every chunk of a source: the file's chunks are cut into as many runs as there are members, rotated by
the source id (so a model of many one-chunk files spreads too). For each run of chunks a fetch:

1. takes it from a peer that holds it (every chunk checked against its digest before it is written);
2. else waits — while another agent is fetching it from S3 (its ``busy`` bits), while its owner is warming the same
   source, or for a short start-up grace while the owner may not have started yet — at most ``peer_wait_seconds``;
3. else fetches it from S3 itself, marking it busy so the others wait for it instead.

A peer that refuses, stalls, dies or sends a bad chunk is dropped for the file; the chunk then comes from another
peer or S3. S3 always stays the fallback, so a peer can slow a fetch down by at most the wait, never break it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from agent.config import AgentSettings
from agent.store import layout
from agent.transfer.peerclient import Membership, PeerClient, PeerError, PeerView
from agent.transfer.sourceboard import SharedSource

log = logging.getLogger(__name__)

#: How long, from the start of a model's fetch, an owner that does not know a source yet is assumed to be about to
#: start on it too (counted per model, not per file: a model of thousands of files waits once, not per file).
START_GRACE_SECONDS = 1.0
#: Chunks asked of a peer in one request.
MAX_PEER_REQUEST_CHUNKS = 16
#: Chunks read from S3 in one request: of a run this agent owns, and of a run it takes over from another.
MAX_S3_RUN_CHUNKS = 16
TAKEOVER_RUN_CHUNKS = 4

S3Read = Callable[[int, int], Awaitable[list[bytes]]]


class Swarm:
    """Fills chunk ranges of the files this agent fetches, from peers where it can and S3 where it must."""

    def __init__(self, settings: AgentSettings, client: PeerClient, membership: Membership) -> None:
        self.settings, self.client, self.membership = settings, client, membership
        self._slots = asyncio.Semaphore(max(1, settings.concurrency))
        self._buffers: list[bytearray] = []

    def owner(self, source: str, chunk: int, chunks: int) -> tuple[str, bool]:
        """The member that fetches ``chunk`` from S3 when all warm at once, and whether it is this agent."""
        names, me = self.membership.ranking()
        n = len(names)
        index = (chunk * n // max(chunks, 1) + int(source[:8], 16)) % n
        return names[index], index == me

    def first_mine(self, source: str, first: int, count: int, chunks: int) -> bool:
        """Whether a range starts with a chunk this agent owns (such ranges are fetched first)."""
        return self.owner(source, first, chunks)[1] if count else False

    async def fill(self, entry: SharedSource, first: int, count: int, *, s3_read: S3Read,
                   write: Callable[[int, memoryview], None], on_peer_bytes: Callable[[int], None]) -> list[bytes]:
        """Bring chunks ``[first, first+count)`` of ``entry``'s source to disk; their digests, in order."""
        source, size, chunks = entry.source, entry.size, entry.chunks
        end = first + count
        pos = first
        out: list[bytes] = []
        waiting_since: float | None = None
        while pos < end:
            views = await self.client.views(source, size)
            holder, run = _best_holder(views, pos, min(end, pos + MAX_PEER_REQUEST_CHUNKS))
            if holder is not None:
                try:
                    digests = await self._from_peer(holder, entry, pos, run, write)
                except PeerError as e:
                    self.client.drop(source, holder.peer, e)
                    continue
                entry.put(pos, digests)
                on_peer_bytes(min(run * layout.CHUNK_SIZE, size - pos * layout.CHUNK_SIZE))
                out.extend(digests)
                pos += run
                waiting_since = None
                continue
            if self._worth_waiting(entry, pos, views):
                now = time.monotonic()
                waiting_since = waiting_since or now
                if now - waiting_since < self.settings.peer_wait_seconds:
                    await asyncio.sleep(0.05)
                    continue
                log.info("source %s chunk %d: waited %.0f s for peers; fetching it from S3", source[:12], pos,
                         now - waiting_since)
                entry.given_up.update(str(v.peer) for v in views if v.fetching(pos))
                entry.given_up.add(self.owner(source, pos, chunks)[0])
            # Short S3 reads, so the choice is made again with fresh views: shorter still when taking over chunks
            # another agent owns (it may turn up and start on them meanwhile).
            limit = pos + (MAX_S3_RUN_CHUNKS if self.owner(source, pos, chunks)[1] else TAKEOVER_RUN_CHUNKS)
            stop = pos + 1
            while stop < min(end, limit) and not self._taken_elsewhere(entry, stop, views, chunks):
                stop += 1
            entry.mark_busy(pos, stop - pos, 1)
            try:
                digests = await s3_read(pos, stop - pos)
            finally:
                entry.mark_busy(pos, stop - pos, 0)
            out.extend(digests)
            pos = stop
            waiting_since = None
        return out

    def _worth_waiting(self, entry: SharedSource, chunk: int, views: list[PeerView]) -> bool:
        if any(v.fetching(chunk) and str(v.peer) not in entry.given_up for v in views):
            return True
        owner, mine = self.owner(entry.source, chunk, entry.chunks)
        if mine or owner in entry.given_up:
            return False
        if any(str(v.peer) == owner for v in views):
            return True  # the owner warms this source too: it will fetch this chunk
        known = {str(p) for p in self.membership.peers()}
        return owner in known and time.monotonic() - entry.opened_at < START_GRACE_SECONDS

    def _taken_elsewhere(self, entry: SharedSource, chunk: int, views: list[PeerView], chunks: int) -> bool:
        """Whether an S3 read that reached ``chunk`` should stop before it (someone else has or gets it)."""
        if any(v.holds(chunk) or (v.fetching(chunk) and str(v.peer) not in entry.given_up) for v in views):
            return True
        owner, mine = self.owner(entry.source, chunk, chunks)
        return not mine and owner not in entry.given_up and any(str(v.peer) == owner for v in views)

    async def _from_peer(self, view: PeerView, entry: SharedSource, first: int, count: int,
                         write: Callable[[int, memoryview], None]) -> list[bytes]:
        async with self._slots:
            buffer = self._buffers.pop() if self._buffers else bytearray(layout.CHUNK_SIZE)
            try:
                return await self.client.read(view.peer, entry.source, entry.size, first, count, buffer, write)
            finally:
                self._buffers.append(buffer)


def _best_holder(views: list[PeerView], first: int, end: int) -> tuple[PeerView | None, int]:
    """The peer holding the longest run from ``first`` (ties broken at random, to spread the load)."""
    best: list[PeerView] = []
    best_run = 0
    for v in views:
        run = v.run(first, end)
        if run > best_run:
            best, best_run = [v], run
        elif run == best_run and run:
            best.append(v)
    return (random.choice(best), best_run) if best else (None, 0)


__all__ = ["Swarm"]
