"""WEIGHTCACHE_FALLBACK=fetch: with no agent on the node, the server fetches the model itself (agent's engine)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.fixtures.s3servers import S3Server
from tests.server.conftest import TINY, ServerProcess

pytest.importorskip("agent.transfer.fetch", reason="the agent's fetch engine (agent/transfer/fetch.py) is not available")


def test_model_missing_from_the_node_cache_is_fetched_into_the_fallback_dir(
    tmp_path: Path, tiny_model: Path, moto_s3: S3Server, start_server: Callable[..., ServerProcess]
) -> None:
    bucket = "wc-fallback-test"
    moto_s3.create_bucket(bucket)
    for path in tiny_model.iterdir():
        moto_s3.put_file(bucket, f"tiny/{path.name}", path)
    fallback_dir = tmp_path / "fallback"
    server = start_server(
        WEIGHTCACHE_MODEL=f"s3://{bucket}/tiny/",
        WEIGHTCACHE_ROOT=str(tmp_path / "empty-node-cache"),
        WEIGHTCACHE_FALLBACK="fetch",
        WEIGHTCACHE_FALLBACK_DIR=str(fallback_dir),
        WEIGHTCACHE_FALLBACK_GRACE_SECONDS="0.2",
        WEIGHTCACHE_VERIFY="digest",
        **moto_s3.env(),
    )
    ready = server.wait_ready(timeout=60)
    assert ready.json()["model_path"] == str(fallback_dir / "models" / "s3" / bucket / "tiny")
    assert "fetching it into" in server.stderr()
    response = httpx.post(server.url + "/v1/predict", json={"inputs": [[0.0] * TINY.input_dim]}, timeout=5)
    assert response.status_code == 200
    info = server.get("/v1/model").json()
    assert info["verified"] == "digest"  # the agent's manifest in the fallback dir checked every byte
