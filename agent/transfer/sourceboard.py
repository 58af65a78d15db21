"""What this agent holds of the files it is fetching right now, chunk by chunk — what peers may take from it.

The fetch path writes here (from its worker threads: a chunk is marked held once it is written *and* hashed, busy
while an S3 GET for it is in flight); the peer server reads here. Finished files stay on the board, pointing at
their blob, until their model's fetch ends; after that the cache's own index serves them. Single-byte stores into a
``bytearray`` and list item stores are atomic under the GIL, so readers never need a lock: they may see a chunk a
moment late, never early.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.store import layout
from agent.transfer.peerwire import chunk_count


@dataclass
class SharedSource:
    """One object revision being fetched: where its bytes are and which chunks are verified."""

    source: str
    size: int
    path: Path  # the download in tmp/, then (once adopted) the blob
    digests: list[bytes | None]
    busy: bytearray
    digest: str = ""  # the file digest, once complete
    holders: int = 1
    #: When the fetch of the model this file belongs to began (the start-up grace for owners counts from it).
    opened_at: float = field(default_factory=time.monotonic)
    #: Peers this fetch stopped waiting for (they kept a chunk busy, or owned one, past the wait): not again.
    given_up: set[str] = field(default_factory=set)

    @classmethod
    def start(cls, source: str, size: int, path: Path) -> SharedSource:
        n = chunk_count(size, layout.CHUNK_SIZE)
        return cls(source=source, size=size, path=path, digests=[None] * n, busy=bytearray(n))

    @property
    def chunks(self) -> int:
        return len(self.digests)

    def have_bits(self) -> bytearray:
        return bytearray(0 if d is None else 1 for d in self.digests)

    def held(self, first: int, count: int) -> list[bytes] | None:
        """The digests of chunks ``[first, first+count)`` if all are held, else None."""
        out = self.digests[first:first + count]
        if len(out) != count or any(d is None for d in out):
            return None
        return out  # type: ignore[return-value]  # no None left

    def put(self, first: int, digests: list[bytes]) -> None:
        for i, d in enumerate(digests):
            self.digests[first + i] = d

    def mark_busy(self, first: int, count: int, value: int) -> None:
        for i in range(first, min(first + count, len(self.busy))):
            self.busy[i] = value

    def completed(self, blob: Path, digest: str) -> None:
        self.path, self.digest = blob, digest
        self.busy[:] = bytes(len(self.busy))


class SourceBoard:
    """The sources this agent is fetching, by source id (one fetch per source at a time: the source lock)."""

    def __init__(self) -> None:
        self._sources: dict[str, SharedSource] = {}

    def open(self, source: str, size: int, path: Path, *, since: float | None = None) -> SharedSource:
        entry = self._sources.get(source)
        if entry is not None and entry.size == size and not entry.digest:
            entry.holders += 1
            return entry
        entry = SharedSource.start(source, size, path)
        if since is not None:
            entry.opened_at = since
        self._sources[source] = entry
        return entry

    def get(self, source: str) -> SharedSource | None:
        return self._sources.get(source)

    def close(self, entry: SharedSource) -> None:
        entry.holders -= 1
        if entry.holders <= 0 and self._sources.get(entry.source) is entry:
            del self._sources[entry.source]
