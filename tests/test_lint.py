"""The code stays as the house writes it: ruff clean everywhere, mypy strict on agent/ and common/.

Part of the test suite so CI holds the line, not only a developer who remembers to run ``make lint``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


def test_ruff_finds_nothing() -> None:
    r = _run(str(BIN / "ruff"), "check", "agent", "server", "common", "demo", "bench", "tests")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_passes_on_the_agent_and_common() -> None:
    r = _run(sys.executable, "-m", "mypy", "agent", "common")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_layers_hold() -> None:
    """The import-linter contracts in pyproject.toml: the cache never imports S3 or Kubernetes code, transfer never
    imports Kubernetes, the agent never imports torch or the server, the server reads only the cache layout."""
    r = _run(str(BIN / "lint-imports"))
    assert r.returncode == 0, r.stdout + r.stderr
