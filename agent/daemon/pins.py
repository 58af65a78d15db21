"""The pinned set: the models a live pod on this node wants, which eviction must never remove.

The :class:`~agent.daemon.demand.Reconciler` decides it and the :class:`~agent.transfer.fetch.Fetcher` reads
it (to make room
for a download without evicting a model in use), so it exists before either: the daemon creates one ``Pins`` and
hands it to both. The reconciler replaces the set whole on the event loop; readers in worker threads get the
current frozenset, which a swap never changes under them, so no lock is needed. Other processes learn the set
from ``state/pins.json`` (:meth:`agent.store.cache.Cache.write_pins`), which the reconciler writes.
"""

from __future__ import annotations

from collections.abc import Iterable


class Pins:
    """The current pinned model ids; replaced whole, readable from any thread."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: frozenset[str] = frozenset()

    def replace(self, model_ids: Iterable[str]) -> frozenset[str]:
        """Set the pinned models (on the event loop); returns the new snapshot."""
        self._ids = frozenset(model_ids)
        return self._ids

    def snapshot(self) -> frozenset[str]:
        """The pinned set as it is now (it never changes afterwards)."""
        return self._ids

    def ids(self) -> set[str]:
        """A mutable copy of the pinned set (what ``Fetcher(pinned=...)`` and the HTTP API take)."""
        return set(self._ids)


__all__ = ["Pins"]
