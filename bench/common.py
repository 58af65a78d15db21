"""Shared benchmark plumbing: cold page cache, timing child processes (wall time and peak RSS), tables, plots."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def drop_caches() -> bool:
    """Empty the page cache (root only): every run then reads from where the data really lives."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Timed:
    seconds: float
    max_rss_mb: float
    returncode: int
    output: str


def run_timed(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 900) -> Timed:
    """Run a command, return wall time and its peak RSS (via wait4's rusage: this child only).

    Output goes to an unlinked temporary file, not a pipe: this loop waits with ``wait4`` and reads nothing until
    the child exits, so a child printing more than a pipe holds (64 KiB: ``s5cmd cp`` prints a line per object,
    2,000 objects fill it) would block in ``write`` forever.
    """
    with tempfile.TemporaryFile() as out:
        t = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        elapsed = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    return Timed(elapsed, usage.ru_maxrss / 1024, proc.returncode, text)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def write_results(name: str, *, markdown: str, data: object) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    path = RESULTS / f"{name}.md"
    path.write_text(markdown)
    return path


def bar_plot(name: str, labels: Sequence[str], values: Sequence[float], *, title: str, ylabel: str,
             highlight: str | None = None) -> Path | None:
    """A PNG bar chart in bench/results (skipped quietly if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    colors = ["#2a7de1" if lab == highlight else "#9aa5b1" for lab in labels]
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def machine_note() -> str:
    return (f"{os.cpu_count()} CPU cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB "
            f"RAM; page cache dropped before every run; S3 server data on tmpfs")


def rss_self_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
