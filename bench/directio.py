"""Page cache or ``O_DIRECT``: the daemon's fetch of a model, then the read a loader would do, both ways.

Not a test. ``WEIGHTCACHE_DIRECT_IO=true`` saves the fetch a copy per byte, but leaves the model on disk only; the
default leaves it in the page cache for the server that loads it next. This measures both halves on the same data:
one long-lived agent process per mode (``bench.datapath.DaemonPath``), alternating, each round after the same
settling write and page-cache drop as ``bench/datapath.py``; "read" is every file of the published model read once
(what an mmap load touches), from the moment the fetch returned.

The VM's free page reporting is held off while it runs (``bench.common.page_reporting_held``). With it left on
(``BENCH_KEEP_PAGE_REPORTING=1``), ``--pause`` waits that many seconds after the settle before fetching: memory freed
in the guest is handed back to the host about 2 s later, and a page-cache writer that starts after that pays a host
fault per page (``O_DIRECT`` does not).
Usage: ``python -m bench.directio [--rounds 8] [--shape issue] [--tls http] [--pause 0]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import drop_caches, machine_note, markdown_table, page_reporting_held, write_results
from bench.datapath import BUCKET, DaemonPath, make_shape, settle
from demo.s3server import EmbeddedS3

MODES = {"page cache (default)": "false", "O_DIRECT": "true"}


def read_model(root: Path) -> float:
    """Seconds to read every published file once (sequentially, 4 MiB at a time)."""
    t0 = time.perf_counter()
    buffer = bytearray(4 * 1024 * 1024)
    for path in sorted((root / "blobs").rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.directio", description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--shape", default="issue")
    parser.add_argument("--tls", choices=["http", "https"], default="http")
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    data_dir = Path(tempfile.mkdtemp(prefix="wc-directio-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    dest = Path(tempfile.mkdtemp(prefix="wc-directio-dest-", dir="/var/tmp"))
    samples: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in MODES}
    try:
        nbytes = make_shape(data_dir, args.shape, args.scale)
        with EmbeddedS3(data_dir=data_dir, tls=args.tls == "https") as s3:
            env = {**os.environ, **s3.env(), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
            uri = f"s3://{BUCKET}/{args.shape}/"
            agents = {mode: DaemonPath(uri, dest / f"agent{i}", {**env, "WEIGHTCACHE_DIRECT_IO": flag})
                      for i, (mode, flag) in enumerate(MODES.items())}
            try:
                names = list(MODES)
                for r in range(args.rounds + 1):  # round 0: warm-up (rclone hashes each object once), discarded
                    for i, mode in enumerate(names[r % 2:] + names[:r % 2]):
                        # The last fetch's files go before the settle, not inside the next timing (see datapath).
                        shutil.rmtree(dest / f"agent{names.index(mode)}", ignore_errors=True)
                        settle(dest / "settle", nbytes)
                        time.sleep(args.pause)
                        s = agents[mode].fetch()
                        read = read_model(dest / f"agent{names.index(mode)}")
                        if r:
                            samples[mode].append((s.wall, s.cpu, read))
                        print(f"  round {r} {mode}: fetch {s.wall:.2f} s (cpu {s.cpu:.2f}), read {read:.2f} s",
                              file=sys.stderr, flush=True)
            finally:
                for agent in agents.values():
                    agent.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
    rows, data = [], []
    for mode, ss in samples.items():
        fetch, cpu, read = (statistics.median(x[k] for x in ss) for k in range(3))
        total = statistics.median(x[0] + x[2] for x in ss)
        rows.append([mode, f"{fetch:.2f}", f"{cpu:.2f}", f"{read:.2f}", f"{total:.2f}"])
        data.append({"mode": mode, "fetch": fetch, "cpu": cpu, "read": read, "total": total, "samples": ss})
    command = (f"python -m bench.directio --rounds {args.rounds} --shape {args.shape} --tls {args.tls}"
               + (f" --pause {args.pause:g}" if args.pause else "") + (f" --scale {args.scale:g}" if args.scale != 1 else ""))
    md = (f"# Page cache or O_DIRECT: fetch, then read\n\n`{command}` — medians of {args.rounds} alternating rounds; "
          f"page cache {'dropped' if drop_caches() else 'NOT dropped (not root)'} after a settling write before "
          "each fetch; the daemon's fetch path (one `ensure()` in a running agent), then every published file read "
          "once.\n\n"
          + markdown_table(["writes", "fetch (s)", "fetch CPU (s)", "read after (s)", "fetch + read (s)"], rows)
          + f"\n\n{machine_note()}\n")
    print(md)
    write_results("directio" + ("-pause" if args.pause else ""), markdown=md, data=data)
    return 0


if __name__ == "__main__":
    with page_reporting_held():  # see bench/common.py: measure the tools, not this VM's memory hand-back
        sys.exit(main())
