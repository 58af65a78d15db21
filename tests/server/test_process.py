"""``python -m server`` as a real process (uvicorn on a free port): the contract Kubernetes sees.

HTTP is up while the model is awaited; a model that never appears or is corrupt makes the process exit non-zero
with the reason on stderr (so the pod restarts and ``kubectl logs`` says why).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.server.conftest import REPO, TINY, CacheRoot, ServerProcess

StartServer = Callable[..., ServerProcess]


def test_server_answers_probes_while_waiting_then_serves_the_late_model(
    cache_root: CacheRoot, start_server: StartServer
) -> None:
    server = start_server(WEIGHTCACHE_MODEL="s3://bucket/models/tiny/", WEIGHTCACHE_ROOT=str(cache_root.root))
    server.wait_http()
    waiting = server.get("/readyz")
    assert waiting.status_code == 503
    assert waiting.json()["reason"].startswith("waiting for model s3://bucket/models/tiny/")
    cache_root.stage("tiny")
    cache_root.publish("s3://bucket/models/tiny/", "tiny")
    ready = server.wait_ready()
    assert ready.json()["phase"] == "ready"
    response = httpx.post(server.url + "/v1/predict", json={"inputs": [[0.1] * TINY.input_dim]}, timeout=5)
    assert response.status_code == 200
    assert len(response.json()["outputs"][0]) == TINY.output_dim


def test_model_that_never_appears_exits_non_zero_with_the_reason(tmp_path: Path, start_server: StartServer) -> None:
    server = start_server(
        WEIGHTCACHE_MODEL="s3://bucket/never/", WEIGHTCACHE_ROOT=str(tmp_path), WEIGHTCACHE_WAIT_TIMEOUT_SECONDS="1",
    )
    assert server.wait_exit() == 1
    stderr = server.stderr()
    assert "weightcache-server: fatal: WaitTimeout: model did not appear at" in stderr
    assert str(tmp_path / "models/s3/bucket/never") in stderr


def test_cuda_without_a_gpu_fails_at_once_not_when_the_model_arrives(
    tmp_path: Path, start_server: StartServer
) -> None:
    if torch_sees_a_gpu():
        return  # the premise needs a machine without a GPU (this suite's); on a GPU node cuda is simply used
    server = start_server(WEIGHTCACHE_MODEL="s3://bucket/never/", WEIGHTCACHE_ROOT=str(tmp_path),
                          WEIGHTCACHE_DEVICE="cuda", WEIGHTCACHE_WAIT_TIMEOUT_SECONDS="600")
    assert server.wait_exit(timeout=60) == 1
    assert "WEIGHTCACHE_DEVICE=cuda but torch sees no GPU" in server.stderr()


def torch_sees_a_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def test_shard_whose_size_disagrees_with_the_manifest_exits_non_zero(
    cache_root: CacheRoot, start_server: StartServer
) -> None:
    snapshot = cache_root.stage("bad")
    cache_root.publish("s3://bucket/bad/", "bad")
    with open(sorted(snapshot.glob("*.safetensors"))[1], "ab") as f:
        f.write(b"junk")
    server = start_server(WEIGHTCACHE_MODEL="s3://bucket/bad/", WEIGHTCACHE_ROOT=str(cache_root.root))
    assert server.wait_exit() == 1
    assert "fatal: CorruptModel:" in server.stderr()
    assert "the cache manifest says" in server.stderr()


def test_invalid_model_uri_exits_2_before_serving(start_server: StartServer) -> None:
    server = start_server(WEIGHTCACHE_MODEL="s3://bucket/../etc/")
    assert server.wait_exit() == 2
    assert "weightcache-server: error: WEIGHTCACHE_MODEL:" in server.stderr()


def test_sigterm_after_ready_exits_cleanly(tiny_model: Path, start_server: StartServer) -> None:
    server = start_server(WEIGHTCACHE_MODEL_PATH=str(tiny_model), WEIGHTCACHE_LOG_FORMAT="json")
    server.wait_ready()
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert '"msg": "ready: model loaded and warmed up"' in server.stderr()


def test_help_lists_every_setting_with_its_environment_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "--help"], check=False, cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    for env in ("WEIGHTCACHE_MODEL", "WEIGHTCACHE_ROOT", "WEIGHTCACHE_PORT", "WEIGHTCACHE_WAIT_TIMEOUT_SECONDS",
                "WEIGHTCACHE_FALLBACK", "WEIGHTCACHE_VERIFY", "WEIGHTCACHE_MAX_BODY_BYTES"):
        assert env in result.stdout
