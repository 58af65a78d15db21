"""Fetch benchmark: S3 → local disk for a model, weightcache against the tools people use instead.

Not a test. One ``rclone serve s3`` on loopback with its data on tmpfs; a model of ``--size`` made of a few large
shards plus many small files. For each of ``--runs`` rounds, each tool downloads the whole prefix into a fresh
directory on the local disk, with the page cache dropped first. Measured: wall time (process start → exit), so
throughput includes listing, startup and — for weightcache — xxh3-128 verification, fsync and atomic publish.

Peers: ``s5cmd cp`` (Go, parallel), ``aws s3 cp --recursive`` (awscli, in its own venv under bench/.peers since it
pins botocore), ``boto3 download_file`` per object (s3transfer's defaults), ``rclone copy``.

Writes ``bench/results/fetch.md``, ``fetch.json`` and ``fetch.png``. Usage: ``python -m bench.fetch --size 2GiB``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    bar_plot,
    drop_caches,
    machine_note,
    markdown_table,
    median,
    page_reporting_held,
    run_timed,
    write_results,
)
from common.units import parse_size
from demo.s3server import EmbeddedS3

REPO = Path(__file__).resolve().parent.parent
PEERS_VENV = REPO / "bench" / ".peers"
BUCKET, PREFIX = "bench", "model/"
OURS, OURS_NO_FSYNC = "weightcache prefetch", "weightcache prefetch --fsync false"
#: "fetched 1.00 GiB in 2.33s": the agent's own time from listing to publish, without interpreter start-up.
FETCHED_RE = re.compile(r"fetched [0-9.]+ \w+ in ([0-9.]+)s")


def make_model(root: Path, size: int, *, small_files: int = 200) -> int:
    """A few large shards (≈ 94 % of bytes) plus many small files (configs, tokenizer pieces)."""
    d = root / BUCKET / PREFIX.rstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    small_total = min(size // 16, small_files * 256 * 1024)
    per_small = max(small_total // small_files, 1)
    large_total = size - per_small * small_files
    shards = 4
    chunk = os.urandom(16 * 2**20)
    for i in range(shards):
        n = large_total // shards + (large_total % shards if i == shards - 1 else 0)
        with open(d / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            while n > 0:
                f.write(chunk[: min(n, len(chunk))])
                n -= len(chunk)
            f.flush()
    for i in range(small_files):
        sub = d / "extras" / f"group{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"piece-{i:04d}.json").write_bytes(os.urandom(per_small))
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def ensure_awscli() -> str | None:
    aws = PEERS_VENV / "bin" / "aws"
    if aws.exists():
        return str(aws)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        subprocess.run([str(PEERS_VENV / "bin" / "pip"), "install", "-q", "awscli"], check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"awscli unavailable ({e}); skipping it", file=sys.stderr)
        return None
    return str(aws)


BOTO3_SCRIPT = """
import sys, os, boto3
from botocore.config import Config
c = boto3.client("s3", config=Config(s3={"addressing_style": "path"}, response_checksum_validation="when_required"))
dest = sys.argv[3]
pages = c.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[1], Prefix=sys.argv[2])
for page in pages:
    for o in page.get("Contents", []):
        path = os.path.join(dest, o["Key"][len(sys.argv[2]):])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        c.download_file(sys.argv[1], o["Key"], path)
"""


def commands(s3: EmbeddedS3, dest: Path, *, aws: str | None) -> dict[str, list[str]]:
    env_ep = s3.endpoint_url
    bin_dir = Path(sys.executable).parent
    s5cmd = str(bin_dir / "s5cmd") if (bin_dir / "s5cmd").exists() else shutil.which("s5cmd") or "s5cmd"
    rclone = str(bin_dir / "rclone") if (bin_dir / "rclone").exists() else "rclone"
    env = s3.env()
    remote = (f":s3,provider=Other,endpoint='{env_ep}',access_key_id={env['AWS_ACCESS_KEY_ID']},"
              f"secret_access_key={env['AWS_SECRET_ACCESS_KEY']},force_path_style=true:")
    cmds = {
        OURS: [sys.executable, "-m", "agent", "prefetch", f"s3://{BUCKET}/{PREFIX}",
               "--cache-dir", str(dest), "--log-format", "text", "--min-free-bytes", "0"],
        OURS_NO_FSYNC: [sys.executable, "-m", "agent", "prefetch", f"s3://{BUCKET}/{PREFIX}",
                        "--cache-dir", str(dest), "--log-format", "text", "--min-free-bytes", "0",
                        "--fsync", "false"],
        "s5cmd cp": [s5cmd, "--endpoint-url", env_ep, "cp", f"s3://{BUCKET}/{PREFIX}*", f"{dest}/"],
        "boto3 download_file": [sys.executable, "-c", BOTO3_SCRIPT, BUCKET, PREFIX, str(dest)],
        "rclone copy": [rclone, "copy", "--config", "/dev/null", f"{remote}{BUCKET}/{PREFIX}", str(dest),
                        "--transfers", "8", "--multi-thread-streams", "8"],
    }
    if aws:
        cmds["aws s3 cp"] = [aws, "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", env_ep,
                             f"s3://{BUCKET}/{PREFIX}", str(dest)]
    return cmds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dest", type=Path, default=None, help="download directory parent (default: a tmp dir "
                        "on the local disk)")
    parser.add_argument("--only", action="append", default=[], help="run only these tools (repeatable)")
    parser.add_argument("--no-awscli", action="store_true", help="skip aws s3 cp (it needs a venv of its own)")
    args = parser.parse_args(argv)

    size = parse_size(args.size)
    aws = None if args.no_awscli else ensure_awscli()
    base = args.dest or Path(tempfile.mkdtemp(prefix="weightcache-bench-fetch-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[float]]] = {}
    s3 = EmbeddedS3()
    total = make_model(s3.bucket_dir(BUCKET).parent, size)  # before start: rclone caches listings
    with s3:
        env = {**os.environ, **s3.env()}
        print(f"model: {total / 2**30:.2f} GiB in s3://{BUCKET}/{PREFIX}; downloads into {base}")
        dropped = True
        for r in range(args.runs):
            for name, cmd in commands(s3, base / "dest", aws=aws).items():
                if args.only and name not in args.only:
                    continue
                shutil.rmtree(base / "dest", ignore_errors=True)
                (base / "dest").mkdir()
                dropped = drop_caches() and dropped
                t = run_timed(cmd, env=env)
                if t.returncode != 0:
                    print(f"{name} failed ({t.returncode}):\n{t.output[-2000:]}", file=sys.stderr)
                    continue
                got = sum(p.stat().st_size for p in (base / "dest").rglob("*") if p.is_file() and
                          not p.is_symlink() and "blobs" not in p.parts or name.startswith("weightcache")
                          and "blobs" in p.parts)
                if got < total:
                    print(f"{name}: only {got} of {total} bytes landed", file=sys.stderr)
                    continue
                # Durable = the tool's exit plus a `sync`: peers leave their bytes dirty in the page cache, while
                # weightcache fsyncs before it publishes (its `sync` finds almost nothing left to write).
                t_sync = time.perf_counter()
                os.sync()
                durable = t.seconds + time.perf_counter() - t_sync
                rec = results.setdefault(name, {"seconds": [], "durable": [], "in_process": [], "rss_mb": []})
                rec["seconds"].append(t.seconds)
                rec["durable"].append(durable)
                rec["rss_mb"].append(t.max_rss_mb)
                m = FETCHED_RE.search(t.output)
                if name.startswith("weightcache") and m:
                    rec["in_process"].append(float(m.group(1)))
                print(f"run {r + 1}: {name:36s} exit {t.seconds:6.2f}s  +sync {durable:6.2f}s  "
                      f"{total / t.seconds / 2**30:5.2f} GiB/s  RSS {t.max_rss_mb:6.0f} MB", flush=True)
    shutil.rmtree(base, ignore_errors=True)

    summary = {name: {"seconds": median(r["seconds"]), "durable": median(r["durable"]),
                      "gib_s": total / median(r["seconds"]) / 2**30,
                      "durable_gib_s": total / median(r["durable"]) / 2**30,
                      "in_process": median(r["in_process"]) if r["in_process"] else None,
                      "rss_mb": max(r["rss_mb"]), "runs": len(r["seconds"])} for name, r in results.items()}
    md = render(summary, total=total, runs=args.runs, size=args.size, dropped=dropped)
    write_results("fetch", markdown=md, data={"bytes": total, "summary": summary, "raw": results})
    if summary:
        names = [n for n, _ in sorted(summary.items(), key=lambda kv: -kv[1]["durable_gib_s"])]
        bar_plot("fetch", names, [summary[n]["durable_gib_s"] for n in names],
                 title=f"S3 → disk, {args.size} model, until durable", ylabel="GiB/s (higher is better)",
                 highlight=OURS)
    print(md)
    return 0


def render(summary: dict[str, dict[str, Any]], *, total: int, runs: int, size: str, dropped: bool) -> str:
    """Two comparisons, each like for like: until the bytes are durable (peers + `sync`, weightcache with its
    default fsync), and until the tool exits (weightcache with --fsync false: no durability, like the peers)."""
    ours, fast = summary.get(OURS), summary.get(OURS_NO_FSYNC)
    rows = []
    for name, s in sorted(summary.items(), key=lambda kv: kv[1]["durable"]):
        durable_ratio = f"{ours['durable_gib_s'] / s['durable_gib_s']:.2f}×" if ours and not name.startswith(
            "weightcache") else "—"
        exit_ratio = f"{fast['gib_s'] / s['gib_s']:.2f}×" if fast and not name.startswith("weightcache") else "—"
        rows.append([name, f"{s['seconds']:.2f}", f"{s['durable']:.2f}", f"{s['durable_gib_s']:.2f}",
                     f"{s['rss_mb']:.0f}", durable_ratio, exit_ratio])
    in_process = ""
    if ours and ours.get("in_process"):
        in_process = (f"\n\nInside a running agent (the daemon's case: no interpreter start-up), weightcache's own "
                      f"fetch time — listing, download, xxh3-128, fsync, publish — was {ours['in_process']:.2f} s "
                      f"({total / ours['in_process'] / 2**30:.2f} GiB/s) with fsync"
                      + (f", {fast['in_process']:.2f} s ({total / fast['in_process'] / 2**30:.2f} GiB/s) without"
                         if fast and fast.get("in_process") else "") + ".")
    return (f"# Fetch benchmark\n\n{total / 2**30:.2f} GiB model (4 shards + 200 small files) from `rclone serve s3` "
            f"on loopback to local disk; median of {runs} runs; {machine_note()}"
            f"{'' if dropped else ' (WARNING: could not drop the page cache)'}.\n\n"
            "Every time runs from process start to exit, listing included; weightcache's includes xxh3-128 of "
            "every file and atomic publish. *Durable* adds a `sync` after the tool exits: the peers leave their "
            "bytes dirty in the page cache, weightcache fsyncs before it publishes (its default), so only the "
            "durable column compares like with like for the default; *vs, exit* compares "
            "`weightcache --fsync false` with the peers as they are.\n\n"
            + markdown_table(["tool", "exit (s)", "durable (s)", "durable GiB/s", "peak RSS MB",
                              "weightcache vs, durable", "weightcache --fsync false vs, exit"], rows)
            + in_process
            + f"\n\nCommand: `python -m bench.fetch --size {size} --runs {runs}`\n")


if __name__ == "__main__":
    with page_reporting_held():  # see bench/common.py: measure the tools, not this VM's memory hand-back
        sys.exit(main())
