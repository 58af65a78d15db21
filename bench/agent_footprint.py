"""How big is the agent once installed? A proxy for the agent image's size, measured without Docker.

Creates a fresh virtual environment, installs the project with no extras (`pip install .`: exactly what
Dockerfile.agent installs on top of python:3.11-slim-bookworm), and measures the environment: its total size,
what the installed packages add over a bare venv, the largest of them, and whether torch slipped in. Writes a
Markdown table to bench/results/agent_footprint.md.

    .venv/bin/python bench/agent_footprint.py            # target: packages under 150 MB

It never touches the project's own .venv, and it deletes its temporary environment when done.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results" / "agent_footprint.md"
TARGET_MB = 150.0
MB = 1_000_000


class FootprintError(RuntimeError):
    """The measurement could not be made (venv creation or the install failed)."""


def tree_size(path: Path) -> int:
    """Bytes of regular files under `path`, each hard-linked inode counted once (as `du` does)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in path.rglob("*"):
        if p.is_symlink() or not p.is_file():
            continue
        st = p.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def site_packages(venv: Path) -> Path:
    found = list(venv.glob("lib/python3*/site-packages"))
    if len(found) != 1:
        raise FootprintError(f"expected one site-packages under {venv}, found {found}")
    return found[0]


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
    if result.returncode != 0:
        raise FootprintError(f"{' '.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def package_sizes(site: Path) -> list[tuple[str, int]]:
    """(top-level entry, bytes) for each package directory or module in site-packages, largest first."""
    sizes: dict[str, int] = {}
    for entry in site.iterdir():
        if entry.name.endswith((".dist-info", ".pth")) or entry.name == "__pycache__":
            continue
        name = entry.name.removesuffix(".py")
        sizes[name] = sizes.get(name, 0) + (tree_size(entry) if entry.is_dir() else entry.stat().st_size)
    return sorted(sizes.items(), key=lambda kv: kv[1], reverse=True)


@dataclass(frozen=True)
class Footprint:
    venv_bytes: int
    added_bytes: int  # site-packages of the agent venv minus that of a bare venv
    packages: list[tuple[str, int]]  # what the install added, largest first
    distributions: list[str]
    torch: bool
    install_seconds: float

    @property
    def within_target(self) -> bool:
        return self.added_bytes / MB < TARGET_MB and not self.torch


def measure(python: str) -> Footprint:
    with tempfile.TemporaryDirectory(prefix="weightcache-footprint-") as tmp:
        bare = Path(tmp) / "bare"
        venv = Path(tmp) / "agent"
        _run([python, "-m", "venv", str(bare)])
        _run([python, "-m", "venv", str(venv)])
        started = time.monotonic()
        # Not editable: an editable install would measure a link to this checkout, not the code.
        _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile",
              "--disable-pip-version-check", str(REPO_ROOT)])
        install_seconds = time.monotonic() - started
        site, bare_site = site_packages(venv), site_packages(bare)
        freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all"],
                                capture_output=True, text=True, check=True).stdout.splitlines()
        # pip and setuptools come with every venv (and are in the bare one): list only what the install added.
        in_bare = {name for name, _ in package_sizes(bare_site)}
        return Footprint(
            venv_bytes=tree_size(venv),
            added_bytes=tree_size(site) - tree_size(bare_site),
            packages=[(name, size) for name, size in package_sizes(site) if name not in in_bare],
            distributions=[d.split(" @ ")[0] for d in freeze
                           if d.strip() and not d.startswith(("pip==", "setuptools==", "wheel=="))],
            torch=any(d.lower().startswith("torch") for d in freeze),
            install_seconds=install_seconds,
        )


def report(m: Footprint, python: str) -> str:
    verdict = "within" if m.within_target else "OVER"
    lines = [
        "# Agent install footprint",
        "",
        (f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M UTC} by `bench/agent_footprint.py` with {python} "
         f"({sys.version.split()[0]}): a fresh venv, `pip install .` (no extras), as Dockerfile.agent does."),
        "The agent image is python:3.11-slim-bookworm plus this venv, so the venv is what the project adds.",
        "",
        "| measure | value |",
        "| --- | --- |",
        (f"| packages added over a bare venv | **{m.added_bytes / MB:.1f} MB** ({verdict} the "
         f"{TARGET_MB:.0f} MB target) |"),
        f"| whole venv (incl. pip, setuptools) | {m.venv_bytes / MB:.1f} MB |",
        f"| torch installed | {'YES (a bug)' if m.torch else 'no'} |",
        f"| distributions | {len(m.distributions)} |",
        f"| install time | {m.install_seconds:.0f} s |",
        "",
        "Largest packages the install added:",
        "",
        "| package | MB |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {size / MB:.1f} |" for name, size in m.packages[:12]]
    lines += ["", "Installed distributions: " + ", ".join(f"`{d}`" for d in m.distributions), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter to build the venv with")
    parser.add_argument("--output", type=Path, default=RESULTS, help="Markdown file to write")
    args = parser.parse_args(argv)
    m = measure(args.python)
    text = report(m, Path(args.python).name)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0 if m.within_target else 1


if __name__ == "__main__":
    sys.exit(main())
