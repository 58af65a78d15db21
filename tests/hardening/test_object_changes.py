"""Area 3 — the model changes in S3 while it is being fetched (an object overwritten or deleted, the prefix gaining
or losing a file): the cache shows one whole revision or fails cleanly with the reason, never a mix, and the next
demand shows S3's current state."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.faultproxy import FaultProxy
from tests.fixtures.s3servers import S3Server
from tests.hardening import scenarios


def test_an_object_overwritten_mid_fetch_is_listed_again_and_the_new_revision_published(
        rclone_s3: S3Server, rclone_bucket: str, rclone_proxy: FaultProxy, work: Path) -> None:
    # The resumed GET sees another ETag; keeping the first GET's bytes and appending the new object's would mix.
    figures = scenarios.object_changes(rclone_s3, rclone_bucket, rclone_proxy, work=work, case="overwrite")
    assert figures["first_fetch"] == "new revision", figures


def test_an_object_deleted_mid_fetch_fails_with_not_found_and_publishes_nothing(
        rclone_s3: S3Server, rclone_bucket: str, rclone_proxy: FaultProxy, work: Path) -> None:
    figures = scenarios.object_changes(rclone_s3, rclone_bucket, rclone_proxy, work=work, case="delete")
    assert figures["first_fetch"] == "clean failure: NotFound", figures


def test_a_file_added_to_the_prefix_mid_fetch_waits_for_the_next_demand(
        rclone_s3: S3Server, rclone_bucket: str, rclone_proxy: FaultProxy, work: Path) -> None:
    # The fetch publishes the revision it listed, whole; the next demand lists again and picks up the new file.
    figures = scenarios.object_changes(rclone_s3, rclone_bucket, rclone_proxy, work=work, case="gain")
    assert figures["first_fetch"] == "old revision (as listed)", figures
    assert figures["next_demand"] == "current revision", figures


def test_a_listed_file_that_disappears_mid_fetch_fails_cleanly_never_half_a_model(
        rclone_s3: S3Server, rclone_bucket: str, rclone_proxy: FaultProxy, work: Path) -> None:
    figures = scenarios.object_changes(rclone_s3, rclone_bucket, rclone_proxy, work=work, case="lose")
    assert figures["first_fetch"] in ("clean failure: NotFound", "new revision"), figures
    assert figures["next_demand"] == "current revision", figures
