"""Area 4 — the disk: a model larger than the cache budget is refused before a byte is downloaded, and a real
ENOSPC (a 20 MiB tmpfs filling up under a running daemon) fails that one model with DiskFull, leaves no temp file,
keeps the other model intact and the daemon serving, and the next model that fits is fetched."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.faultproxy import FaultProxy
from tests.fixtures.s3servers import S3Server
from tests.hardening import scenarios


def test_a_model_over_the_budget_fails_at_once_without_downloading_a_byte(
        rclone_s3: S3Server, rclone_bucket: str, rclone_proxy: FaultProxy, work: Path) -> None:
    figures = scenarios.budget_exceeded(rclone_s3, rclone_bucket, rclone_proxy, work=work)
    assert "BudgetExceeded" in figures["error"], figures
    assert figures["bytes_downloaded"] == 0, figures


def test_a_real_enospc_fails_one_model_and_the_daemon_carries_on(
        rclone_s3: S3Server, rclone_bucket: str, rclone_proxy: FaultProxy, work: Path) -> None:
    try:
        figures = scenarios.disk_full(rclone_s3, rclone_bucket, rclone_proxy, work=work)
    except scenarios.TmpfsUnavailable as e:
        pytest.skip(f"needs a real full filesystem: {e} (run as root, or with CAP_SYS_ADMIN)")
    assert figures["other_model_intact"] and figures["next_model_ready"], figures
