"""Area 7 — tenants: per-namespace allowlists hold (no S3 request is ever made for a model a namespace may not
use, a look-alike prefix included), the control socket is out of reach of any other uid, and no credential
(AWS secret key, session token, Kubernetes bearer token) appears in logs, Events, metrics or the status API."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.faultproxy import FaultProxy
from tests.fixtures.s3servers import S3Server
from tests.hardening import scenarios


def test_a_namespace_cannot_pull_another_tenants_bucket_nor_a_look_alike_prefix(
        rclone_s3: S3Server, rclone_bucket: str, rclone_bucket_b: str, rclone_proxy: FaultProxy,
        work: Path) -> None:
    figures = scenarios.tenant_policy(rclone_s3, rclone_bucket, rclone_bucket_b, rclone_proxy, work=work)
    assert figures == {"denied": 2, "allowed": 1, "requests_for_denied": 0}, figures


def test_the_control_socket_refuses_another_uid(work: Path) -> None:
    figures = scenarios.control_socket_private(work=work)
    assert figures["other_uid"] == "PermissionError", figures


def test_no_credential_appears_in_logs_events_metrics_or_the_status_api(
        moto_s3: S3Server, moto_bucket: str, moto_proxy: FaultProxy, work: Path) -> None:
    figures = scenarios.no_credentials_leak(moto_s3, moto_bucket, moto_proxy, work=work)
    assert figures["leaks"] == 0 and figures["log_lines_scanned"] > 0, figures
