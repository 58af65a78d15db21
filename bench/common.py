"""Shared benchmark plumbing: cold page cache, timing child processes (wall time and peak RSS), tables, plots."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
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
    held = "; the VM's free page reporting held off while measuring (bench/common.py)" if _reporting_held else ""
    return (f"{os.cpu_count()} CPU cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB "
            f"RAM; page cache dropped before every run; S3 server data on tmpfs{held}")


#: Free page reporting (virtio-balloon): the guest tells its host which free pages it may take back.
PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
_reporting_held = False


@contextlib.contextmanager
def page_reporting_held(setting: Path = PAGE_REPORTING_ORDER) -> Iterator[bool]:
    """Keep this VM from handing freed memory back to its host while a benchmark runs (restored afterwards).

    On a VM with free page reporting, memory the guest frees (a deleted download, a dropped page cache) is given
    back to the host a moment later, and whoever fills it next pays a host page fault per 4 KiB page: a page-cache
    writer then spends most of its system time there (``perf``: ``copy_folio_from_iter_atomic``), by an amount that
    depends on what ran before it and when — measured here, one S3 stack went from 4.22 s to 1.82 s for the same
    2 GiB with reporting held off. Nodes on bare metal or EC2 have no such cost, so benchmarks hold it off and
    measure the tools. Reporting only covers free blocks of at least 2^order pages; an order above the largest
    (10) reports nothing. Needs root; ``BENCH_KEEP_PAGE_REPORTING=1`` leaves it alone. Yields whether it is held.
    """
    global _reporting_held
    if os.environ.get("BENCH_KEEP_PAGE_REPORTING") == "1" or _reporting_held:
        yield _reporting_held
        return
    try:
        original = setting.read_text().strip()
        setting.write_text("11\n")
    except OSError:
        yield False
        return
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _exit_on_signal) if main else None
    _reporting_held = True
    try:
        yield True
    finally:
        _reporting_held = False
        with contextlib.suppress(OSError):
            setting.write_text(original + "\n")
        if main:
            signal.signal(signal.SIGTERM, old_term)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through page_reporting_held, which restores the setting


def rss_self_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
