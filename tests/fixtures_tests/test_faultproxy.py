"""Self-tests of tests/fixtures/faultproxy.py: each fault is what a client sees, and without faults the proxy is
invisible. Clients are aiobotocore (what the agent uses) with retries off, so each fault reaches the test."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import boto3
import botocore.exceptions
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.config import Config

from tests.fixtures.faultproxy import FAULT_KINDS, FaultPlan, FaultProxy
from tests.fixtures.s3servers import S3Server

pytestmark = pytest.mark.timeout(60)

DATA = os.urandom(256 * 1024)
KEY = "models/m/weights.bin"
RANGE = "bytes=1000-200999"  # 200 000 bytes
EXPECTED = DATA[1000:201000]

MakeProxy = Callable[..., FaultProxy]


@pytest.fixture
def stored(s3_server: S3Server, bucket: str) -> tuple[S3Server, str]:
    s3_server.put(bucket, KEY, DATA)
    return s3_server, bucket


@pytest.fixture
def proxy(stored: tuple[S3Server, str], fault_proxy: MakeProxy) -> FaultProxy:
    server, _ = stored
    return fault_proxy(server, FaultPlan.none())


@pytest.fixture
async def client(stored: tuple[S3Server, str], proxy: FaultProxy) -> AsyncIterator[Any]:
    server = stored[0].with_endpoint(proxy.url)
    config = AioConfig(
        s3={"addressing_style": "path"},
        response_checksum_validation="when_required",
        retries={"total_max_attempts": 1},  # every fault must reach the test, not be retried away
        read_timeout=1.0,
        connect_timeout=2.0,
    )
    async with get_session().create_client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=config,
    ) as c:
        yield c


def _presigner(server: S3Server, endpoint_url: str, region: str) -> Any:
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name=region,
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )


async def _ranged_get(client: Any, bucket: str, range_: str = RANGE) -> tuple[bytes, str]:
    resp = await client.get_object(Bucket=bucket, Key=KEY, Range=range_)
    async with resp["Body"] as body:
        return await body.read(), str(resp["ETag"])


# --- transparency ----------------------------------------------------------------------------------------------


async def test_with_no_faults_every_byte_arrives_unchanged(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    server, bucket = stored
    body, etag = await _ranged_get(client, bucket)
    assert body == EXPECTED
    assert etag == server.head_etag(bucket, KEY)
    whole = await client.get_object(Bucket=bucket, Key=KEY)
    async with whole["Body"] as stream:
        assert await stream.read() == DATA
    head = await client.head_object(Bucket=bucket, Key=KEY)
    assert head["ContentLength"] == len(DATA)
    listing = await client.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listing["Contents"]] == [KEY]
    stats = proxy.stats()
    assert stats.total_faults == 0
    assert stats.requests == 4
    assert stats.body_bytes >= len(EXPECTED) + len(DATA)


async def test_uploads_through_the_proxy_keep_their_signature(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    server, bucket = stored
    await client.put_object(Bucket=bucket, Key="up/x.bin", Body=b"through the proxy")
    assert server.client().get_object(Bucket=bucket, Key="up/x.bin")["Body"].read() == b"through the proxy"


# --- each fault, as the client sees it -------------------------------------------------------------------------


async def test_slowdown_503_reaches_the_client_as_slowdown(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    proxy.plan = FaultPlan(always="slowdown_503")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        await _ranged_get(client, stored[1])
    assert caught.value.response["Error"]["Code"] == "SlowDown"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503


async def test_error_500_reaches_the_client_as_internal_error(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    proxy.plan = FaultPlan(always="error_500")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        await _ranged_get(client, stored[1])
    assert caught.value.response["Error"]["Code"] == "InternalError"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500


async def test_reset_mid_body_resets_the_connection_after_part_of_the_body(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    proxy.plan = FaultPlan(always="reset_mid_body", body_fraction=0.5)
    with pytest.raises(aiohttp.ClientPayloadError) as caught:
        await _ranged_get(client, stored[1])
    assert "ConnectionResetError" in str(caught.value)
    assert "received 100000 of 200000" in str(caught.value)


async def test_truncate_ends_the_body_early_without_a_reset(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    proxy.plan = FaultPlan(always="truncate", body_fraction=0.25)
    with pytest.raises(aiohttp.ClientPayloadError) as caught:
        await _ranged_get(client, stored[1])
    assert "received 50000 of 200000" in str(caught.value)
    assert "ConnectionResetError" not in str(caught.value)


async def test_stall_longer_than_the_read_timeout_trips_it(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    proxy.plan = FaultPlan(always="stall", stall_seconds=10.0)
    started = time.monotonic()
    # aiobotocore < 3.2 lets aiohttp's ServerTimeoutError through; later versions wrap it in AioReadTimeoutError,
    # a botocore ReadTimeoutError.
    with pytest.raises((aiohttp.ServerTimeoutError, botocore.exceptions.ReadTimeoutError)):
        await _ranged_get(client, stored[1])
    assert time.monotonic() - started < 5.0  # the client's 1 s read timeout, not the 10 s stall


async def test_stall_shorter_than_the_read_timeout_only_slows_the_response(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    proxy.plan = FaultPlan(always="stall", stall_seconds=0.3)
    started = time.monotonic()
    body, _ = await _ranged_get(client, stored[1])
    assert body == EXPECTED
    assert time.monotonic() - started >= 0.3


async def test_wrong_etag_serves_the_right_bytes_under_another_etag(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    server, bucket = stored
    proxy.plan = FaultPlan(always="wrong_etag")
    body, etag = await _ranged_get(client, bucket)
    assert body == EXPECTED
    assert etag != server.head_etag(bucket, KEY)
    assert etag != f'"{hashlib.md5(DATA).hexdigest()}"'


async def test_ignore_range_answers_200_with_the_whole_object_and_no_content_range(
    proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    # Presigned, as the agent's data plane sends it: the signature covers only Host, so the proxy may drop Range.
    server, bucket = stored
    proxy.plan = FaultPlan(always="ignore_range")
    url = _presigner(server, proxy.url, server.region).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": KEY})

    def get() -> tuple[int, bytes, str | None]:
        req = urllib.request.Request(url, headers={"Range": RANGE})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Range")

    assert await asyncio.to_thread(get) == (200, DATA, None)


async def test_wrong_content_range_labels_the_right_bytes_as_other_ones(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    proxy.plan = FaultPlan(always="wrong_content_range")
    resp = await client.get_object(Bucket=stored[1], Key=KEY, Range=RANGE)
    async with resp["Body"] as body:
        assert await body.read() == EXPECTED
    assert resp["ContentRange"] == f"bytes 1001-201000/{len(DATA)}"  # asked for 1000-200999


async def test_a_bucket_in_another_region_refuses_requests_signed_for_the_wrong_one(
    stored: tuple[S3Server, str], fault_proxy: MakeProxy
) -> None:
    server, bucket = stored
    proxy = fault_proxy(server, FaultPlan.none(), bucket_regions={bucket: "eu-west-1"})

    def presigned_get(region: str) -> tuple[int, str, str]:
        signer = _presigner(server, proxy.url, region)
        url = signer.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": KEY})
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, resp.headers.get("x-amz-bucket-region", ""), ""
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("x-amz-bucket-region", ""), e.read().decode()

    status, region, body = await asyncio.to_thread(presigned_get, "us-east-1")
    assert (status, region) == (400, "eu-west-1")
    assert "<Code>AuthorizationQueryParametersError</Code>" in body and "<Region>eu-west-1</Region>" in body
    assert (await asyncio.to_thread(presigned_get, "eu-west-1"))[0] == 200


async def test_botocore_follows_a_wrong_region_answer_to_the_bucket_region(
    stored: tuple[S3Server, str], fault_proxy: MakeProxy
) -> None:
    server, bucket = stored
    proxy = fault_proxy(server, FaultPlan.none(), bucket_regions={bucket: "eu-west-1"})
    client = boto3.session.Session().client(
        "s3", endpoint_url=proxy.url, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, response_checksum_validation="when_required"),
    )
    listed = await asyncio.to_thread(client.list_objects_v2, Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == [KEY]
    assert [e.status for e in proxy.stats().events] == [400, 200]  # refused, then re-signed for eu-west-1


async def test_upstream_errors_pass_through_unfaulted(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    proxy.plan = FaultPlan(always="truncate")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        await client.get_object(Bucket=stored[1], Key="no/such/key", Range="bytes=0-9")
    assert caught.value.response["Error"]["Code"] == "NoSuchKey"
    assert proxy.stats().total_faults == 0


# --- the schedule ----------------------------------------------------------------------------------------------


async def test_by_default_only_ranged_object_gets_are_faulted(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    bucket = stored[1]
    proxy.plan = FaultPlan(always="error_500")
    await client.head_object(Bucket=bucket, Key=KEY)
    await client.list_objects_v2(Bucket=bucket)
    whole = await client.get_object(Bucket=bucket, Key=KEY)
    async with whole["Body"] as stream:
        assert await stream.read() == DATA
    with pytest.raises(botocore.exceptions.ClientError):
        await _ranged_get(client, bucket)
    stats = proxy.stats()
    assert (stats.requests, stats.eligible, dict(stats.faults)) == (4, 1, {"error_500": 1})


async def test_always_faults_never_stop(client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]) -> None:
    proxy.plan = FaultPlan(always="slowdown_503")
    for _ in range(5):
        with pytest.raises(botocore.exceptions.ClientError):
            await _ranged_get(client, stored[1])
    assert proxy.faults_injected == {"slowdown_503": 5}


async def test_max_faults_stops_injecting_after_the_cap(
    client: Any, proxy: FaultProxy, stored: tuple[S3Server, str]
) -> None:
    proxy.plan = FaultPlan(always="error_500", max_faults=2)
    for _ in range(2):
        with pytest.raises(botocore.exceptions.ClientError):
            await _ranged_get(client, stored[1])
    body, _ = await _ranged_get(client, stored[1])
    assert body == EXPECTED
    assert proxy.faults_injected == {"error_500": 2}


def test_the_same_seed_gives_the_same_schedule_and_rates_are_respected() -> None:
    def schedule(seed: int) -> list[str | None]:
        plan = FaultPlan(seed=seed, rates={"slowdown_503": 0.1, "truncate": 0.05})
        return [plan.draw(f"GET /b/k bytes={i}-{i + 9}", 0) for i in range(20_000)]

    draws, again, other = schedule(7), schedule(7), schedule(8)
    assert draws == again
    assert draws != other
    counts = collections.Counter(draws)
    assert 0.09 < counts["slowdown_503"] / 20_000 < 0.11
    assert 0.04 < counts["truncate"] / 20_000 < 0.06
    assert set(counts) == {None, "slowdown_503", "truncate"}


def test_a_retry_of_the_same_request_gets_a_fresh_draw() -> None:
    plan = FaultPlan(seed=1, rates={"error_500": 0.5})
    fates = {plan.draw("GET /b/k bytes=0-9", n) for n in range(64)}
    assert fates == {None, "error_500"}


def test_a_plan_rejects_unknown_kinds_and_rates_over_one() -> None:
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FaultPlan(rates={"meteor_strike": 0.1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="sum to more than 1"):
        FaultPlan(rates={"slowdown_503": 0.7, "error_500": 0.7})
    with pytest.raises(ValueError, match="always"):
        FaultPlan(always="meteor_strike")  # type: ignore[arg-type]


def test_the_default_plan_has_the_documented_rates() -> None:
    assert dict(FaultPlan().rates) == {
        "slowdown_503": 0.05, "error_500": 0.0, "reset_mid_body": 0.02,
        "truncate": 0.02, "stall": 0.0, "wrong_etag": 0.0, "ignore_range": 0.0, "wrong_content_range": 0.0,
    }  # fmt: skip
    assert set(FaultPlan().rates) == set(FAULT_KINDS)


# --- counters and lifecycle ------------------------------------------------------------------------------------


def test_counters_add_up_under_concurrent_clients(
    stored: tuple[S3Server, str], fault_proxy: MakeProxy
) -> None:
    server, bucket = stored
    proxy = fault_proxy(server, FaultPlan(seed=3, rates={"error_500": 0.3}))
    # boto3 from threads, retries off: every request and fault is counted once, from the proxy's own loop thread.
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=proxy.url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=Config(
            s3={"addressing_style": "path"},
            response_checksum_validation="when_required",
            retries={"total_max_attempts": 1},
        ),
    )
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(10):
            try:
                body = client.get_object(
                    Bucket=bucket, Key=KEY, Range=f"bytes={n * 100 + i}-{n * 100 + i + 999}"
                )
                ok = body["Body"].read() == DATA[n * 100 + i : n * 100 + i + 1000]
                outcome = "ok" if ok else "corrupt"
            except botocore.exceptions.ClientError:
                outcome = "error"
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    stats = proxy.stats()
    assert outcomes["corrupt"] == 0
    assert outcomes["ok"] + outcomes["error"] == 40
    assert stats.requests == stats.eligible == 40
    assert stats.faults == {"error_500": outcomes["error"]}
    assert stats.body_bytes >= 1000 * outcomes["ok"]
    assert len(stats.events) == stats.requests


def test_stop_returns_promptly_while_a_client_is_stalled(stored: tuple[S3Server, str]) -> None:
    server, bucket = stored
    proxy = FaultProxy(server, FaultPlan(always="stall", stall_seconds=60)).start()
    client = server.with_endpoint(proxy.url).client()
    result: list[BaseException | bytes] = []

    def read() -> None:
        try:
            result.append(client.get_object(Bucket=bucket, Key=KEY, Range=RANGE)["Body"].read())
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 10
    while proxy.faults_injected.get("stall", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 5.0
    reader.join(timeout=20)
    assert result and isinstance(result[0], Exception)


def test_a_proxy_is_a_context_manager_that_frees_its_port(stored: tuple[S3Server, str]) -> None:
    with FaultProxy(stored[0]) as proxy:
        url = proxy.url
    with FaultProxy(stored[0], port=int(url.rsplit(":", 1)[1])) as again:
        assert again.url == url


def test_a_proxy_refuses_an_upstream_off_loopback() -> None:
    with pytest.raises(RuntimeError, match="loopback"):
        FaultProxy("http://example.com:9000")


@pytest.fixture
def _no_thread_leak() -> Iterator[None]:
    before = {t.name for t in threading.enumerate()}
    yield
    leaked = {t.name for t in threading.enumerate()} - before
    assert not [name for name in leaked if name.startswith("faultproxy")]


@pytest.mark.usefixtures("_no_thread_leak")
def test_a_stopped_proxy_leaves_no_thread(stored: tuple[S3Server, str]) -> None:
    FaultProxy(stored[0]).start().stop()
