"""Helpers and fixtures for the daemon's tests: a fake API server with this test's node, a fresh bucket on the
session's moto server, the agent run as a real ``python -m agent run`` subprocess, Prometheus text read back
into numbers, and a Reporter that records what the reconciler tells the world.

Test modules import the fixtures they use by name (pytest collects fixtures from a module's namespace); nothing
here replaces or patches a project function, and every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.cluster.pods import PodInfo
from tests.fixtures.fakekube import FakeKube
from tests.fixtures.s3servers import S3Server, free_port

REPO = Path(__file__).resolve().parents[2]
NODE = "node-a"
GATE = "weightcache.io/weights-ready"
ANNOTATION = "weightcache.io/models"
STARTUP_TAINT = {"key": "weightcache.io/warming", "effect": "NoSchedule"}
#: Generous bounds: this machine is small and shared, and a miss is never a reason to wait long.
STARTUP_TIMEOUT = 30.0
CONVERGE_TIMEOUT = 20.0


# ----- waiting ---------------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], *, timeout: float = CONVERGE_TIMEOUT, what: str,
               agent: AgentProcess | None = None, poll: float = 0.02) -> Any:
    """Poll until ``predicate()`` is truthy and return it; fail with ``what`` (and the agent's log) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if agent is not None and agent.proc is not None and agent.proc.poll() is not None:
            pytest.fail(f"the agent exited ({agent.proc.returncode}) while waiting for {what}\n{agent.log_tail()}")
        if time.monotonic() > deadline:
            tail = f"\n--- agent log ---\n{agent.log_tail()}" if agent is not None else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(poll)


# ----- Kubernetes objects -------------------------------------------------------------------------------------


def pod_manifest(name: str, models: str | None, *, namespace: str = "default", node: str = NODE,
                 gate: bool = False) -> dict[str, Any]:
    """A scheduled pod on ``node`` asking for ``models`` (the annotation's raw value; None: no annotation)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if models is not None:
        meta["annotations"] = {ANNOTATION: models}
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "main", "image": "example/infer:1"}]}
    if gate:
        spec["readinessGates"] = [{"conditionType": GATE}]
    return {"metadata": meta, "spec": spec, "status": {"phase": "Running"}}


def events_for(kube: FakeKube, name: str, reason: str | None = None) -> list[dict[str, Any]]:
    return [e for e in kube.events(involved_name=name) if reason is None or e.get("reason") == reason]


def gate_condition(kube: FakeKube, name: str, namespace: str = "default") -> dict[str, Any] | None:
    for c in (kube.get_pod(namespace, name).get("status") or {}).get("conditions") or []:
        if c.get("type") == GATE:
            return dict(c)
    return None


@pytest.fixture
def kube(request: pytest.FixtureRequest) -> Iterator[FakeKube]:
    """A fake API server with one Ready node, ``node-a`` (the agent's NODE_NAME).

    Indirect parametrization sets the bookmark interval (seconds; default 1).
    """
    server = FakeKube(bookmark_interval=float(getattr(request, "param", 1.0))).start()
    server.add_node(NODE)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def models_bucket(moto_s3: S3Server) -> str:
    """A fresh bucket on the session's moto server (its name is part of every URI a test uses)."""
    name = f"wc-{uuid.uuid4().hex[:12]}"
    moto_s3.create_bucket(name)
    return name


@pytest.fixture
def s3_environment(moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point this process's standard AWS environment at moto, for in-process S3 clients (undone after)."""
    for key, value in moto_s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_s3


# ----- the agent as a subprocess -------------------------------------------------------------------------------


def control_socket_for(root: Path) -> Path:
    """A test agent's control socket: outside its cache root, unique to it, and short enough for AF_UNIX."""
    return root.parent / f"{root.name}-run" / "agent.sock"


def agent_environment(*, s3: S3Server | None, root: Path, kubeconfig: Path | None = None,
                      endpoint_url: str | None = None, **extra: str) -> dict[str, str]:
    """Our environment minus any WEIGHTCACHE_*/AWS_*/KUBE* variables, plus a test agent's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WEIGHTCACHE_", "AWS_", "KUBERNETES_", "KUBECONFIG"))}
    if s3 is not None:
        env.update(s3.env())
        if endpoint_url is not None:
            env["AWS_ENDPOINT_URL"] = endpoint_url
    env.update({
        "NODE_NAME": NODE,
        "WEIGHTCACHE_ROOT": str(root),
        # Beside the root, never in it (pods mount the root), and one per test: not the shared default.
        "WEIGHTCACHE_CONTROL_SOCKET": str(control_socket_for(root)),
        "WEIGHTCACHE_METRICS_HOST": "127.0.0.1",
        "WEIGHTCACHE_METRICS_PORT": str(free_port()),
        "WEIGHTCACHE_FILE_POLL_INTERVAL": "0.2",
        "WEIGHTCACHE_RECONNECT_MAX_DELAY": "1",
        "WEIGHTCACHE_MIN_FREE_BYTES": "0",
        "WEIGHTCACHE_PART_SIZE": "1MiB",
        "WEIGHTCACHE_RETRY_BASE_DELAY": "0.01",
        "WEIGHTCACHE_RETRY_MAX_DELAY": "0.05",
        "WEIGHTCACHE_SHUTDOWN_GRACE_SECONDS": "5",
        "WEIGHTCACHE_LOG_FORMAT": "text",
        "PYTHONUNBUFFERED": "1",
    })
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    env.update(extra)
    return env


@dataclass
class AgentProcess:
    """One ``python -m agent ARGS`` process, its log in a file, its read-only HTTP API on ``port``."""

    env: dict[str, str]
    log_path: Path
    args: tuple[str, ...] = ("run",)
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.env["WEIGHTCACHE_METRICS_PORT"])

    @property
    def root(self) -> Path:
        return Path(self.env["WEIGHTCACHE_ROOT"])

    def start(self) -> AgentProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", *self.args], env=self.env, cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, limit: int = 6000) -> str:
        return self.log_text()[-limit:]

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> AgentProcess:
        wait_until(lambda: self.get("/readyz")[0] == 200, timeout=timeout, what="the agent's /readyz", agent=self)
        return self

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body = self.get("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return parse_metrics(body.decode())

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def terminate(self, *, timeout: float = 15.0) -> int:
        """SIGTERM and wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Collects every agent a test starts, so none outlives it (killed if still running)."""
    started: list[AgentProcess] = []
    try:
        yield started
    finally:
        for a in started:
            a.stop()


def start_agent(agents: list[AgentProcess], env: Mapping[str, str], log_path: Path, *,
                args: tuple[str, ...] = ("run",), ready: bool = True) -> AgentProcess:
    agent = AgentProcess(env=dict(env), log_path=log_path, args=args).start()
    agents.append(agent)
    return agent.wait_ready() if ready else agent


def run_cli(*args: str, env: Mapping[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a one-shot ``python -m agent ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "agent", *args], env=dict(env), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


def entries_outside(base: Path, allowed: set[str]) -> list[str]:
    """Names directly under ``base`` that are not in ``allowed`` (something written outside the cache root)."""
    return sorted(p.name for p in base.iterdir() if p.name not in allowed)


def escaping_links(root: Path) -> list[str]:
    """Symlinks under ``root`` that resolve outside it."""
    real_root = Path(os.path.realpath(root))
    bad = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            if p.is_symlink() and not Path(os.path.realpath(p)).is_relative_to(real_root):
                bad.append(str(p))
    return bad


# ----- in-process: a Reporter that records --------------------------------------------------------------------


@dataclass
class RecordedEvent:
    pod: str
    type: str
    reason: str
    message: str


@dataclass
class RecordingReporter:
    """Implements :class:`agent.cluster.reporting.Reporter` by remembering every call, for in-process tests."""

    events: list[RecordedEvent] = field(default_factory=list)
    conditions: dict[str, list[tuple[bool, str, str]]] = field(default_factory=dict)
    node_events: list[RecordedEvent] = field(default_factory=list)
    ready_models: list[list[str]] = field(default_factory=list)
    taint_removals: int = 0

    async def pod_event(self, pod: PodInfo, *, type: str, reason: str, message: str) -> None:
        self.events.append(RecordedEvent(pod.key, type, reason, message))

    async def pod_condition(self, pod: PodInfo, *, ready: bool, reason: str, message: str) -> None:
        self.conditions.setdefault(pod.key, []).append((ready, reason, message))

    async def node_event(self, *, type: str, reason: str, message: str) -> None:
        self.node_events.append(RecordedEvent("node", type, reason, message))

    async def node_models(self, ready_uris: list[str]) -> None:
        self.ready_models.append(list(ready_uris))

    async def remove_startup_taint(self) -> bool:
        self.taint_removals += 1
        return True

    def for_pod(self, key: str, reason: str | None = None) -> list[RecordedEvent]:
        return [e for e in self.events if e.pod == key and (reason is None or e.reason == reason)]
