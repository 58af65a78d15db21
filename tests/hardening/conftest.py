"""Fixtures of the hardening tests: fresh buckets on the session's S3 servers, a fault proxy in front of each,
and a work directory. Tests marked ``soak`` (the long versions) are skipped unless asked for with ``-m soak`` or
``WEIGHTCACHE_SOAK=1``; ``bench/soak.py`` runs the same scenarios at full size without pytest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.faultproxy import FaultPlan, FaultProxy
from tests.fixtures.s3servers import S3Server, fresh_bucket


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("WEIGHTCACHE_SOAK") == "1" or "soak" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="long soak version: run with -m soak, WEIGHTCACHE_SOAK=1, or bench/soak.py")
    for item in items:
        if "soak" in item.keywords and "tests/hardening" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture
def rclone_bucket(rclone_s3: S3Server) -> Iterator[str]:
    yield from fresh_bucket(rclone_s3)


@pytest.fixture
def rclone_bucket_b(rclone_s3: S3Server) -> Iterator[str]:
    """A second fresh bucket (another tenant's)."""
    yield from fresh_bucket(rclone_s3)


@pytest.fixture
def moto_bucket(moto_s3: S3Server) -> Iterator[str]:
    yield from fresh_bucket(moto_s3)


@pytest.fixture
def rclone_proxy(rclone_s3: S3Server, fault_proxy: Callable[..., FaultProxy]) -> FaultProxy:
    """A (so far transparent) fault proxy in front of rclone; scenarios set its plan."""
    return fault_proxy(rclone_s3, FaultPlan.none())


@pytest.fixture
def moto_proxy(moto_s3: S3Server, fault_proxy: Callable[..., FaultProxy]) -> FaultProxy:
    return fault_proxy(moto_s3, FaultPlan.none())


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path
