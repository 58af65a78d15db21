"""Peer exchange: several agents on one machine — each its own cache root and peer port, in one process — behind a
byte-counting proxy in front of a real S3 server. A model one node holds reaches the others with almost no S3
bytes; nodes warming at once pull about one copy; a peer that refuses, dies, stalls or sends bad bytes ends with
the same bytes, taken from elsewhere. Nothing of the project is patched: peers talk real HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import metrics
from agent.config import AgentSettings
from agent.daemon.peering import Peering, open_peering
from agent.store.cache import Cache
from agent.store.manifest import source_id
from agent.transfer.fetch import Fetcher, FetchResult
from agent.transfer.s3 import S3Client
from tests.agent.conftest import MiB, make_settings, put_all, read_tree, use_endpoint
from tests.fixtures.faultproxy import FaultPlan, FaultProxy
from tests.fixtures.s3servers import S3Server, free_port

TOKEN = secrets.token_hex(16)


@dataclass
class Node:
    index: int
    settings: AgentSettings
    cache: Cache
    fetcher: Fetcher
    peering: Peering
    address: str

    async def ensure(self, uri: str) -> FetchResult:
        return await self.fetcher.ensure(uri)


@pytest.fixture
def counted_s3(rclone_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[S3Server, str, FaultProxy]]:
    """A fresh bucket on rclone, this process's AWS env pointed at a byte-counting proxy in front of it."""
    name = f"wc-{uuid.uuid4().hex[:16]}"
    rclone_s3.create_bucket(name)
    with FaultProxy(rclone_s3) as proxy:
        use_endpoint(monkeypatch, rclone_s3, proxy.url)
        yield rclone_s3, name, proxy
    with contextlib.suppress(Exception):
        rclone_s3.delete_bucket(name)


def write_token(path: Path, token: str = TOKEN) -> Path:
    path.write_text(token + "\n")
    return path


def cluster(tmp_path: Path, n: int, **kwargs: object) -> contextlib.AbstractAsyncContextManager[list[Node]]:
    """``n`` agents, each with its own root and peer port, all listing all (themselves included) as peers."""
    return cluster_at(tmp_path, [f"127.0.0.1:{free_port()}" for _ in range(n)], **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def cluster_at(tmp_path: Path, addresses: list[str], *,
                     token_for: Callable[[int], str] = lambda i: TOKEN,
                     peers_for: Callable[[int, list[str]], list[str]] = lambda i, found: found,
                     **overrides: object) -> AsyncIterator[list[Node]]:
    """Agents at the given peer addresses (a proxy in front of one must know its port before it starts)."""
    nodes: list[Node] = []
    async with contextlib.AsyncExitStack() as stack:
        for i, address in enumerate(addresses):
            values: dict[str, object] = {
                "peer_token_file": write_token(tmp_path / f"token{i}", token_for(i)), "peer_host": "127.0.0.1",
                "peer_port": int(address.rsplit(":", 1)[1]), "peers": ",".join(peers_for(i, addresses)),
                "peer_address": address, "peer_timeout": 2.0, "peer_wait_seconds": 5.0, "concurrency": 4}
            values.update(overrides)
            settings = make_settings(tmp_path / f"node{i}", **values)
            cache = Cache(settings.cache_dir)
            await asyncio.to_thread(cache.recover, orphan_max_age_seconds=3600)
            stack.callback(cache.close)
            peering = open_peering(settings)
            assert peering is not None
            s3 = await stack.enter_async_context(S3Client(settings))
            fetcher = Fetcher(settings, cache, s3, swarm=peering.swarm, flush_in_background=False)
            await peering.start(cache, fetcher.board, None)
            stack.push_async_callback(peering.aclose)
            nodes.append(Node(i, settings, cache, fetcher, peering, address))
        yield nodes


def model_files(sizes: dict[str, int]) -> dict[str, bytes]:
    return {f"m/{name}": os.urandom(size) for name, size in sizes.items()}


def expected_tree(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k[2:]: v for k, v in files.items()}


def flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def peer_errors(reason: str) -> float:
    return metrics.PEER_ERRORS.labels(reason=reason)._value.get()


MODEL = {"config.json": 200, "weights-1.bin": 6 * MiB + 123, "weights-2.bin": 5 * MiB, "tiny.bin": 10}


async def test_a_model_one_node_holds_reaches_another_almost_without_s3(
        counted_s3: tuple[S3Server, str, FaultProxy], tmp_path: Path) -> None:
    s3, bucket, proxy = counted_s3
    files = model_files(MODEL)
    put_all(s3, bucket, files)
    size = sum(map(len, files.values()))
    uri = f"s3://{bucket}/m/"
    async with cluster(tmp_path, 2) as (a, b):
        first = await a.ensure(uri)
        assert first.peer_bytes == 0
        proxy.reset_stats()
        second = await b.ensure(uri)
        from_s3 = proxy.body_bytes_forwarded
    assert read_tree(second.path) == expected_tree(files)
    assert second.peer_bytes == size, "every byte came from the peer"
    assert from_s3 <= 0.10 * size, f"S3 sent {from_s3} bytes of a {size}-byte model the peer held"


async def test_three_nodes_warming_at_once_pull_about_one_copy(
        counted_s3: tuple[S3Server, str, FaultProxy], tmp_path: Path) -> None:
    s3, bucket, proxy = counted_s3
    files = model_files({"a.bin": 12 * MiB, "b.bin": 9 * MiB + 7, "c.json": 300})
    put_all(s3, bucket, files)
    size = sum(map(len, files.values()))
    uri = f"s3://{bucket}/m/"
    async with cluster(tmp_path, 3) as nodes:
        proxy.reset_stats()
        results = await asyncio.gather(*(n.ensure(uri) for n in nodes))
        from_s3 = proxy.body_bytes_forwarded
    for r in results:
        assert read_tree(r.path) == expected_tree(files)
    assert from_s3 <= 1.5 * size, f"S3 sent {from_s3 / size:.2f} copies to three nodes warming at once"
    assert sum(r.peer_bytes for r in results) >= size, "the nodes passed parts on between them"


async def test_many_small_files_warming_at_once_spread_over_the_nodes(
        counted_s3: tuple[S3Server, str, FaultProxy], tmp_path: Path) -> None:
    s3, bucket, _proxy = counted_s3
    files = model_files({f"shard-{i:03d}.json": 1000 + i for i in range(150)})
    put_all(s3, bucket, files)
    size = sum(map(len, files.values()))
    async with cluster(tmp_path, 3) as nodes:
        results = await asyncio.gather(*(n.ensure(f"s3://{bucket}/m/") for n in nodes))
    for r in results:
        assert read_tree(r.path) == expected_tree(files)
    # Object bytes as the agents count them: here the listings' XML alone weighs as much as the model.
    from_s3 = sum(r.downloaded_bytes - r.peer_bytes for r in results)
    assert from_s3 <= 1.5 * size, f"S3 sent {from_s3 / size:.2f} copies of 150 small files to three nodes"


async def test_a_peer_with_the_wrong_token_gets_nothing_and_the_bytes_come_from_s3(
        counted_s3: tuple[S3Server, str, FaultProxy], tmp_path: Path) -> None:
    s3, bucket, proxy = counted_s3
    files = model_files({"w.bin": 3 * MiB})
    put_all(s3, bucket, files)
    uri = f"s3://{bucket}/m/"
    before = peer_errors("unauthorized")
    async with cluster(tmp_path, 2, token_for=lambda i: TOKEN if i == 0 else secrets.token_hex(16)) as (a, b):
        await a.ensure(uri)
        proxy.reset_stats()
        result = await b.ensure(uri)
        assert proxy.body_bytes_forwarded >= 3 * MiB
        # Without a token, or with a wrong one, any path is refused.
        src = source_id(bucket, "m/w.bin", s3.head_etag(bucket, "m/w.bin"), 3 * MiB)
        for headers, status in (({}, 401), ({"Authorization": "Bearer " + "x" * 32}, 403)):
            for path in ("/v1/peer/state", f"/v1/peer/sources/{src}", "/nope"):
                req = urllib.request.Request(f"http://{a.address}{path}", headers=headers)
                with pytest.raises(urllib.error.HTTPError) as info:
                    await asyncio.to_thread(urllib.request.urlopen, req, timeout=5)
                assert info.value.code == status, path
    assert read_tree(result.path) == expected_tree(files)
    assert result.peer_bytes == 0
    assert peer_errors("unauthorized") > before


async def test_a_peer_serving_corrupt_bytes_is_caught_per_chunk_and_dropped(
        counted_s3: tuple[S3Server, str, FaultProxy], tmp_path: Path) -> None:
    s3, bucket, _proxy = counted_s3
    files = model_files({"w.bin": 4 * MiB})
    put_all(s3, bucket, files)
    uri = f"s3://{bucket}/m/"
    before = peer_errors("corrupt")
    async with cluster(tmp_path, 2) as (a, b):
        held = await a.ensure(uri)
        # The peer's disk goes bad under its verified blob (a flipped byte in the third chunk).
        await asyncio.to_thread(flip_byte, Path(os.path.realpath(held.path / "w.bin")), 2 * MiB + 5)
        result = await b.ensure(uri)
    assert read_tree(result.path) == expected_tree(files)
    assert peer_errors("corrupt") > before
    assert result.peer_bytes < 4 * MiB, "the bad chunk and those after it came from S3"


@pytest.mark.parametrize("fault", ["reset_mid_body", "stall"])
async def test_a_peer_that_dies_or_stalls_mid_transfer_is_dropped(
        counted_s3: tuple[S3Server, str, FaultProxy], tmp_path: Path, fault: str) -> None:
    s3, bucket, _proxy = counted_s3
    files = model_files({"w.bin": 6 * MiB, "x.bin": 2 * MiB})
    put_all(s3, bucket, files)
    uri = f"s3://{bucket}/m/"
    reason = "connection" if fault == "reset_mid_body" else "stalled"
    before = peer_errors(reason)
    async with contextlib.AsyncExitStack() as stack:
        # Node 0 holds the model; node 1 reaches it only through a proxy that breaks the first ranged read.
        a_port = free_port()
        peer_proxy = stack.enter_context(FaultProxy(f"http://127.0.0.1:{a_port}",
                                                    FaultPlan(always=fault, stall_seconds=30.0, max_faults=1)))
        via_proxy = peer_proxy.url.removeprefix("http://")

        def peers(i: int, found: list[str]) -> list[str]:
            return found if i == 0 else [found[1], via_proxy]

        nodes = await stack.enter_async_context(cluster_at(
            tmp_path, [f"127.0.0.1:{a_port}", f"127.0.0.1:{free_port()}"], peers_for=peers, peer_timeout=1.0))
        a, b = nodes
        await a.ensure(uri)
        result = await asyncio.wait_for(b.ensure(uri), timeout=60)
        injected = peer_proxy.faults_injected
    assert injected, "the proxy broke a peer read"
    assert read_tree(result.path) == expected_tree(files)
    assert peer_errors(reason) > before


async def test_without_a_token_file_peer_exchange_is_off_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert open_peering(make_settings(tmp_path / "r")) is None
    assert open_peering(make_settings(tmp_path / "r", peer_token_file=tmp_path / "missing")) is None
    assert "peer exchange off" in caplog.text


async def test_peers_that_are_down_cost_nothing_but_a_retry_and_s3_serves(
        counted_s3: tuple[S3Server, str, FaultProxy], tmp_path: Path) -> None:
    s3, bucket, _proxy = counted_s3
    files = model_files({**{f"s-{i:02d}.json": 500 + i for i in range(40)}, "w.bin": 3 * MiB})
    put_all(s3, bucket, files)
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]  # nothing listens there

    def with_dead_peers(i: int, found: list[str]) -> list[str]:
        return [*found, *dead]

    before = peer_errors("connection")
    async with cluster(tmp_path, 1, peers_for=with_dead_peers) as (node,):
        result = await asyncio.wait_for(node.ensure(f"s3://{bucket}/m/"), timeout=60)
    assert read_tree(result.path) == expected_tree(files)
    assert result.peer_bytes == 0
    assert peer_errors("connection") > before
