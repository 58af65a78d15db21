"""Area 8 — the Kubernetes API misbehaving: watches dropped mid-stream, 410 Gone storms (history compacted under
the watch, LISTs failing), and the API server down for a while as pods come and go. Every pod still gets its
model and its Events, the watch reconnects with bounded backoff, and the reconnects show in the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.s3servers import S3Server
from tests.hardening import scenarios


def test_watch_drops_410_storms_and_a_short_outage_lose_no_pod(moto_s3: S3Server, moto_bucket: str,
                                                              work: Path) -> None:
    figures = scenarios.kube_faults(moto_s3, moto_bucket, work=work, drops=4, storms=3, outage_seconds=3.0)
    assert figures["missed"] == 0 and figures["pods_added_during_outage"] >= 1, figures
    assert figures["reconnects_metric"] >= 4 + 3, figures


@pytest.mark.soak
def test_the_api_server_down_for_a_minute_loses_no_pod(moto_s3: S3Server, moto_bucket: str, work: Path) -> None:
    figures = scenarios.kube_faults(moto_s3, moto_bucket, work=work, drops=20, storms=10, outage_seconds=60.0,
                                    seed=60)
    assert figures["missed"] == 0 and figures["reconnect_after_outage_seconds"] < 10, figures
