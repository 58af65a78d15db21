"""Real processes for the monitoring test: Prometheus, the agent and the inference server, on loopback.

Each runs in its own session (process group) with its output in a log file, and is stopped with its whole
group when the test ends. Nothing here listens on anything but 127.0.0.1, and nothing outlives its test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ProcessFailedError(RuntimeError):
    """A process under test exited or never became ready; the message carries its log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Running:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    def log_tail(self, limit: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-limit:] if self.log.exists() else ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ProcessFailedError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@contextmanager
def spawn(name: str, argv: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> Iterator[Running]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    running = Running(name, proc, log)
    try:
        yield running
    finally:
        running.stop()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post_json(url: str, body: Any, timeout: float = 30.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what: str, check: Callable[[], T | None], *, timeout: float, watch: list[Running],
             interval: float = 0.25) -> T:
    """Poll `check` until it returns something truthy; fail early if a watched process dies."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for running in watch:
            running.check_alive()
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError) as e:  # not listening yet, or half-written JSON
            last_error = e
        time.sleep(interval)
    logs = "\n".join(f"--- {r.name} ---\n{r.log_tail()}" for r in watch)
    raise ProcessFailedError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})\n{logs}")


def http_ok(url: str) -> bool:
    try:
        return http_get(url, timeout=2)[0] == 200
    except OSError:
        return False


class PrometheusAPI:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def query(self, expr: str) -> dict[str, Any]:
        """The raw API answer for an instant query: {"status": ..., "data" or "error": ...}."""
        status, body = http_get(f"{self.base_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        answer: dict[str, Any] = json.loads(body)
        answer["http_status"] = status
        return answer

    def get(self, path: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(http_get(f"{self.base_url}{path}")[1])
        return loaded
