"""Fixtures for the server tests: tiny demo models, a hand-made node-cache layout, a real server process.

The cache layout is built by hand exactly as the agent publishes it (snapshot directory, manifest, relative
symlink swapped in with ``os.replace``), so these tests do not depend on the agent's code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import xxhash

from agent.store.layout import current_boot_id
from server.demo_model import DemoShape, write_demo_model

REPO = Path(__file__).resolve().parents[2]
TINY = DemoShape(input_dim=8, hidden_size=32, num_layers=4, output_dim=3)


def xxh3_128_file(path: Path) -> str:
    """The node cache's digest (xxh3-128 over the xxh3-128 of each MiB), computed here independently."""
    data = path.read_bytes()
    mib = 1024 * 1024
    return xxhash.xxh3_128_hexdigest(b"".join(xxhash.xxh3_128_digest(data[i:i + mib])
                                              for i in range(0, len(data), mib)))


@dataclass
class CacheRoot:
    """A node-cache root we publish models into by hand, the way the agent does."""

    root: Path
    published: list[str] = field(default_factory=list)

    def stage(self, model_id: str, revision: str = "rev1", *, shape: DemoShape = TINY, shard_bytes: int = 4096) -> Path:
        """Write a demo model into a build's data directory (not yet visible under models/)."""
        data = self.root / "snapshots" / model_id / revision / "data"
        write_demo_model(data, shape, shard_bytes=shard_bytes)
        return data

    def write_manifest(self, model_id: str, revision: str, uri: str, relpath: str, *, boot_id: str = "") -> Path:
        """The build's own manifest (version 2), as the agent writes it before the build becomes visible."""
        build = self.root / "snapshots" / model_id / revision
        data = build / "data"
        files: list[dict[str, Any]] = [
            {"path": p.relative_to(data).as_posix(), "size": p.stat().st_size, "xxh3_128": xxh3_128_file(p),
             "key": p.name, "etag": "e"}
            for p in sorted(data.rglob("*")) if p.is_file()
        ]
        manifest = {
            "version": 2, "uri": uri, "kind": "prefix" if uri.endswith("/") else "object", "model_id": model_id,
            "revision": revision, "build": revision, "snapshot": f"snapshots/{model_id}/{revision}",
            "path": relpath, "files": files, "total_bytes": sum(int(f["size"]) for f in files),
            "fetched_at": "2024-01-01T00:00:00Z", "digest_scheme": "xxh3-128-chunked", "chunk_size": 1024 * 1024,
            "boot_id": boot_id or current_boot_id(),
        }
        path = build / "manifest.json"
        path.write_text(json.dumps(manifest))
        return path

    def publish(self, uri: str, model_id: str, revision: str = "rev1", *, target: str = "") -> Path:
        """Make ``uri`` visible: manifest first, then the relative symlink, atomically (``os.replace``)."""
        bucket_and_key = uri.removeprefix("s3://").rstrip("/")
        relpath = f"models/s3/{bucket_and_key}"
        self.write_manifest(model_id, revision, uri, relpath)
        link = self.root / relpath
        link.parent.mkdir(parents=True, exist_ok=True)
        data = self.root / "snapshots" / model_id / revision / "data"
        dest = data / target if target else data
        tmp = link.with_name(f".{link.name}.tmp")
        tmp.symlink_to(os.path.relpath(dest, link.parent))
        os.replace(tmp, link)
        return link


@pytest.fixture
def cache_root(tmp_path: Path) -> CacheRoot:
    root = tmp_path / "cache"
    root.mkdir()
    return CacheRoot(root)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A sharded demo model (a few KB per shard) in a plain directory."""
    directory = tmp_path / "tiny"
    write_demo_model(directory, TINY, shard_bytes=4096)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A real ``python -m server`` on a free port; stderr goes to a file we can read."""

    proc: subprocess.Popen[bytes]
    port: int
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5)

    def wait_http(self, timeout: float = 30) -> None:
        """Until /healthz answers (the HTTP server is up); fails if the process dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                if self.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server did not answer /healthz within {timeout} s:\n{self.stderr()}")

    def wait_ready(self, timeout: float = 30) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                response = self.get("/readyz")
                if response.status_code == 200:
                    return response
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready within {timeout} s:\n{self.stderr()}")

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``start_server(**env)`` → a running ``ServerProcess``; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        port = free_port()
        stderr_path = tmp_path / f"server-{len(started)}.stderr"
        full_env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "WEIGHTCACHE_HOST": "127.0.0.1",
            "WEIGHTCACHE_PORT": str(port),
            "WEIGHTCACHE_DEVICE": "cpu",
            **env,
        }
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "server"], env=full_env, cwd=REPO, stderr=err,
                                    stdout=subprocess.DEVNULL)
        server = ServerProcess(proc, port, stderr_path)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(10)
