"""Fixtures of the deploy tests: each kustomization rendered once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from .rendered import ENTRY_POINTS, Obj, entry_id, render


@pytest.fixture(scope="session")
def renders() -> dict[Path, list[Obj]]:
    return {path: render(path) for path in ENTRY_POINTS}


@pytest.fixture(scope="session")
def base(renders: dict[Path, list[Obj]]) -> list[Obj]:
    """What `kubectl apply -k manifests/` applies."""
    return renders[ENTRY_POINTS[0]]


@pytest.fixture(scope="session")
def monitoring(renders: dict[Path, list[Obj]]) -> list[Obj]:
    """The base plus the prometheus-operator objects."""
    return next(objs for path, objs in renders.items() if entry_id(path) == "overlays/monitoring")


@pytest.fixture(scope="session")
def every_object(renders: dict[Path, list[Obj]]) -> list[tuple[str, Obj]]:
    """(entry point, object) for every object of every entry point: policies hold in every overlay."""
    return [(entry_id(path), obj) for path, objs in renders.items() for obj in objs]
