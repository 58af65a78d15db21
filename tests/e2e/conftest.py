"""Fixtures of the end-to-end tests: a small sharded demo model in a real S3 server (rclone on loopback).

The model is small (~4 MiB, in 2 MiB shards plus an index) so a fetch takes well under a second, yet it is a real
multi-file safetensors model that the built-in demo handler loads and serves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from tests.e2e.helpers import DemoModel
from tests.fixtures.s3servers import S3Server

MODEL_SIZE = "4MiB"
SHARD_SIZE = "2MiB"


@pytest.fixture(scope="session")
def demo_model(rclone_s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    """The demo model under ``s3://<fresh bucket>/demo-llm/`` on the session's rclone server."""
    local = tmp_path_factory.mktemp("e2e-model") / "demo-llm"
    subprocess.run([sys.executable, "-m", "server.demo_model", "--size", MODEL_SIZE, "--shard-size", SHARD_SIZE,
                    str(local)], check=True, stdout=subprocess.DEVNULL, timeout=60)
    bucket = f"wc-e2e-{uuid.uuid4().hex[:12]}"
    rclone_s3.create_bucket(bucket)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        rclone_s3.put_file(bucket, f"demo-llm/{f.relative_to(local).as_posix()}", f)
    config = json.loads((local / "config.json").read_text())
    return DemoModel(uri=f"s3://{bucket}/demo-llm/", input_dim=int(config["input_dim"]),
                     output_dim=int(config["output_dim"]), files=len(files),
                     total_bytes=sum(f.stat().st_size for f in files))
