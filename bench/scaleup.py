"""Scale-up benchmark: N fresh nodes join at once and each warms the same model from one S3 endpoint.

Not a test. It simulates a cluster-autoscaler scale-up on ONE machine: one ``rclone serve s3`` on loopback (data on
tmpfs, the model written before it starts, since rclone caches listings) and N ``weightcache-agent run`` processes,
each with its own cache root (its own "node", on the local disk) and the same policy file, whose warm set
(``nodeSelector: {}`` matches every node) names the model. That is the scale-up path: a new node's agent starts
and prefetches its warm set before any pod lands. Each agent gets an empty ``--pods-file``: no Kubernetes needed.

Measured for each N (default 1, 2, 4, 8), from the moment the agents are started (interpreter start and imports
count, as on a new node):
  - time until every agent's ``/v1/models`` reports the model ``ready`` (and until the first one does),
  - aggregate throughput = N × model bytes / time-to-all-warm,
  - the bytes the S3 server sent, two independent ways: the sum of the agents' ``weightcache_fetch_bytes_total``,
    and the delta of the rclone process's ``wchar`` in ``/proc/<pid>/io`` (bytes it wrote to sockets, headers
    and listings included).

Caveat, stated in the results too: everything shares one machine (here 2 cores) — N agents compete for CPU (xxh3
hashing, TLS-less HTTP parsing), the loopback interface and the local disk, and rclone competes with them. So this
shows how the agent behaves when many nodes start together, not how a real S3 endpoint scales: on real nodes each
agent has its own cores, NIC and NVMe, and S3 serves each at its per-connection rate.

Writes ``bench/results/scaleup.md``, ``scaleup.json`` and ``scaleup.png``.
Usage: ``python -m bench.scaleup --size 512MiB --nodes 1,2,4,8``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS, drop_caches, machine_note, markdown_table, write_results
from demo.s3server import EmbeddedS3, free_port

REPO = Path(__file__).resolve().parent.parent
BUCKET, PREFIX = "bench", "scaleup-model"
MODEL_URI = f"s3://{BUCKET}/{PREFIX}/"
POLL_S = 0.1
STOP_GRACE_S = 30.0


def parse_size(text: str) -> int:
    from agent.config import parse_size as p

    return p(text)


@dataclass
class Agent:
    index: int
    cache_dir: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes]
    up_s: float | None = None
    ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Row:
    nodes: int
    all_warm_s: float
    first_warm_s: float
    median_warm_s: float
    median_agent_up_s: float
    aggregate_mib_s: float
    per_node_mib_s: float
    fetch_bytes_total: int
    rclone_wchar_bytes: int
    model_bytes: int
    per_agent: list[dict[str, Any]] = field(default_factory=list)


def make_model(s3: EmbeddedS3, size: str, shard_size: str) -> tuple[int, int]:
    """The demo model (sharded safetensors + config + index) straight into the served bucket directory."""
    target = s3.bucket_dir(BUCKET) / PREFIX
    subprocess.run([sys.executable, "-m", "server.demo_model", "--size", size, "--shard-size", shard_size,
                    str(target)], check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    files = [p for p in target.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def io_wchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError(f"no wchar in /proc/{pid}/io")


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def fetch_bytes(agent: Agent) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{agent.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "weightcache_fetch_bytes_total":
                return int(s.value)
    return 0


def model_state(agent: Agent) -> tuple[bool, str | None]:
    """(answered at all, the model's state)."""
    try:
        body = http_json(f"{agent.url}/v1/models")
    except (OSError, ValueError):
        return False, None
    for m in body.get("models", []):
        if m.get("uri") == MODEL_URI:
            return True, str(m.get("state"))
    return True, None


def start_agents(n: int, work: Path, env: dict[str, str], policy: Path, pods: Path,
                 extra: list[str]) -> list[Agent]:
    agents = []
    for i in range(n):
        cache, port, log = work / f"node-{i}", free_port(), work / f"agent-{i}.log"
        argv = [sys.executable, "-m", "agent", "run", "--pods-file", str(pods), "--policy-file", str(policy),
                "--cache-dir", str(cache), "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
                "--log-format", "json", "--min-free-bytes", "0", *extra]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        agents.append(Agent(i, cache, port, log, proc))
    return agents


def stop_agents(agents: list[Agent]) -> list[int]:
    """SIGTERM each, then wait (bounded); SIGKILL the process group of any that hangs. Returns exit codes."""
    for a in agents:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
    codes = []
    for a in agents:
        try:
            codes.append(a.proc.wait(STOP_GRACE_S))
        except subprocess.TimeoutExpired:
            os.killpg(a.proc.pid, signal.SIGKILL)
            codes.append(a.proc.wait())
    return codes


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def run_once(n: int, *, s3: EmbeddedS3, work: Path, model_bytes: int, timeout: float, extra: list[str]) -> Row:
    work.mkdir(parents=True)
    policy, pods = work / "policy.yaml", work / "pods.yaml"
    # nodeSelector {} matches every node: each agent warms the model as soon as it starts.
    policy.write_text(json.dumps({"allow": [f"s3://{BUCKET}/"],
                                  "warm": [{"nodeSelector": {}, "models": [MODEL_URI]}]}))
    pods.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEIGHTCACHE_"))}
    env.update(s3.env())
    assert s3.proc is not None
    dropped = drop_caches()
    wchar0 = io_wchar(s3.proc.pid)
    t0 = time.monotonic()
    agents = start_agents(n, work, env, policy, pods, extra)
    try:
        deadline = t0 + timeout
        while any(a.ready_s is None for a in agents):
            for a in agents:
                if a.ready_s is not None:
                    continue
                if a.proc.poll() is not None:
                    raise RuntimeError(f"agent {a.index} exited with {a.proc.returncode}:\n{tail(a.log)}")
                answered, state = model_state(a)
                now = time.monotonic() - t0
                if answered and a.up_s is None:
                    a.up_s = now
                if state == "ready":
                    a.ready_s = now
                elif state == "failed":
                    raise RuntimeError(f"agent {a.index} failed to fetch the model:\n{tail(a.log)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"N={n}: not all agents warm after {timeout:.0f}s")
            time.sleep(POLL_S)
        fetched = [fetch_bytes(a) for a in agents]
        wchar = io_wchar(s3.proc.pid) - wchar0
    finally:
        codes = stop_agents(agents)
    if any(codes):
        print(f"warning: agent exit codes after SIGTERM: {codes}", file=sys.stderr)
    times = [a.ready_s for a in agents if a.ready_s is not None]
    all_warm = max(times)
    row = Row(
        nodes=n, all_warm_s=all_warm, first_warm_s=min(times), median_warm_s=statistics.median(times),
        median_agent_up_s=statistics.median(a.up_s for a in agents if a.up_s is not None),
        aggregate_mib_s=n * model_bytes / all_warm / 2**20, per_node_mib_s=model_bytes / all_warm / 2**20,
        fetch_bytes_total=sum(fetched), rclone_wchar_bytes=wchar, model_bytes=model_bytes,
        per_agent=[{"node": a.index, "up_s": a.up_s, "ready_s": a.ready_s, "fetch_bytes": f, "exit_code": c}
                   for a, f, c in zip(agents, fetched, codes)])
    if not dropped:
        row.per_agent.append({"note": "page cache not dropped (not root)"})
    for a in agents:
        shutil.rmtree(a.cache_dir, ignore_errors=True)  # N × model size on disk: free it before the next N
    return row


def plot(rows: list[Row], title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ns = [r.nodes for r in rows]
    t1 = rows[0].all_warm_s / rows[0].nodes
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    ax1.plot(ns, [r.all_warm_s for r in rows], "o-", color="#2a7de1", label="all nodes warm")
    ax1.plot(ns, [r.first_warm_s for r in rows], "s--", color="#7fb0ea", label="first node warm")
    ax1.plot(ns, [t1 * n for n in ns], ":", color="#9aa5b1", label="N × t(N=1): no overlap at all")
    ax1.set_xlabel("nodes starting together (N)")
    ax1.set_ylabel("seconds from agent start")
    ax1.set_xticks(ns)
    ax1.legend(fontsize=7)
    ax1.set_title("time to warm", fontsize=9)
    ax2.plot(ns, [r.aggregate_mib_s for r in rows], "o-", color="#2a7de1")
    ax2.set_xlabel("nodes starting together (N)")
    ax2.set_ylabel("aggregate MiB/s")
    ax2.set_xticks(ns)
    ax2.set_title("aggregate throughput (S3 → all caches)", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "scaleup.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512MiB", help="model size (default 512MiB)")
    parser.add_argument("--shard-size", default="128MiB", help="largest safetensors shard (default 128MiB)")
    parser.add_argument("--nodes", default="1,2,4,8", help="comma-separated node counts (default 1,2,4,8)")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up on one N after this many seconds")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the node caches go (default: a temp dir on the local disk, not tmpfs)")
    parser.add_argument("--agent-args", default="", help="extra flags for every agent, e.g. '--concurrency 16'")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.nodes.split(",") if x.strip()]
    extra = shlex.split(args.agent_args)

    base = Path(tempfile.mkdtemp(prefix="weightcache-scaleup-", dir=args.work_dir or "/var/tmp"))
    s3 = EmbeddedS3()
    rows: list[Row] = []
    try:
        model_bytes, files = make_model(s3, args.size, args.shard_size)
        s3.start()
        print(f"model {MODEL_URI}: {model_bytes / 2**20:.0f} MiB in {files} objects; caches under {base}",
              flush=True)
        for n in counts:
            row = run_once(n, s3=s3, work=base / f"n{n}", model_bytes=model_bytes, timeout=args.timeout,
                           extra=extra)
            rows.append(row)
            print(f"N={n}: all warm in {row.all_warm_s:.2f}s (first {row.first_warm_s:.2f}s), "
                  f"{row.aggregate_mib_s:.0f} MiB/s aggregate; S3 sent {row.fetch_bytes_total / 2**20:.0f} MiB "
                  f"(agents) / {row.rclone_wchar_bytes / 2**20:.0f} MiB (rclone wchar)", flush=True)
    finally:
        s3.stop()
        shutil.rmtree(base, ignore_errors=True)

    size_mib = model_bytes / 2**20
    table = markdown_table(
        ["nodes (N)", "all warm (s)", "first warm (s)", "median agent up (s)", "aggregate MiB/s",
         "per node MiB/s", "S3 sent: agents' fetch_bytes (MiB)", "S3 sent: rclone wchar (MiB)",
         "sent / (N × model)"],
        [[r.nodes, f"{r.all_warm_s:.2f}", f"{r.first_warm_s:.2f}", f"{r.median_agent_up_s:.2f}",
          f"{r.aggregate_mib_s:.0f}", f"{r.per_node_mib_s:.0f}", f"{r.fetch_bytes_total / 2**20:.0f}",
          f"{r.rclone_wchar_bytes / 2**20:.0f}", f"{r.rclone_wchar_bytes / (r.nodes * r.model_bytes):.3f}"]
         for r in rows])
    command = "python -m bench.scaleup " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                              else sys.argv[1:]))
    markdown = f"""# Scale-up benchmark

N agents start together, each a fresh "node" with its own cache root on the local disk, and each warms the same
{size_mib:.0f} MiB model ({files} objects, `{MODEL_URI}`) from one `rclone serve s3` on loopback (data on tmpfs),
through the policy file's warm set — the cluster-autoscaler scale-up path. Times run from starting the agents
(interpreter start and imports included) until each agent's `/v1/models` says `ready` (xxh3-128 verification,
fsync and atomic publish included). {machine_note()}.

**One machine, {os.cpu_count()} cores**: the N agents share the CPU, the loopback interface and the disk with each
other and with the S3 server, so the aggregate throughput here is bounded by this machine, not by the agent or S3.
On a real scale-up every node has its own cores, NIC and NVMe.

{table}

"S3 sent" is measured twice, independently: the sum of the agents' `weightcache_fetch_bytes_total`, and the
growth of the rclone process's `wchar` (`/proc/<pid>/io`, every byte it wrote, HTTP headers and listings
included). Each node downloads the model once: a ratio of 1.0 means no byte was fetched twice.

![time to warm vs N](scaleup.png)

Command: `{command}`
"""
    write_results("scaleup", markdown=markdown,
                  data={"command": command, "model_uri": MODEL_URI, "model_bytes": model_bytes, "files": files,
                        "machine": machine_note(), "cpu_count": os.cpu_count(),
                        "rows": [asdict(r) for r in rows]})
    plot(rows, f"{size_mib:.0f} MiB model, one machine with {os.cpu_count()} cores (agents share CPU, loopback, disk)")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
