"""Area 5 — corruption: bytes flipped in a cached blob (bit rot, a stray write by root) are found by
``weightcache-agent verify`` and repaired from S3, and a second verify finds nothing left to repair."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.s3servers import S3Server
from tests.hardening import scenarios


def test_verify_finds_a_flipped_byte_and_repairs_it_from_s3(moto_s3: S3Server, moto_bucket: str,
                                                           work: Path) -> None:
    figures = scenarios.corrupt_and_verify(moto_s3, moto_bucket, work=work, flips=1, seed=5)
    assert figures["repaired"] == 1, figures


def test_verify_repairs_every_flip_of_several_in_a_row(moto_s3: S3Server, moto_bucket: str, work: Path) -> None:
    figures = scenarios.corrupt_and_verify(moto_s3, moto_bucket, work=work, flips=3, seed=6)
    assert figures["found"] == figures["repaired"] == 3, figures


@pytest.mark.soak
def test_verify_repairs_twenty_flips_in_a_row(moto_s3: S3Server, moto_bucket: str, work: Path) -> None:
    figures = scenarios.corrupt_and_verify(moto_s3, moto_bucket, work=work, flips=20, seed=20)
    assert figures["repaired"] == 20, figures
