"""agent/daemon/pins.py: the pinned set, made before the fetcher and the reconciler and shared by both."""

from __future__ import annotations

from agent.daemon.pins import Pins


def test_a_snapshot_never_changes_when_the_set_is_replaced() -> None:
    pins = Pins()
    before = pins.replace(["a", "b"])
    pins.replace(["c"])
    assert before == {"a", "b"} and pins.snapshot() == {"c"}


def test_readers_get_a_copy_they_may_change() -> None:
    pins = Pins()
    pins.replace(["a"])
    mine = pins.ids()
    mine.add("x")
    assert pins.ids() == {"a"}
