"""Self-tests of tests/fixtures/s3servers.py: the servers work as the agent will use them, and the quirks the
module docstring documents are still true (an upgrade of moto or rclone that changes one fails here first)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.config import Config

from tests.fixtures.s3servers import S3Server, free_port, start_moto, start_rclone

pytestmark = pytest.mark.timeout(60)

DATA = bytes(range(256)) * 64  # 16 KiB, recognisable at every offset


def _default_client(server: S3Server) -> object:
    """A client with botocore's defaults (checksum validation on), as a careless caller would build one."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )


@pytest.fixture
def aws_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The process environment pointed at the current server, as the agent's pod would have it."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    yield s3_server


def test_put_then_get_returns_the_same_bytes(s3_server: S3Server, bucket: str) -> None:
    s3_server.put(bucket, "a/b.bin", DATA)
    body = s3_server.client().get_object(Bucket=bucket, Key="a/b.bin")["Body"].read()
    assert body == DATA


def test_etag_of_a_single_put_is_the_quoted_md5(s3_server: S3Server, bucket: str) -> None:
    etag = s3_server.put(bucket, "obj", DATA)
    assert etag == f'"{hashlib.md5(DATA).hexdigest()}"'
    assert s3_server.head_etag(bucket, "obj") == etag


def test_ranged_get_returns_only_the_requested_bytes(s3_server: S3Server, bucket: str) -> None:
    s3_server.put(bucket, "obj", DATA)
    resp = s3_server.client().get_object(Bucket=bucket, Key="obj", Range="bytes=1000-1999")
    assert resp["Body"].read() == DATA[1000:2000]
    assert resp["ContentRange"] == f"bytes 1000-1999/{len(DATA)}"
    # moto answers 206 as S3 does; rclone answers 200 (with Content-Range). Callers must accept both.
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == {"moto": 206, "rclone": 200}[s3_server.name]


def test_put_file_is_listed_at_once_and_a_replacement_changes_the_etag(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 5000)
    s3_server.put(bucket, "m/seen-before", b"1")
    s3_server.client().list_objects_v2(Bucket=bucket)  # warm rclone's directory cache on purpose
    s3_server.put_file(bucket, "m/new/deeper/f.bin", src)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["m/new/deeper/f.bin", "m/seen-before"]
    first = s3_server.head_etag(bucket, "m/new/deeper/f.bin")

    src.write_bytes(b"y" * 5000)  # same size: only the content tells them apart
    s3_server.put_file(bucket, "m/new/deeper/f.bin", src)
    assert s3_server.head_etag(bucket, "m/new/deeper/f.bin") != first
    body = s3_server.client().get_object(Bucket=bucket, Key="m/new/deeper/f.bin")["Body"].read()
    assert body == b"y" * 5000


def test_delete_removes_the_object(s3_server: S3Server, bucket: str) -> None:
    s3_server.put(bucket, "gone", b"1")
    s3_server.delete(bucket, "gone")
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_bucket_fixture_gives_a_fresh_empty_bucket(s3_server: S3Server, bucket: str) -> None:
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_env_points_at_the_server_and_never_at_instance_metadata(s3_server: S3Server) -> None:
    env = s3_server.env()
    assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")


async def test_aiobotocore_lists_and_reads_a_range_with_only_the_environment(
    aws_env: S3Server, bucket: str
) -> None:
    aws_env.put(bucket, "models/m/weights.bin", DATA)
    config = AioConfig(s3={"addressing_style": "path"}, response_checksum_validation="when_required")
    async with get_session().create_client("s3", config=config) as client:
        listing = await client.list_objects_v2(Bucket=bucket, Prefix="models/m/")
        assert [o["Key"] for o in listing["Contents"]] == ["models/m/weights.bin"]
        resp = await client.get_object(Bucket=bucket, Key="models/m/weights.bin", Range="bytes=10-19")
        async with resp["Body"] as body:
            assert await body.read() == DATA[10:20]


# --- moto's documented behaviour -------------------------------------------------------------------------------


def test_moto_honours_if_match(moto_s3: S3Server) -> None:
    moto_s3.create_bucket("wc-ifmatch-moto")
    try:
        etag = moto_s3.put("wc-ifmatch-moto", "obj", DATA)
        client = moto_s3.client()
        assert client.get_object(Bucket="wc-ifmatch-moto", Key="obj", IfMatch=etag)["Body"].read() == DATA
        assert client.get_object(Bucket="wc-ifmatch-moto", Key="obj", IfMatch=etag.strip('"'))["Body"].read()
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            client.get_object(Bucket="wc-ifmatch-moto", Key="obj", Range="bytes=0-9", IfMatch='"0000"')
        assert caught.value.response["Error"]["Code"] == "PreconditionFailed"
    finally:
        moto_s3.delete_bucket("wc-ifmatch-moto")


def test_moto_lists_etags_with_quotes(moto_s3: S3Server) -> None:
    moto_s3.create_bucket("wc-list-moto")
    try:
        etag = moto_s3.put("wc-list-moto", "obj", DATA)
        assert moto_s3.client().list_objects_v2(Bucket="wc-list-moto")["Contents"][0]["ETag"] == etag
    finally:
        moto_s3.delete_bucket("wc-list-moto")


# --- rclone's documented quirks --------------------------------------------------------------------------------


@pytest.fixture
def rclone_bucket(rclone_s3: S3Server) -> Iterator[str]:
    rclone_s3.create_bucket("wc-rclone-quirks")
    try:
        yield "wc-rclone-quirks"
    finally:
        rclone_s3.delete_bucket("wc-rclone-quirks")


def test_rclone_ignores_if_match(rclone_s3: S3Server, rclone_bucket: str) -> None:
    rclone_s3.put(rclone_bucket, "obj", DATA)
    resp = rclone_s3.client().get_object(Bucket=rclone_bucket, Key="obj", Range="bytes=0-9", IfMatch='"0000"')
    assert resp["Body"].read() == DATA[:10]


def test_rclone_lists_etags_without_quotes(rclone_s3: S3Server, rclone_bucket: str) -> None:
    etag = rclone_s3.put(rclone_bucket, "obj", DATA)
    listed = rclone_s3.client().list_objects_v2(Bucket=rclone_bucket)["Contents"][0]["ETag"]
    assert listed == etag.strip('"') != etag


def test_rclone_ranged_get_fails_botocore_default_checksum_validation(
    rclone_s3: S3Server, rclone_bucket: str
) -> None:
    # rclone sends the whole object's CRC32 (recorded at upload) with a partial body; only
    # response_checksum_validation=when_required (as S3Server.client() and the agent use) reads it.
    rclone_s3.put(rclone_bucket, "obj", DATA)
    resp = _default_client(rclone_s3).get_object(Bucket=rclone_bucket, Key="obj", Range="bytes=0-9")  # type: ignore[attr-defined]
    assert "x-amz-checksum-crc32" in resp["ResponseMetadata"]["HTTPHeaders"]
    with pytest.raises(botocore.exceptions.FlexibleChecksumError):
        resp["Body"].read()


def test_rclone_multipart_etag_is_the_plain_md5_of_the_whole(
    rclone_s3: S3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(11 * 1024 * 1024)
    src = tmp_path / "mp.bin"
    src.write_bytes(data)
    # Through S3 (not put_file's direct copy), so that rclone sees a real multipart upload.
    S3Server.put_file(rclone_s3, rclone_bucket, "mp.bin", src)
    assert rclone_s3.head_etag(rclone_bucket, "mp.bin") == f'"{hashlib.md5(data).hexdigest()}"'


def test_rclone_checks_signatures(rclone_s3: S3Server, rclone_bucket: str) -> None:
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=rclone_s3.endpoint_url,
        aws_access_key_id=rclone_s3.access_key,
        aws_secret_access_key="not-the-secret",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.list_objects_v2(Bucket=rclone_bucket)
    assert caught.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


# --- lifecycle -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [start_moto, start_rclone], ids=["moto", "rclone"])
def test_a_stopped_server_leaves_no_process_and_no_directory(start: object) -> None:
    running = start()  # type: ignore[operator]
    pid = running.process.popen.pid
    running.stop()
    assert running.process.popen.poll() is not None
    assert not running.workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone, helpers included


def test_free_port_can_be_bound_by_a_child_process() -> None:
    port = free_port()
    code = f"import socket; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.close()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=10)
