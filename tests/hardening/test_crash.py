"""Area 2 — ``kill -9`` of the agent at seeded points across a multi-file fetch: never a partial model at the
mirrored path, and after the restarts the model is byte-identical with no temp file left."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.faultproxy import FaultProxy
from tests.fixtures.s3servers import S3Server
from tests.hardening import scenarios


def test_kill_9_at_five_random_points_never_shows_a_partial_model(
        rclone_s3: S3Server, rclone_bucket: str, rclone_proxy: FaultProxy, work: Path) -> None:
    figures = scenarios.crash_soak(rclone_s3, rclone_bucket, rclone_proxy, work=work, kills=5, seed=2)
    assert figures["kills"] == 5
    # Resume keeps finished parts: re-downloads stay well below re-fetching the model after every kill.
    assert figures["redownloaded_bytes"] < 5 * figures["model_bytes"], figures


@pytest.mark.soak
def test_kill_9_at_twenty_random_points_never_shows_a_partial_model(
        rclone_s3: S3Server, rclone_bucket: str, rclone_proxy: FaultProxy, work: Path) -> None:
    figures = scenarios.crash_soak(rclone_s3, rclone_bucket, rclone_proxy, work=work, kills=20, seed=20)
    assert figures["kills"] == 20
