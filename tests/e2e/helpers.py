"""Real processes for the end-to-end tests: start them, wait on them with bounded timeouts, read their HTTP
surfaces, stop them the way the kubelet does (SIGTERM to the main process), and prove that none is left.

Every child gets a unique marker in its environment. Environments are inherited, so anything a child starts (the
server's helpers, the demo's rclone) carries the marker too, and a scan of ``/proc/*/environ`` finds every process
a test caused, even one re-parented to init after its parent died. That scan is how tests show that nothing is left
running; it needs no psutil.

This module must never send a signal to a process it did not start, never wait without a bound, and never let a
developer's AWS, Kubernetes or weightcache settings leak into a child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
MARKER_ENV = "WEIGHTCACHE_E2E_MARKER"
ANNOTATION = "weightcache.io/models"
GATE = "weightcache.io/weights-ready"

# Bounds sized for a small shared 2-core machine: a process start (torch import) takes 2–5 s there, a fetch of a
# few MiB well under a second. Nothing waits longer than this, and a failure names what it was waiting for.
START_TIMEOUT = 45.0
CONVERGE_TIMEOUT = 30.0
# "Exits within a few seconds of SIGTERM": the agent's grace is 25 s, but with nothing in flight it should take ~1 s.
STOP_TIMEOUT = 10.0

T = TypeVar("T")


class E2EFailure(AssertionError):
    """A wait timed out or a process died early; the message carries the logs of every process of the test."""


@dataclass(frozen=True)
class DemoModel:
    """A demo model (``server.demo_model``) stored in S3 under ``uri``, and the shape the server will serve."""

    uri: str
    input_dim: int
    output_dim: int
    files: int
    total_bytes: int


# ----- processes ----------------------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Children:
    """The processes of one test. ``stop()`` is the test's own SIGTERM; ``kill_all()`` is the teardown net."""

    workdir: Path
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    children: list[Child] = field(default_factory=list)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Our environment without anything that could point a child at real infrastructure, plus the marker."""
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "WEIGHTCACHE_", "RCLONE_")) and k not in ("KUBECONFIG", "NODE_NAME")}
        return {**base, "PYTHONUNBUFFERED": "1", MARKER_ENV: self.marker, **(extra or {})}

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(list(argv), cwd=REPO, env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    def stop(self, *, timeout: float = STOP_TIMEOUT) -> dict[str, int | None]:
        """SIGTERM each running child's main process (as the kubelet does) and wait, all together, up to
        ``timeout``. Returns each child's exit code; None for one still running then (it is then killed)."""
        for c in self.children:
            if c.running():
                c.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(c.running() for c in self.children) and time.monotonic() < deadline:
            time.sleep(0.05)
        codes: dict[str, int | None] = {c.name: c.popen.poll() for c in self.children}
        self.kill_all()
        return codes

    def kill_all(self) -> None:
        """SIGKILL whatever of ours still runs: each child's process group, then any stray with our marker."""
        for c in self.children:
            if c.running():
                try:
                    os.killpg(c.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    c.popen.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        for pid in marked_processes(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftovers(self, *, settle: float = 3.0) -> list[str]:
        """Processes still carrying our marker, as ``pid cmdline``; waits up to ``settle`` for exiting ones."""
        deadline = time.monotonic() + settle
        while True:
            found = marked_processes(self.marker)
            if not found or time.monotonic() > deadline:
                return [f"{pid} {cmdline(pid)}" for pid in found]
            time.sleep(0.1)

    def logs(self, *, tail: int = 40) -> str:
        parts = []
        for c in self.children:
            lines = c.log_text().splitlines()[-tail:]
            state = "running" if c.running() else f"exited {c.popen.returncode}"
            parts.append(f"--- {c.name} ({state}), last {len(lines)} lines of {c.log} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def check_alive(self, what: str) -> None:
        for c in self.children:
            if not c.running():
                raise E2EFailure(f"{c.name} exited with {c.popen.returncode} while waiting for {what}\n"
                                 f"{self.logs()}")


def marked_processes(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds ``MARKER_ENV=marker`` (zombies have none: not listed)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def wait_until(predicate: Callable[[], T], *, timeout: float = CONVERGE_TIMEOUT, what: str,
               children: Children | None = None, poll: float = 0.05) -> T:
    """Poll until ``predicate()`` is truthy and return its value. Fail fast if a process of the test died."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if children is not None:
            children.check_alive(what)
        if time.monotonic() > deadline:
            logs = f"\n{children.logs()}" if children is not None else ""
            raise E2EFailure(f"timed out after {timeout:.0f}s waiting for {what}{logs}")
        time.sleep(poll)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# ----- HTTP -----------------------------------------------------------------------------------------------------


def http(url: str, body: Any = None, *, timeout: float = 5.0) -> tuple[int, Any]:
    """(status, JSON body or text); (0, error text) when nothing answers."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except OSError as e:
        return 0, str(e)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def status_of(url: str) -> int:
    return http(url, timeout=2.0)[0]


def metric(base_url: str, name: str, **labels: str) -> float:
    """One sample from a ``/metrics`` page (0.0 when absent: a labelled counter appears on first increment)."""
    status, text = http(f"{base_url}/metrics")
    if status != 200:
        raise E2EFailure(f"GET {base_url}/metrics answered {status}: {str(text)[:300]}")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def hits_and_misses(agent_url: str) -> tuple[int, int]:
    name = "weightcache_cache_requests_total"
    return int(metric(agent_url, name, result="hit")), int(metric(agent_url, name, result="miss"))


def model_state(agent_url: str, uri: str) -> str | None:
    status, body = http(f"{agent_url}/v1/models")
    if status != 200 or not isinstance(body, dict):
        return None
    for m in body.get("models", []):
        if m.get("uri") == uri:
            return str(m.get("state"))
    return None


# ----- the agent and the server ---------------------------------------------------------------------------------


def agent_argv(*, cache_dir: Path, port: int, pods_file: Path | None = None, extra: Sequence[str] = ()) -> list[str]:
    argv = python_module("agent", "run", "--cache-dir", str(cache_dir), "--metrics-host", "127.0.0.1",
                         "--metrics-port", str(port), "--log-format", "json", "--file-poll-interval", "0.2",
                         # The cache is a tmp dir on a shared disk: keep the free-space floor out of the way.
                         "--min-free-bytes", "0", *extra)
    if pods_file is not None:
        argv += ["--pods-file", str(pods_file)]
    return argv


def server_env(children: Children, *, cache_dir: Path, uri: str, port: int) -> dict[str, str]:
    return children.env({
        "WEIGHTCACHE_ROOT": str(cache_dir), "WEIGHTCACHE_MODEL": uri, "WEIGHTCACHE_PORT": str(port),
        "WEIGHTCACHE_HOST": "127.0.0.1", "WEIGHTCACHE_DEVICE": "cpu",
        # Long enough for a slow fetch on a busy machine, short enough that a broken agent fails the test.
        "WEIGHTCACHE_WAIT_TIMEOUT_SECONDS": "60", "WEIGHTCACHE_POLL_INTERVAL_SECONDS": "0.2",
    })


def event_lines(agent_log: str) -> list[dict[str, Any]]:
    """The agent's Event log records (``--log-format json``, logger ``agent.events``) in order."""
    out = []
    for line in agent_log.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("logger") == "agent.events" and "event" in rec:
            out.append(rec)
    return out


def pod_manifest(name: str, *, namespace: str, node: str, uri: str) -> dict[str, Any]:
    """A pod as a Deployment would create it: the annotation, scheduled to ``node``, with the readiness gate."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": {ANNOTATION: uri}},
        "spec": {"nodeName": node, "readinessGates": [{"conditionType": GATE}],
                 "containers": [{"name": "server", "image": "weightcache-server:dev"}]},
    }


def write_atomically(path: Path, text: str) -> None:
    """Replace a file in one step, so a reader polling it never sees half a YAML document."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)
