"""Area 1 — S3 misbehaving (throttling, 5xx, resets, short and stalled bodies, lying ETags) through the fault
proxy: a model comes out byte-identical, or, when the faults never stop, the fetch fails with its reason and
publishes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.faultproxy import FaultPlan, FaultProxy
from tests.fixtures.s3servers import S3Server
from tests.hardening import scenarios
from tests.hardening.support import KiB, MiB

MIXED = {"slowdown_503": 0.05, "reset_mid_body": 0.02, "truncate": 0.02}


def test_model_through_503s_resets_and_truncations_is_byte_identical(
        rclone_s3: S3Server, rclone_bucket: str, rclone_proxy: FaultProxy, work: Path) -> None:
    # ~100 ranged GETs: with 9% of them faulted, a run with no fault at all has odds of 1 in 10,000.
    sizes = {f"model-{i:05d}.safetensors": 12 * MiB + i for i in range(8)}
    sizes |= {"tokenizer.json": 600 * KiB, "config.json": 321}
    figures = scenarios.fetch_through_faults(rclone_s3, rclone_bucket, rclone_proxy, work=work, seed=101,
                                             plan=FaultPlan(seed=101, rates=MIXED), sizes=sizes)
    assert figures["faults_total"] >= 1, figures


@pytest.mark.parametrize("kind", ["slowdown_503", "error_500", "reset_mid_body", "truncate", "stall",
                                  "wrong_etag"])
def test_each_fault_kind_is_survived_byte_identical(kind: str, rclone_s3: S3Server, rclone_bucket: str,
                                                   rclone_proxy: FaultProxy, work: Path) -> None:
    # A lying ETag means "the object changed": the agent lists again, so one such lie is survived, not three.
    limit = 1 if kind == "wrong_etag" else 3
    plan = FaultPlan(always=kind, rates={}, max_faults=limit, stall_seconds=30.0)  # type: ignore[arg-type]
    figures = scenarios.fetch_through_faults(
        rclone_s3, rclone_bucket, rclone_proxy, work=work, plan=plan, concurrency=4,
        sizes={"w.bin": 3 * MiB + 17, "config.json": 100}, WEIGHTCACHE_READ_TIMEOUT="1")
    assert figures["faults_total"] == limit, figures


@pytest.mark.parametrize(("kind", "reason"), [("slowdown_503", "RetriesExhausted"),
                                              ("reset_mid_body", "RetriesExhausted"),
                                              ("stall", "RetriesExhausted"),
                                              ("wrong_etag", "ObjectChanged")])
def test_faults_that_never_stop_fail_with_the_reason_and_publish_nothing(
        kind: str, reason: str, rclone_s3: S3Server, rclone_bucket: str, rclone_proxy: FaultProxy,
        work: Path) -> None:
    figures = scenarios.faults_never_stop(rclone_s3, rclone_bucket, rclone_proxy, work=work, kind=kind)
    assert f"({reason})" in figures["stderr"], figures
    assert figures["asyncio_errors"] == 0, figures
    if reason == "RetriesExhausted":
        assert "gave up after 3 attempts" in figures["stderr"], figures
