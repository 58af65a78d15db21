"""Shared test set-up: real servers come from the fixture modules below (started on loopback, stopped after)."""

from __future__ import annotations

import asyncio
import os

import pytest

pytest_plugins = ["tests.fixtures.s3servers", "tests.fixtures.faultproxy"]

# Never let a test reach a real AWS metadata endpoint or pick up a developer's profile.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(autouse=True)
def _no_leftover_tasks(request: pytest.FixtureRequest) -> None:
    """Fail an async test that leaves asyncio tasks running behind it (kopf's habit)."""
    yield
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    current = asyncio.current_task(loop)
    leftover = [t for t in asyncio.all_tasks(loop) if t is not current and not t.done()]
    if leftover:
        pytest.fail(f"test left asyncio tasks running: {[t.get_name() for t in leftover]}")
