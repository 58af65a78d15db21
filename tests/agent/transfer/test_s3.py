"""Tests for agent/transfer/s3.py against real S3 servers (moto and rclone) on loopback, some behind the fault proxy, a TLS
front (HTTPS with a CA made at run time) or a forward proxy (CONNECT and absolute-form)."""

from __future__ import annotations

import asyncio
import errno
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from yarl import URL

from agent import errors
from agent.errors import (
    AccessDeniedError,
    CacheError,
    ConfigError,
    DiskFullError,
    ObjectChangedError,
    ObjectNotFoundError,
    RangeNotSupportedError,
    RetriesExhaustedError,
    S3Error,
    WriteError,
)
from agent.transfer.presign import PROBE_KEY, fast_presigner, host_header, presign_get
from agent.transfer.s3 import (
    ObjectInfo,
    S3Client,
    ServiceDataLoader,
    TruncatedBodyError,
    is_retryable,
    normalize_etag,
)
from agent.transfer.s3 import WriteError as S3WriteError
from tests.agent.conftest import MiB, make_settings, put_all, use_endpoint
from tests.fixtures.background import BackgroundServer
from tests.fixtures.connectproxy import ConnectProxy
from tests.fixtures.faultproxy import FaultPlan, FaultProxy
from tests.fixtures.s3servers import S3Server
from tests.fixtures.tlsfront import TlsFront

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
                    "ALL_PROXY", "all_proxy", "AWS_CA_BUNDLE")


@pytest.fixture(autouse=True)
def _no_proxy_or_ca_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's or CI runner's proxy settings must not route (or bypass) anything in these tests."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


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


# --- the bucket's region --------------------------------------------------------------------------------------


@pytest.fixture
def eu_bucket(moto_s3: S3Server) -> Iterator[str]:
    """A bucket that lives in eu-west-1 while every client is configured for us-east-1 (moto keeps the region)."""
    name = f"wc-eu-{uuid.uuid4().hex[:12]}"
    moto_s3.client().create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    try:
        yield name
    finally:
        moto_s3.delete_bucket(name)


async def test_a_bucket_in_another_region_is_read_with_urls_signed_for_that_region(
        moto_s3: S3Server, eu_bucket: str, tmp_path, monkeypatch) -> None:
    # The proxy refuses, as AWS does, anything for eu_bucket signed for another region; moto itself checks none.
    data = os.urandom(3 * 100_000)
    put_all(moto_s3, eu_bucket, {"m/obj": data})
    with FaultProxy(moto_s3, FaultPlan.none(), bucket_regions={eu_bucket: "eu-west-1"}) as proxy:
        use_endpoint(monkeypatch, moto_s3, proxy.url)
        assert os.environ["AWS_REGION"] == "us-east-1"
        async with S3Client(make_settings(tmp_path)) as s3:
            (info,) = await s3.list_objects(eu_bucket, "m/")  # botocore follows the refusal (control plane)
            parts = [await read_all(s3, eu_bucket, info, start=i * 100_000, length=100_000) for i in range(3)]
        assert b"".join(parts) == data
        gets = [e for e in proxy.stats().events if e.method == "GET" and e.range]
        assert len(gets) == 3 and {e.status for e in gets} == {206}
        for e in gets:
            credential = urllib.parse.parse_qs(urllib.parse.urlsplit(e.path).query)["X-Amz-Credential"][0]
            assert credential.split("/")[2:4] == ["eu-west-1", "s3"]


async def test_the_bucket_region_is_learned_once_per_bucket(
        moto_s3: S3Server, eu_bucket: str, tmp_path, monkeypatch) -> None:
    put_all(moto_s3, eu_bucket, {"obj": b"x" * 1000})
    with FaultProxy(moto_s3, FaultPlan.none(), bucket_regions={eu_bucket: "eu-west-1"}) as proxy:
        use_endpoint(monkeypatch, moto_s3, proxy.url)
        async with S3Client(make_settings(tmp_path)) as s3:
            info = ObjectInfo(key="obj", size=1000, etag=normalize_etag(moto_s3.head_etag(eu_bucket, "obj")))
            for _ in range(3):
                assert await read_all(s3, eu_bucket, info) == b"x" * 1000
        head_bucket = [e for e in proxy.stats().events if e.method == "HEAD" and e.path.rstrip("/").endswith(
            eu_bucket)]
        assert [e.status for e in head_bucket] == [400, 200]  # refused once, redirected once, then remembered


# --- proxies from the environment -----------------------------------------------------------------------------


async def test_https_reads_go_through_a_connect_tunnel_of_https_proxy(
        s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    data = os.urandom(MiB + 12_345)
    put_all(s3_server, bucket, {"obj": data})
    with TlsFront(s3_server) as front, ConnectProxy() as proxy:
        use_endpoint(monkeypatch, s3_server, front.url)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(front.ca_file))
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        async with S3Client(make_settings(tmp_path)) as s3:
            (info,) = await s3.list_objects(bucket, "")
            assert await read_all(s3, bucket, info) == data
        # Every connection the front accepted came through the proxy: the control plane's and the data plane's.
        assert front.connections >= 2
        assert proxy.tunnels == [f"127.0.0.1:{front.port}"] * front.connections
        assert proxy.tunnel_bytes_to_client > len(data)


async def test_http_reads_go_through_http_proxy_as_absolute_form_requests(
        s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    data = os.urandom(MiB + 12_345)
    put_all(s3_server, bucket, {"obj": data})
    with ConnectProxy() as proxy:
        use_endpoint(monkeypatch, s3_server)
        monkeypatch.setenv("http_proxy", proxy.url)  # lower case, as many images set it
        async with S3Client(make_settings(tmp_path)) as s3:
            (info,) = await s3.list_objects(bucket, "")
            assert await read_all(s3, bucket, info) == data
        urls = [(r.method, r.url) for r in proxy.requests]
        assert ("GET", f"{s3_server.endpoint_url}/{bucket}") in urls  # the listing (control plane)
        assert ("GET", f"{s3_server.endpoint_url}/{bucket}/obj") in urls  # the ranged GET (data plane)
        assert proxy.forwarded_body_bytes > len(data)
        assert proxy.tunnels == []


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_no_proxy_sends_matching_hosts_around_the_proxy(
        scheme: str, s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    data = os.urandom(300_000)
    put_all(s3_server, bucket, {"obj": data})
    with TlsFront(s3_server) as front, ConnectProxy() as proxy:
        use_endpoint(monkeypatch, s3_server, front.url if scheme == "https" else None)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(front.ca_file))
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.1")
        async with S3Client(make_settings(tmp_path)) as s3:
            (info,) = await s3.list_objects(bucket, "")
            assert await read_all(s3, bucket, info) == data
        assert proxy.connections_carried == 0


async def test_proxy_credentials_in_the_proxy_url_are_presented(
        s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    put_all(s3_server, bucket, {"obj": b"y" * 5000})
    with TlsFront(s3_server) as front, ConnectProxy(credentials=("agent", "s3cr3t/:@")) as proxy:
        use_endpoint(monkeypatch, s3_server, front.url)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(front.ca_file))
        monkeypatch.setenv("HTTPS_PROXY", proxy.url_with_credentials("agent", "s3cr3t/:@"))
        async with S3Client(make_settings(tmp_path)) as s3:
            (info,) = await s3.list_objects(bucket, "")
            assert await read_all(s3, bucket, info) == b"y" * 5000
        assert proxy.refused == [] and len(proxy.tunnels) >= 2


def test_a_proxy_the_data_plane_cannot_use_is_a_config_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "https://127.0.0.1:3129")  # TLS to the proxy itself
    with pytest.raises(ConfigError, match="HTTPS_PROXY must be an http:// proxy URL"):
        S3Client(make_settings(tmp_path))


# --- which bytes came back ------------------------------------------------------------------------------------


async def test_a_server_that_ignores_range_fails_as_range_not_supported_before_writing(
        s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    put_all(s3_server, bucket, {"obj": os.urandom(200_000)})
    with FaultProxy(s3_server, FaultPlan(always="ignore_range")) as proxy:
        use_endpoint(monkeypatch, s3_server, proxy.url)
        async with S3Client(make_settings(tmp_path)) as s3:
            info = await s3.head_object(bucket, "obj")
            written: list[int] = []
            with pytest.raises(RangeNotSupportedError, match="200 without a Content-Range"):
                await s3.read_range(bucket=bucket, key="obj", etag=info.etag, start=1000, length=100_000,
                                    buffer=bytearray(65536), write=lambda offset, view: written.append(offset))
            assert written == [] and s3.retries == 0
        assert proxy.stats().faults == {"ignore_range": 1}


async def test_a_200_with_the_whole_object_is_accepted_when_the_whole_object_was_asked_for(
        s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    data = os.urandom(200_000)
    put_all(s3_server, bucket, {"obj": data})
    with FaultProxy(s3_server, FaultPlan(always="ignore_range")) as proxy:
        use_endpoint(monkeypatch, s3_server, proxy.url)
        async with S3Client(make_settings(tmp_path)) as s3:
            info = await s3.head_object(bucket, "obj")
            assert await read_all(s3, bucket, info) == data
        assert {e.status for e in proxy.stats().events if e.fault == "ignore_range"} == {200}


async def test_a_content_range_for_other_bytes_fails_as_range_not_supported(
        s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    # rclone answers 200 and moto 206: a Content-Range that names other bytes is refused after either.
    put_all(s3_server, bucket, {"obj": os.urandom(200_000)})
    with FaultProxy(s3_server, FaultPlan(always="wrong_content_range")) as proxy:
        use_endpoint(monkeypatch, s3_server, proxy.url)
        async with S3Client(make_settings(tmp_path)) as s3:
            info = await s3.head_object(bucket, "obj")
            with pytest.raises(RangeNotSupportedError, match="Content-Range 'bytes 1001-101000/200000'"):
                await read_all(s3, bucket, info, start=1000, length=100_000)
            assert s3.retries == 0


# --- writing and TLS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "error", "reason"),
                         [(errno.EIO, WriteError, "WriteError"), (errno.ENOSPC, DiskFullError, "DiskFull")])
async def test_a_failing_write_is_a_cache_error_and_is_not_retried(
        code: int, error: type[CacheError], reason: str, s3_env: S3Server, bucket: str, tmp_path) -> None:
    put_all(s3_env, bucket, {"obj": b"z" * 300_000})

    def write(offset: int, view: memoryview) -> None:
        raise OSError(code, os.strerror(code))

    async with S3Client(make_settings(tmp_path)) as s3:
        info = await s3.head_object(bucket, "obj")
        with pytest.raises(error) as caught:
            await s3.read_range(bucket=bucket, key="obj", etag=info.etag, start=0, length=info.size,
                                buffer=bytearray(65536), write=write)
        assert s3.retries == 0
    assert isinstance(caught.value, CacheError) and caught.value.reason == reason
    assert S3WriteError is errors.WriteError


async def test_a_ranged_read_over_https_trusts_the_ca_bundle(
        s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    data = os.urandom(2 * MiB + 1)
    put_all(s3_server, bucket, {"obj": data})
    with TlsFront(s3_server) as front:
        use_endpoint(monkeypatch, s3_server, front.url)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(front.ca_file))
        async with S3Client(make_settings(tmp_path)) as s3:
            info = await s3.head_object(bucket, "obj")
            assert await read_all(s3, bucket, info, buffer_size=MiB) == data
            assert await read_all(s3, bucket, info, start=MiB - 7, length=MiB) == data[MiB - 7:2 * MiB - 7]
        assert front.bytes_to_client > len(data) + MiB


async def test_an_untrusted_certificate_fails_at_once_instead_of_being_retried(
        s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    put_all(s3_server, bucket, {"obj": b"q" * 1000})
    info = ObjectInfo(key="obj", size=1000, etag=normalize_etag(s3_server.head_etag(bucket, "obj")))
    with TlsFront(s3_server) as front:
        use_endpoint(monkeypatch, s3_server, front.url)  # and no AWS_CA_BUNDLE
        async with S3Client(make_settings(tmp_path, max_attempts=5)) as s3:
            with pytest.raises(S3Error, match="certificate is not trusted.*AWS_CA_BUNDLE"):
                await s3.list_objects(bucket, "")
            with pytest.raises(S3Error, match="certificate is not trusted"):
                await read_all(s3, bucket, info)
            assert s3.retries == 0


# --- presigning -----------------------------------------------------------------------------------------------


def _botocore_presigner(credentials: Credentials, *, region: str, endpoint: str | None, style: str) -> Any:
    session = botocore.session.Session()
    session.set_credentials(credentials.access_key, credentials.secret_key, credentials.token)
    return session.create_client("s3", region_name=region, endpoint_url=endpoint,
                                 config=Config(signature_version="s3v4", s3={"addressing_style": style}))


@pytest.mark.parametrize("token", [None, "session/token+with=odd&chars"])
@pytest.mark.parametrize(("region", "endpoint", "style"), [
    ("us-east-1", "http://127.0.0.1:9000", "path"),
    ("eu-west-1", None, "virtual"),
    ("us-west-2", None, "path"),
    ("us-east-1", "https://s3.example.com:443", "path"),
])
@pytest.mark.parametrize("key", ["m/model.safetensors", "m/é z+(1)=&?%#~.bin", "a/b/c/d/tokenizer.json"])
def test_presigned_urls_are_the_ones_botocore_makes(token: str | None, region: str, endpoint: str | None,
                                                    style: str, key: str) -> None:
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    client = _botocore_presigner(credentials, region=region, endpoint=endpoint, style=style)
    theirs = client.generate_presigned_url("get_object", Params={"Bucket": "models", "Key": key}, ExpiresIn=900)
    u = urllib.parse.urlsplit(theirs)
    query = dict(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
    ours = presign_get(scheme=u.scheme, host=host_header(u.scheme, u.hostname or "", u.port), path=u.path,
                       region=region, access_key=credentials.access_key, secret_key=credentials.secret_key,
                       token=token, amz_date=query["X-Amz-Date"])
    assert dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(ours).query, keep_blank_values=True)) == query
    assert urllib.parse.urlsplit(ours).path == u.path


@pytest.mark.parametrize(("region", "endpoint", "style"), [("us-east-1", "http://127.0.0.1:9000", "path"),
                                                           ("eu-west-1", None, "virtual")])
def test_the_fast_presigner_signs_every_key_as_botocore_does(region: str, endpoint: str | None, style: str) -> None:
    credentials = Credentials("AKIDEXAMPLE", "secret", "token")
    client = _botocore_presigner(credentials, region=region, endpoint=endpoint, style=style)

    def theirs(key: str) -> str:
        return str(client.generate_presigned_url("get_object", Params={"Bucket": "models", "Key": key},
                                                 ExpiresIn=900))

    fast = fast_presigner(theirs(PROBE_KEY), credentials)
    assert fast is not None
    for key in ["m/model-00001-of-00002.safetensors", "m/ü ñ/@!$'()*,;.txt"]:
        a, b = urllib.parse.urlsplit(fast(key)), urllib.parse.urlsplit(theirs(key))
        qa, qb = (dict(urllib.parse.parse_qsl(x.query)) for x in (a, b))
        assert (a.scheme, a.hostname, a.path) == (b.scheme, b.hostname, b.path)
        if qa["X-Amz-Date"] == qb["X-Amz-Date"]:  # signed in the same second: the same URL
            assert qa == qb


def test_a_presigned_url_in_a_form_we_do_not_reproduce_is_left_to_botocore() -> None:
    credentials = Credentials("AKIDEXAMPLE", "secret")
    client = _botocore_presigner(credentials, region="us-east-1", endpoint="http://127.0.0.1:9000", style="path")
    reference = str(client.generate_presigned_url("get_object", Params={"Bucket": "models", "Key": PROBE_KEY},
                                                  ExpiresIn=900))
    assert fast_presigner(reference, credentials) is not None
    assert fast_presigner(reference + "&x-id=GetObject", credentials) is None  # a parameter we do not sign
    assert fast_presigner(reference, Credentials("AKIDEXAMPLE", "another secret")) is None  # not reproduced
    assert fast_presigner(reference.replace("weightcache/probe", "other"), credentials) is None  # key not found
    assert fast_presigner(reference, None) is None


# --- the lean HTTP client: kept-alive connections and chunked bodies -----------------------------------------


class OneByOneFront(BackgroundServer):
    """A plain-HTTP front that passes one request at a time to ``upstream`` (a fresh upstream connection each)
    and keeps the client's connection alive between them, as S3 does, until it has been idle ``idle`` seconds,
    then closes it, as S3 does. With ``chunked``, successful GET bodies come back ``Transfer-Encoding: chunked``
    (as some proxies send them). Bytes are not rewritten otherwise, so SigV4 verifies upstream as it would."""

    _thread_name = "onebyone"

    def __init__(self, upstream: S3Server, *, idle: float = 60.0, chunked: bool = False) -> None:
        super().__init__()
        url = URL(upstream.endpoint_url)
        assert url.host is not None and url.port is not None
        self._upstream = (url.host, url.port)
        self._idle, self._chunked = idle, chunked
        self.connections = 0
        self.idle_closes = 0
        self.chunked_bodies = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=self._idle)
            except TimeoutError:
                with self.lock:
                    self.idle_closes += 1
                return  # the handler's end closes the connection
            lines = head.decode("latin-1").split("\r\n")
            kept = [line for line in lines[1:] if line and not line.lower().startswith("connection:")]
            request = "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1")
            up_reader, up_writer = await self.open_upstream(*self._upstream)
            try:
                up_writer.write(request)
                await up_writer.drain()
                answer = await up_reader.read()  # until the upstream closes: the whole response
            finally:
                self.close_upstream(up_writer)
            writer.write(self._reframe(lines[0], answer))
            await writer.drain()

    def _reframe(self, request_line: str, answer: bytes) -> bytes:
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = [line for line in head.decode("latin-1").split("\r\n")
                 if not line.lower().startswith("connection:")]
        status = int(lines[0].split(" ")[1])
        if self._chunked and request_line.startswith("GET ") and status in (200, 206):
            lines = [line for line in lines if not line.lower().startswith("content-length:")]
            lines.append("Transfer-Encoding: chunked")
            pieces = [body[i:i + 7_000] for i in range(0, len(body), 7_000)]
            body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
            with self.lock:
                self.chunked_bodies += 1
        return "\r\n".join([*lines, "", ""]).encode("latin-1") + body


async def test_a_kept_alive_connection_closed_while_idle_is_reopened_without_spending_a_retry(
        s3_server: S3Server, bucket: str, tmp_path, monkeypatch) -> None:
    data = os.urandom(300_000)
    put_all(s3_server, bucket, {"obj": data})
    with OneByOneFront(s3_server, idle=0.3) as front:
        use_endpoint(monkeypatch, s3_server, front.url)
        async with S3Client(make_settings(tmp_path)) as s3:
            info = await s3.head_object(bucket, "obj")
            assert await read_all(s3, bucket, info, buffer_size=MiB) == data
            while front.idle_closes < front.connections:  # every connection so far closed by the server
                await asyncio.sleep(0.05)
            assert await read_all(s3, bucket, info, buffer_size=MiB) == data
            assert s3.retries == 0


async def test_a_chunked_body_is_read_as_the_same_bytes(s3_server: S3Server, bucket: str, tmp_path,
                                                        monkeypatch) -> None:
    data = os.urandom(300_000)
    put_all(s3_server, bucket, {"obj": data})
    with OneByOneFront(s3_server, chunked=True) as front:
        use_endpoint(monkeypatch, s3_server, front.url)
        async with S3Client(make_settings(tmp_path)) as s3:
            info = await s3.head_object(bucket, "obj")
            assert await read_all(s3, bucket, info) == data
            assert await read_all(s3, bucket, info, start=12_345, length=100_001) == data[12_345:112_346]
        assert front.chunked_bodies == 2


@pytest.mark.parametrize("type_name", ["service-2", "endpoint-rule-set-1", "paginators-1"])
def test_the_service_loader_answers_as_botocores_full_scan(type_name: str) -> None:
    import botocore.loaders

    full = botocore.loaders.Loader().list_available_services(type_name)
    mine = ServiceDataLoader().list_available_services(type_name)
    for name in ["s3", "sts", "sso-oidc", "ec2", "no-such-service", "../s3", ""]:
        assert (name in mine) == (name in full), name
    assert list(mine) == list(full) and len(mine) == len(full)  # iterating still lists every service


def test_the_service_loader_keeps_botocores_extra_data_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import botocore.session

    model = tmp_path / "madeup" / "2024-01-01" / "service-2.json"
    model.parent.mkdir(parents=True)
    model.write_text("{}")
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    loader = ServiceDataLoader.for_session(botocore.session.get_session())
    assert "madeup" in loader.list_available_services("service-2")
    assert "s3" in loader.list_available_services("service-2")
