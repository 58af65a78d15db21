"""Self-tests of tests/fixtures/connectproxy.py: CONNECT tunnels and absolute-form requests reach a real S3 server
byte for byte and are counted; credentials and the loopback-only rule are enforced."""

from __future__ import annotations

import os
import socket
import threading
import urllib.request

import boto3
import pytest
from botocore.config import Config

from tests.fixtures.connectproxy import ConnectProxy, ProxiedRequest
from tests.fixtures.s3servers import S3Server
from tests.fixtures.tlsfront import TlsFront

pytestmark = pytest.mark.timeout(60)


def _client(server: S3Server, endpoint_url: str, proxy_url: str, verify: str | bool = True) -> object:
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name=server.region, verify=verify,
        config=Config(s3={"addressing_style": "path"}, response_checksum_validation="when_required",
                      retries={"total_max_attempts": 1}, proxies={"http": proxy_url, "https": proxy_url}),
    )


def test_https_goes_through_a_counted_connect_tunnel(s3_server: S3Server, bucket: str) -> None:
    data = os.urandom(200_000)
    s3_server.put(bucket, "k", data)
    with TlsFront(s3_server) as front, ConnectProxy() as proxy:
        client = _client(s3_server, front.url, proxy.url, verify=str(front.ca_file))
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == data  # type: ignore[attr-defined]
        assert proxy.tunnels == [f"127.0.0.1:{front.port}"] * front.connections
        assert proxy.tunnel_bytes_to_client >= len(data)
        assert proxy.requests == []


def test_http_goes_through_as_absolute_form_requests_on_keep_alive(s3_server: S3Server, bucket: str) -> None:
    data = os.urandom(200_000)
    s3_server.put(bucket, "k", data)
    with ConnectProxy() as proxy:
        client = _client(s3_server, s3_server.endpoint_url, proxy.url)
        for _ in range(2):
            assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == data  # type: ignore[attr-defined]
        assert client.head_object(Bucket=bucket, Key="k")["ContentLength"] == len(data)  # type: ignore[attr-defined]
        url = f"{s3_server.endpoint_url}/{bucket}/k"
        assert proxy.requests == [ProxiedRequest("GET", url, 200)] * 2 + [ProxiedRequest("HEAD", url, 200)]
        assert proxy.forwarded_body_bytes == 2 * len(data)
        assert proxy.tunnels == []


def test_credentials_are_required_when_configured(s3_server: S3Server) -> None:
    with ConnectProxy(credentials=("user", "p@ss word")) as proxy:
        target = f"{s3_server.endpoint_url}/"
        bare = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
        with pytest.raises(urllib.error.HTTPError) as caught:
            bare.open(target, timeout=5)
        assert caught.value.code == 407
        authed = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": proxy.url_with_credentials("user", "p@ss word")}))
        try:
            authed.open(target, timeout=5)
        except urllib.error.HTTPError as e:
            assert e.code in (400, 403)  # the S3 server's answer to an unsigned request: the proxy let it through
        assert len(proxy.requests) == 1 and len(proxy.refused) == 1


def test_a_target_off_loopback_is_refused_without_connecting() -> None:
    with ConnectProxy() as proxy, socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 403")
        assert proxy.tunnels == [] and proxy.refused == ["CONNECT 192.0.2.1:443: not loopback"]


def test_a_stopped_proxy_leaves_no_thread() -> None:
    proxy = ConnectProxy().start()
    proxy.stop()
    assert not [t for t in threading.enumerate() if t.name == "connectproxy"]
    proxy.stop()  # idempotent
