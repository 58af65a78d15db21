"""Shared helpers for the agent's tests: settings for a test cache, the AWS environment of a real test S3 server,
one-call fetches, running the CLI as a subprocess, and reading a published model back.

Everything reaches S3 the way the agent does in production (the standard AWS environment, a real server on
loopback); nothing here replaces or patches a project function.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import xxhash

from agent.config import AgentSettings, load_settings
from agent.store.cache import Cache
from agent.store.manifest import Manifest, ManifestFile, PlannedFile, compute_revision, source_id
from agent.store.publish import Build
from agent.transfer.fetch import Fetcher, FetchResult
from agent.transfer.s3 import S3Client
from agent.uris import parse_model_uri
from tests.fixtures.s3servers import S3Server

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024

_PLUGINS = ("tests.fixtures.s3servers", "tests.fixtures.faultproxy")


def pytest_configure(config: pytest.Config) -> None:
    # The fault proxy's fixture, whether or not tests/conftest.py registers it (registering twice would clash).
    for name in _PLUGINS:
        if not config.pluginmanager.has_plugin(name):
            config.pluginmanager.import_plugin(name)


def make_settings(cache_dir: Path, **overrides: Any) -> AgentSettings:
    """Settings for a test: small parts so small objects span several, fast retries, no free-space floor.

    ``env={}``: a developer's own ``WEIGHTCACHE_*`` variables never leak into a test.
    """
    values: dict[str, Any] = {
        "cache_dir": cache_dir,
        "min_part_size": MiB,
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.05,
        "min_free_bytes": 0,
        "read_timeout": 10.0,
        "connect_timeout": 5.0,
    }
    values.update(overrides)
    return load_settings(env={}, **values)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point the standard AWS environment of this process at the current test server (undone after the test)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


def use_endpoint(monkeypatch: pytest.MonkeyPatch, server: S3Server, endpoint_url: str | None = None) -> None:
    """Point this process's AWS environment at ``server`` (or at ``endpoint_url``, e.g. a fault proxy before it)."""
    env = server.env()
    if endpoint_url is not None:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


async def fetch(settings: AgentSettings, uri: str) -> FetchResult:
    """One demand, as the one-shot CLI makes it: recover the cache, then ensure the model."""
    cache = Cache(settings.cache_dir)
    cache.recover(orphan_max_age_seconds=settings.orphan_max_age_seconds)
    try:
        async with S3Client(settings) as s3:
            return await Fetcher(settings, cache, s3, flush_in_background=False).ensure(uri)
    finally:
        cache.close()


def put_all(server: S3Server, bucket: str, objects: Mapping[str, bytes]) -> None:
    """Store the objects, empty ones last.

    rclone v1.75 quirk: after a zero-byte PUT, the next PUT into the same directory hangs for the client's whole
    read timeout (60 s) and comes back without an ETag. Nothing follows the empty objects here.
    """
    client = server.client()
    for key, data in sorted(objects.items(), key=lambda kv: len(kv[1]) == 0):
        client.put_object(Bucket=bucket, Key=key, Body=data)


def read_tree(path: Path) -> dict[str, bytes]:
    """Every regular file under ``path`` (following the published symlink itself), by relative path."""
    out: dict[str, bytes] = {}
    base = Path(os.path.realpath(path))
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            p = Path(dirpath) / name
            out[p.relative_to(base).as_posix()] = p.read_bytes()
    return out


def blob_files(root: Path) -> list[Path]:
    blobs = root / "blobs"
    return sorted(blobs.iterdir()) if blobs.exists() else []


def leftover_downloads(root: Path) -> list[str]:
    """Temp download files (``*.incomplete``) under ``tmp/``."""
    tmp = root / "tmp"
    return sorted(p.name for p in tmp.glob("*.incomplete")) if tmp.exists() else []


def staging_dirs(root: Path) -> list[str]:
    snaps = root / "snapshots"
    return sorted(str(p.relative_to(root)) for p in snaps.glob("*/*.incomplete")) if snaps.exists() else []


def agent_env(server: S3Server | None = None, *, endpoint_url: str | None = None,
              **weightcache: str) -> dict[str, str]:
    """The environment for a ``python -m agent`` subprocess: ours minus WEIGHTCACHE_*/AWS_*, plus the server's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTCACHE_", "AWS_"))}
    if server is not None:
        env.update(server.env())
        if endpoint_url is not None:
            env["AWS_ENDPOINT_URL"] = endpoint_url
    env["WEIGHTCACHE_LOG_FORMAT"] = "text"
    env.update(weightcache)
    return env


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def run_agent(*args: str, env: Mapping[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m agent ARGS`` to completion and capture its output."""
    return subprocess.run(agent_cmd(*args), env=dict(env), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def walk_all(path: Path) -> Iterator[Path]:
    """Every entry under ``path`` (not following symlinks), for checks that nothing escaped a root."""
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            yield Path(dirpath) / name


def build_model(cache: Cache, uri: str, files: Mapping[str, bytes], *, etag: str = "e1") -> Manifest:
    """Stage, adopt and publish a model through the Cache calls the fetcher makes (no network)."""
    cache.ensure_layout()
    model = parse_model_uri(uri)
    planned = [PlannedFile(relpath=p, key=f"{model.key}/{p}" if model.is_prefix else model.key, size=len(d),
                           etag=etag) for p, d in files.items()]
    revision = compute_revision(planned)
    build = Build(cache, model.model_id, revision)
    build.create()
    entries = []
    for f in planned:
        data = files[f.relpath]
        tmp = cache.tmp_download_path(source_id(model.bucket, f.key, f.etag, f.size))
        tmp.write_bytes(data)
        digest = digest_of(data)
        build.adopt_file(tmp, digest=digest, size=len(data), relpath=f.relpath)
        entries.append(ManifestFile(path=f.relpath, size=len(data), xxh3_128=digest, key=f.key, etag=f.etag))
    return build.publish(uri=model, files=sorted(entries, key=lambda e: e.path), fetch_seconds=0.1)


def digest_of(data: bytes) -> str:
    """The cache's digest of some bytes (chunked xxh3-128), computed independently of agent.store.layout's hasher."""
    chunk = 1024 * 1024
    return xxhash.xxh3_128_hexdigest(b"".join(xxhash.xxh3_128_digest(data[i:i + chunk])
                                              for i in range(0, len(data), chunk)))
