"""Tests for agent/s3.py against real S3 servers (moto and rclone) on loopback, some behind the fault proxy."""

from __future__ import annotations

import os

import pytest
from botocore.exceptions import ClientError

from agent.errors import AccessDeniedError, ObjectChangedError, ObjectNotFoundError, RetriesExhaustedError
from agent.s3 import ObjectInfo, S3Client, TruncatedBodyError, is_retryable, normalize_etag
from tests.agent.conftest import MiB, make_settings, put_all, use_endpoint
from tests.fixtures.faultproxy import FaultPlan, FaultProxy
from tests.fixtures.s3servers import S3Server


async def read_all(s3: S3Client, bucket: str, info: ObjectInfo, start: int = 0, length: int | None = None,
                   buffer_size: int = 64 * 1024) -> bytes:
    """Read a range through ``read_range``, placing each handed-over view at its offset."""
    length = info.size - start if length is None else length
    out = bytearray(length)
    seen: list[tuple[int, int]] = []

    def write(offset: int, view: memoryview) -> None:  # runs in the client's worker thread
        out[offset - start:offset - start + len(view)] = view
        seen.append((offset, len(view)))

    await s3.read_range(bucket=bucket, key=info.key, etag=info.etag, start=start, length=length,
                        buffer=bytearray(buffer_size), write=write)
    assert sum(n for _, n in seen) == length  # every byte handed over exactly once
    return bytes(out)


def test_etags_are_compared_without_quotes() -> None:
    assert normalize_etag('"abc"') == normalize_etag("abc") == "abc"
    assert normalize_etag(None) == ""


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"), True),
        (ClientError({"Error": {"Code": "InternalError"}}, "GetObject"), True),
        (ClientError({"Error": {"Code": ""}, "ResponseMetadata": {"HTTPStatusCode": 502}}, "GetObject"), True),
        (ClientError({"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject"), False),
        (ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Get"), False),
        (ClientError({"Error": {"Code": "PreconditionFailed"}}, "GetObject"), False),
        (ConnectionResetError(), True),
        (TruncatedBodyError("short"), True),
        (TimeoutError(), True),
        (ValueError("bug"), False),
    ],
)
def test_only_transient_errors_are_retryable(error: BaseException, retryable: bool) -> None:
    assert is_retryable(error) is retryable


async def test_listing_returns_every_key_under_the_prefix_in_order_with_unquoted_etags(
        s3_env: S3Server, bucket: str, tmp_path) -> None:
    put_all(s3_env, bucket, {"m/b.bin": b"bb", "m/a/x.txt": b"x", "m/é z.txt": b"", "mx/no": b"n", "top": b"t"})
    async with S3Client(make_settings(tmp_path)) as s3:
        listed = await s3.list_objects(bucket, "m/")
        heads = [await s3.head_object(bucket, o.key) for o in listed]
    assert [(o.key, o.size) for o in listed] == [("m/a/x.txt", 1), ("m/b.bin", 2), ("m/é z.txt", 0)]
    assert all(o.etag and '"' not in o.etag for o in listed)
    assert [h.etag for h in heads] == [o.etag for o in listed]  # rclone lists unquoted, quotes on HEAD/GET


async def test_head_of_a_missing_object_is_not_found(s3_env: S3Server, bucket: str, tmp_path) -> None:
    async with S3Client(make_settings(tmp_path)) as s3:
        with pytest.raises(ObjectNotFoundError, match="not found"):
            await s3.head_object(bucket, "nope")


async def test_a_ranged_read_hands_over_exactly_the_requested_bytes(s3_env: S3Server, bucket: str, tmp_path) -> None:
    data = os.urandom(300_000)
    put_all(s3_env, bucket, {"obj": data})
    async with S3Client(make_settings(tmp_path)) as s3:
        info = await s3.head_object(bucket, "obj")
        assert await read_all(s3, bucket, info) == data
        assert await read_all(s3, bucket, info, start=12_345, length=100_001) == data[12_345:112_346]
        assert await read_all(s3, bucket, info, start=len(data) - 1, length=1) == data[-1:]
        assert s3.bytes_received == len(data) + 100_001 + 1


async def test_a_read_pinned_to_an_old_etag_fails_as_object_changed(s3_env: S3Server, bucket: str, tmp_path) -> None:
    # moto answers If-Match with 412; rclone ignores If-Match, so the response's own ETag is what catches it.
    put_all(s3_env, bucket, {"obj": b"old" * 1000})
    async with S3Client(make_settings(tmp_path)) as s3:
        old = await s3.head_object(bucket, "obj")
        put_all(s3_env, bucket, {"obj": b"new" * 1000})
        with pytest.raises(ObjectChangedError):
            await read_all(s3, bucket, old)


async def test_wrong_credentials_are_access_denied(rclone_s3: S3Server, tmp_path, monkeypatch) -> None:
    use_endpoint(monkeypatch, rclone_s3)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    rclone_s3.create_bucket("wc-denied")
    try:
        async with S3Client(make_settings(tmp_path)) as s3:
            with pytest.raises(AccessDeniedError, match="access denied"):
                await s3.list_objects("wc-denied", "")
    finally:
        rclone_s3.delete_bucket("wc-denied")


async def test_a_truncated_body_is_resumed_without_fetching_a_byte_twice(
        s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    data = os.urandom(2 * MiB)
    put_all(s3_server, bucket, {"obj": data})
    with FaultProxy(s3_server, FaultPlan(always="truncate", max_faults=3)) as proxy:
        use_endpoint(monkeypatch, s3_server, proxy.url)
        async with S3Client(make_settings(tmp_path)) as s3:
            info = await s3.head_object(bucket, "obj")
            assert await read_all(s3, bucket, info) == data
            assert s3.retries == 3
        assert proxy.stats().faults == {"truncate": 3}
        assert proxy.body_bytes_forwarded == len(data)


async def test_a_connection_reset_mid_body_is_resumed(s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    data = os.urandom(MiB)
    put_all(s3_server, bucket, {"obj": data})
    with FaultProxy(s3_server, FaultPlan(always="reset_mid_body", max_faults=2)) as proxy:
        use_endpoint(monkeypatch, s3_server, proxy.url)
        async with S3Client(make_settings(tmp_path)) as s3:
            info = await s3.head_object(bucket, "obj")
            assert await read_all(s3, bucket, info) == data
        assert proxy.stats().faults == {"reset_mid_body": 2}


async def test_throttling_is_retried_until_it_stops(s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    put_all(s3_server, bucket, {"obj": b"x" * 1000})
    with FaultProxy(s3_server, FaultPlan(always="slowdown_503", max_faults=4)) as proxy:
        use_endpoint(monkeypatch, s3_server, proxy.url)
        async with S3Client(make_settings(tmp_path, max_attempts=5)) as s3:
            info = await s3.head_object(bucket, "obj")
            assert await read_all(s3, bucket, info) == b"x" * 1000
            assert s3.retries == 4


async def test_throttling_that_never_stops_exhausts_the_retry_budget_with_the_last_error(
        rclone_s3: S3Server, tmp_path, monkeypatch) -> None:
    rclone_s3.create_bucket("wc-throttled")
    put_all(rclone_s3, "wc-throttled", {"obj": b"x" * 1000})
    try:
        with FaultProxy(rclone_s3, FaultPlan(always="slowdown_503")) as proxy:
            use_endpoint(monkeypatch, rclone_s3, proxy.url)
            async with S3Client(make_settings(tmp_path, max_attempts=3)) as s3:
                info = await s3.head_object("wc-throttled", "obj")
                with pytest.raises(RetriesExhaustedError, match="gave up after 3 attempts.*SlowDown") as info_e:
                    await read_all(s3, "wc-throttled", info)
            assert info_e.value.reason == "RetriesExhausted"
            assert proxy.stats().faults == {"slowdown_503": 3}
    finally:
        rclone_s3.delete_bucket("wc-throttled")


async def test_a_stalled_body_is_retried_after_the_read_timeout(
        rclone_s3: S3Server, tmp_path, monkeypatch) -> None:
    rclone_s3.create_bucket("wc-stall")
    data = os.urandom(200_000)
    put_all(rclone_s3, "wc-stall", {"obj": data})
    try:
        with FaultProxy(rclone_s3, FaultPlan(always="stall", stall_seconds=5, max_faults=1)) as proxy:
            use_endpoint(monkeypatch, rclone_s3, proxy.url)
            async with S3Client(make_settings(tmp_path, read_timeout=0.3)) as s3:
                info = await s3.head_object("wc-stall", "obj")
                assert await read_all(s3, "wc-stall", info) == data
                assert s3.retries == 1
    finally:
        rclone_s3.delete_bucket("wc-stall")
