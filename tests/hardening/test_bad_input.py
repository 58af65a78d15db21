"""Area 6 — bad input: hypothesis-generated annotations (through the real Reconciler), model URIs and S3 object keys.
Nothing crashes, every invalid or denied entry earns the pod a Warning Event, and no accepted URI or key resolves
outside the cache root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hardening import scenarios


def _root(work: Path) -> Path:
    # The fuzzer checks nothing appears beside its root, so the root gets a directory of its own.
    (work / "fuzz").mkdir()
    return work / "fuzz" / "cache"


def test_four_hundred_hostile_inputs_of_each_kind_crash_nothing_and_escape_nothing(work: Path) -> None:
    figures = scenarios.fuzz(400, root=_root(work))
    assert figures["annotations"] == figures["uris"] == figures["keys"] == 400, figures
    # The strategies reach both sides: some URIs and keys are accepted, some rejected, and warnings are sent.
    assert {"uri accepted", "uri rejected", "key accepted", "key rejected"} <= set(figures["outcomes"]), figures
    assert figures["warning_events"] > 0, figures


@pytest.mark.soak
def test_ten_thousand_hostile_inputs_of_each_kind_crash_nothing_and_escape_nothing(work: Path) -> None:
    # seed=1: not derandomized, so every soak run explores inputs the CI run never tried.
    figures = scenarios.fuzz(10_000, root=_root(work), seed=1)
    assert figures["inputs_tried"] >= 30_000, figures
