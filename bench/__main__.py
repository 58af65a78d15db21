"""``make bench``: every benchmark, one after another, writing bench/results/ (markdown, JSON, PNG).

Needs root for dropping the page cache (cold-cache numbers); says so in each table if it could not.
``--quick`` runs smaller sizes and one round (a smoke test of the benchmarks themselves, not numbers to quote).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["datapath", "directio", "fetch", "coldstart", "scaleup", "footprint",
                                           "soak", "s3stacks"],
                        action="append")
    args = parser.parse_args(argv)
    q = args.quick
    plan = {
        "datapath": [sys.executable, "-m", "bench.datapath", "--shape", "issue", "--shape", "mid", "--shape", "small",
                     *(["--scale", "0.125", "--runs", "1"] if q else ["--runs", "3"])],
        "directio": [sys.executable, "-m", "bench.directio", *(["--scale", "0.125", "--rounds", "1"] if q else [])],
        "fetch": [sys.executable, "-m", "bench.fetch", "--size", "256MiB" if q else "2GiB", "--runs", "1" if q else "3"],
        "coldstart": [sys.executable, "bench/coldstart.py", "--size", "256MiB" if q else "2GiB",
                      "--runs", "1" if q else "3"],
        "scaleup": [sys.executable, "-m", "bench.scaleup", "--size", "128MiB" if q else "256MiB"],
        "footprint": [sys.executable, "bench/agent_footprint.py"],
        "soak": [sys.executable, "-m", "bench.soak", *(["--quick"] if q else [])],
        "s3stacks": [sys.executable, "-m", "bench.s3stacks",
                     *(["--large-size", "256MiB", "--runs", "1"] if q else ["--runs", "5"])],
    }
    failed = []
    for name, cmd in plan.items():
        if args.only and name not in args.only:
            continue
        print(f"\n=== bench {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.monotonic()
        rc = subprocess.call(cmd, cwd=REPO)
        print(f"=== bench {name}: exit {rc} in {time.monotonic() - t:.0f}s", flush=True)
        if rc:
            failed.append(name)
    print(f"\nresults in {REPO / 'bench' / 'results'}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
