"""Self-tests of tests/fixtures/tlsfront.py: an S3 server behind the front is a real HTTPS endpoint that a client
trusts only through the CA bundle, with signatures intact and nothing left behind."""

from __future__ import annotations

import os
import ssl
import threading
import urllib.request

import boto3
import pytest
from botocore.config import Config

from tests.fixtures.s3servers import S3Server
from tests.fixtures.tlsfront import TlsFront

pytestmark = pytest.mark.timeout(60)


def _client(server: S3Server, front: TlsFront, *, verify: str | bool) -> object:
    return boto3.session.Session().client(
        "s3", endpoint_url=front.url, aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
        region_name=server.region, verify=verify,
        config=Config(s3={"addressing_style": "path"}, response_checksum_validation="when_required",
                      retries={"total_max_attempts": 1}),
    )


def test_a_signed_client_trusting_the_ca_reads_through_the_front(s3_server: S3Server, bucket: str) -> None:
    data = os.urandom(300_000)
    s3_server.put(bucket, "k", data)
    with TlsFront(s3_server) as front:
        client = _client(s3_server, front, verify=str(front.ca_file))
        got = client.get_object(Bucket=bucket, Key="k", Range="bytes=10-99999")  # type: ignore[attr-defined]
        assert got["Body"].read() == data[10:100000]
        assert front.connections >= 1
        assert front.bytes_to_client >= 99990


def test_without_the_ca_bundle_the_certificate_is_refused(s3_server: S3Server) -> None:
    with TlsFront(s3_server) as front:
        with pytest.raises(urllib.error.URLError) as caught:
            urllib.request.urlopen(front.url, timeout=5, context=ssl.create_default_context())
        assert isinstance(caught.value.reason, ssl.SSLCertVerificationError)


def test_the_certificate_names_127_0_0_1_and_localhost(s3_server: S3Server) -> None:
    with TlsFront(s3_server) as front:
        ctx = ssl.create_default_context(cafile=str(front.ca_file))
        for host in ("127.0.0.1", "localhost"):
            try:
                urllib.request.urlopen(f"https://{host}:{front.port}/", timeout=5, context=ctx)
            except urllib.error.HTTPError as e:
                assert e.code in (400, 403, 404)  # the server's answer, over a verified connection


def test_a_stopped_front_removes_its_key_and_leaves_no_thread(s3_server: S3Server) -> None:
    front = TlsFront(s3_server).start()
    directory = front.ca_file.parent
    assert (directory / "key.pem").stat().st_mode & 0o077 == 0
    front.stop()
    assert not directory.exists()
    assert not [t for t in threading.enumerate() if t.name == "tlsfront"]
    front.stop()  # idempotent


def test_a_front_refuses_an_upstream_off_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        TlsFront("http://192.0.2.1:9000")
