"""Shared machinery of the hardening tests and of ``bench/soak.py``: the agent as a real subprocess, models in a real
S3 server, and checks that a cache root never shows a partial, mixed or escaped model.

The scenarios themselves live in :mod:`tests.hardening.scenarios` so that the fast CI tests and the long soak run
the very same code with different sizes. Nothing here replaces or patches a project function: the agent runs as
``python -m agent``, S3 is moto or ``rclone serve s3`` (optionally behind the fault proxy), Kubernetes is FakeKube.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
from prometheus_client.parser import text_string_to_metric_families

from agent.uris import parse_model_uri
from tests.fixtures.s3servers import S3Server, free_port

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
KiB = 1024


class ScenarioFailure(AssertionError):
    """A guarantee did not hold; the message says which and shows the evidence (an agent log tail, say)."""


def check(condition: object, message: str | Callable[[], str]) -> None:
    """``assert`` that survives ``python -O`` and works the same in pytest and in the soak script."""
    if not condition:
        raise ScenarioFailure(message() if callable(message) else message)


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str,
               log: Callable[[], str] | None = None, poll: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n--- agent log ---\n{log()[-6000:]}" if log is not None else ""
            raise ScenarioFailure(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(poll)


# ----- model content -----------------------------------------------------------------------------------------


def make_files(seed: int, sizes: Mapping[str, int]) -> dict[str, bytes]:
    """Deterministic pseudo-random contents (incompressible, so a mixed-up byte range is always detectable)."""
    rng = random.Random(seed)
    return {name: rng.randbytes(size) for name, size in sizes.items()}


def upload(server: S3Server, bucket: str, prefix: str, files: Mapping[str, bytes]) -> None:
    for rel, data in files.items():
        server.put(bucket, f"{prefix}{rel}", data)


def digests(files: Mapping[str, bytes]) -> dict[str, str]:
    return {k: xxhash.xxh3_128_hexdigest(v) for k, v in files.items()}


def tree_digests(path: Path) -> dict[str, str]:
    """xxh3 of every regular file under ``path`` (a published directory, followed through its symlink)."""
    out: dict[str, str] = {}
    base = Path(os.path.realpath(path))
    if base.is_file():
        return {base.name: xxhash.xxh3_128_hexdigest(base.read_bytes())}
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            p = Path(dirpath) / name
            out[p.relative_to(base).as_posix()] = xxhash.xxh3_128_hexdigest(p.read_bytes())
    return out


def mirrored(root: Path, uri: str) -> Path:
    return root / parse_model_uri(uri).mirrored_relpath


def visible_is_whole(root: Path, uri: str, *acceptable: Mapping[str, str]) -> bool:
    """True if nothing is visible at the URI's mirrored path, or what is there equals one acceptable whole tree.

    Raises :class:`ScenarioFailure` on a partial or mixed model: the one thing the cache must never show.
    """
    path = mirrored(root, uri)
    if not os.path.lexists(path):
        return False
    seen = tree_digests(path)
    check(any(seen == dict(a) for a in acceptable),
          lambda: f"{uri}: a partial or mixed model is visible at {path}: {sorted(seen)} "
                  f"(acceptable: {[sorted(a) for a in acceptable]})")
    return True


def staging_dirs(root: Path) -> list[str]:
    snaps = root / "snapshots"
    return sorted(str(p.relative_to(root)) for p in snaps.glob("*/*.incomplete")) if snaps.exists() else []


# ----- the agent as a subprocess ------------------------------------------------------------------------------


def agent_env(*, root: Path, s3: S3Server | None = None, endpoint_url: str | None = None,
              kubeconfig: Path | None = None, **settings: str) -> dict[str, str]:
    """Our environment minus WEIGHTCACHE_*/AWS_*/KUBE*, plus the S3 server's and fast test settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WEIGHTCACHE_", "AWS_", "KUBERNETES_", "KUBECONFIG"))}
    if s3 is not None:
        env.update(s3.env())
        if endpoint_url is not None:
            env["AWS_ENDPOINT_URL"] = endpoint_url
    env.update({
        "WEIGHTCACHE_ROOT": str(root),
        # Beside the root, never in it (pods mount the root), and one per agent: not the shared default.
        "WEIGHTCACHE_CONTROL_SOCKET": str(root.parent / f"{root.name}-run" / "agent.sock"),
        "WEIGHTCACHE_METRICS_HOST": "127.0.0.1",
        "WEIGHTCACHE_METRICS_PORT": str(free_port()),
        "WEIGHTCACHE_MIN_FREE_BYTES": "0",
        "WEIGHTCACHE_PART_SIZE": "1MiB",
        "WEIGHTCACHE_RETRY_BASE_DELAY": "0.01",
        "WEIGHTCACHE_RETRY_MAX_DELAY": "0.05",
        "WEIGHTCACHE_READ_TIMEOUT": "10",
        "WEIGHTCACHE_FILE_POLL_INTERVAL": "0.2",
        "WEIGHTCACHE_RECONNECT_MAX_DELAY": "1",
        "WEIGHTCACHE_SHUTDOWN_GRACE_SECONDS": "5",
        "WEIGHTCACHE_LOG_FORMAT": "text",
        "PYTHONUNBUFFERED": "1",
    })
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    env.update(settings)
    return env


def run_cli(*args: str, env: Mapping[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``python -m agent ARGS`` to completion, output captured."""
    return subprocess.run([sys.executable, "-m", "agent", *args], env=dict(env), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


def popen_cli(*args: str, env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "agent", *args], env=dict(env), cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)


@dataclass
class Agent:
    """A ``python -m agent run`` daemon; its log goes to a file, its read-only API listens on ``port``."""

    env: dict[str, str]
    log_path: Path
    args: tuple[str, ...] = ("run",)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return int(self.env["WEIGHTCACHE_METRICS_PORT"])

    @property
    def root(self) -> Path:
        return Path(self.env["WEIGHTCACHE_ROOT"])

    def start(self) -> Agent:
        self.proc = popen_cli(*self.args, env=self.env, log_path=self.log_path)
        return self

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def wait_ready(self, timeout: float = 40.0) -> Agent:
        def ready() -> bool:
            check(self.alive(), lambda: f"the agent exited early:\n{self.log()[-6000:]}")
            return self.get("/readyz")[0] == 200
        wait_until(ready, timeout=timeout, what="the agent's /readyz", log=self.log)
        return self

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body = self.get("/metrics")
        check(status == 200, f"/metrics answered {status}")
        out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    def metric_sum(self, name: str) -> float:
        return sum(v for (n, _labels), v in self.metrics().items() if n == name)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode
