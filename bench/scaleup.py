"""Scale-up benchmark: N fresh nodes join at once and each warms the same model — peers off, then peers on.

Not a test. It simulates a cluster-autoscaler scale-up with every node a SEPARATE HOST (``bench/netns.py``): one
network namespace for the S3 server (``rclone serve s3``, data on tmpfs, the model written before it starts, since
rclone caches listings) and one per node, joined by a bridge. The S3 server's egress is ONE shared cap
(``--s3-mbps``, default 50 MB/s — the S3 endpoint, NAT gateway or cross-AZ link a real scale-up shares); each
node's link is faster (``--node-mbps``, default 1 GB/s). So the figure shows what the design does with the
bottleneck that matters on a real scale-up, not how fast this machine's loopback is.

Each node runs ``weightcache-agent run`` with its own cache root, its own control socket and the same policy file,
whose warm set (``nodeSelector: {}``) names the model: a new node's agent starts and prefetches its warm set before
any pod lands. An empty ``--pods-file``: no Kubernetes needed. Modes, for each N:
  - peers off: no peer settings — every node downloads the whole model from S3;
  - peers on: a shared token file (``WEIGHTCACHE_PEER_TOKEN_FILE``), ``WEIGHTCACHE_PEERS`` = every node's
    ``ip:9401`` and ``WEIGHTCACHE_PEER_ADDRESS`` = its own; ideally S3 then sends about one copy in total.

Measured from the moment the agents are started (interpreter start and imports count, as on a new node):
  - time until every agent's ``/v1/models`` reports the model ``ready``, and until the first one does;
  - the bytes S3 sent, twice: the growth of the rclone process's ``wchar`` (``/proc/<pid>/io``: every byte it
    wrote, headers and listings included) and the sum of the agents' ``weightcache_fetch_bytes_total`` by
    ``source`` (``s3``/``peer``; an agent without peers has no label: all of it is S3).

Writes ``bench/results/scaleup.md``, ``scaleup.json`` and ``scaleup.png``. Root only (namespaces, page cache).
Usage: ``python -m bench.scaleup --size 256MiB --nodes 1,2,4,8 --peers both``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    drop_caches,
    machine_note,
    markdown_table,
    page_reporting_held,
    write_results,
)
from bench.netns import Host, Topology, sweep_stale
from demo.s3server import ACCESS_KEY, SECRET_KEY, rclone_binary

REPO = Path(__file__).resolve().parent.parent
BUCKET, PREFIX = "bench", "scaleup-model"
MODEL_URI = f"s3://{BUCKET}/{PREFIX}/"
NETNS_PREFIX = "wcscale"
TMP_PREFIX = "weightcache-scaleup-"  # + owner pid: a later run sweeps what a killed one left
S3_PORT, METRICS_PORT, PEER_PORT = 9000, 9400, 9401  # every host has its own namespace: fixed ports never clash
POLL_S = 0.1
STOP_GRACE_S = 30.0
_STRIPPED = ("AWS_", "WEIGHTCACHE_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
             "https_proxy", "all_proxy", "no_proxy")


@dataclass
class Agent:
    index: int
    host: Host
    cache_dir: Path
    log: Path
    proc: subprocess.Popen[bytes]
    up_s: float | None = None
    ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host.ip}:{METRICS_PORT}"


@dataclass
class Row:
    peers: str  # "off" | "on"
    nodes: int
    all_warm_s: float
    first_warm_s: float
    median_warm_s: float
    median_agent_up_s: float
    aggregate_mib_s: float
    s3_wchar_bytes: int  # what the S3 server wrote (its /proc/<pid>/io wchar delta)
    agents_s3_bytes: int  # the agents' weightcache_fetch_bytes_total{source="s3"} (or unlabelled)
    agents_peer_bytes: int  # ... {source="peer"}
    peer_metrics: bool  # the agents' metrics carry a source label: the agent under test knows about peers
    model_bytes: int
    s3_cap_bound_s: float  # N copies through the S3 cap: the floor when every node fetches alone
    per_agent: list[dict[str, Any]] = field(default_factory=list)
    #: The last node left and came back empty while the others held the model (N ≥ 2).
    join: dict[str, Any] = field(default_factory=dict)

    @property
    def s3_copies(self) -> float:
        return self.s3_wchar_bytes / self.model_bytes


def sweep_stale_dirs(roots: list[Path]) -> list[str]:
    """Temp dirs of runs killed with SIGKILL (the model on tmpfs is memory): those whose owner pid is gone."""
    swept = []
    for root in roots:
        for d in root.glob(f"{TMP_PREFIX}*"):
            pid = d.name[len(TMP_PREFIX):].split("-", 1)[0]
            if d.is_dir() and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(d, ignore_errors=True)
                swept.append(str(d))
    return swept


def make_model(target: Path, size: str, shard_size: str) -> tuple[int, int]:
    """The demo model (sharded safetensors + config + index) straight into the served bucket directory."""
    subprocess.run([sys.executable, "-m", "server.demo_model", "--size", size, "--shard-size", shard_size,
                    str(target)], check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    files = [p for p in target.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def start_s3(topo: Topology, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    """``rclone serve s3`` on the S3 host, as ``demo.s3server.EmbeddedS3`` runs it (which binds loopback only)."""
    with open(log, "wb") as out:
        proc = topo.popen(topo.s3, [rclone_binary(), "serve", "s3", "--addr", f"{topo.s3.ip}:{S3_PORT}",
                                    "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--etag-hash", "MD5",
                                    "--vfs-cache-mode", "off", "--config", "/dev/null", str(data_dir)],
                          stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rclone serve s3 exited with {proc.returncode}:\n{tail(log)}")
        try:
            topo.http_get(topo.s3, f"http://{topo.s3.ip}:{S3_PORT}/", timeout=1)
            return proc
        except OSError as e:
            if getattr(e, "code", None) is not None:  # an HTTPError (403 without credentials): it answers
                return proc
            time.sleep(0.1)
    raise RuntimeError("rclone serve s3 did not start in 20 s")


def io_wchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError(f"no wchar in /proc/{pid}/io")


def fetch_bytes(topo: Topology, agent: Agent) -> tuple[dict[str, int], bool]:
    """The agent's fetched bytes by source, and whether its metrics label them by source at all."""
    from prometheus_client.parser import text_string_to_metric_families

    text = topo.http_get(agent.host, f"{agent.url}/metrics", timeout=5).decode()
    by_source = {"s3": 0, "peer": 0}
    labelled = False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "weightcache_fetch_bytes_total":
                labelled = labelled or "source" in s.labels
                source = s.labels.get("source", "s3")
                by_source[source] = by_source.get(source, 0) + int(s.value)
    return by_source, labelled


def model_state(topo: Topology, agent: Agent) -> tuple[bool, str | None]:
    """(answered at all, the model's state)."""
    try:
        body = json.loads(topo.http_get(agent.host, f"{agent.url}/v1/models"))
    except (OSError, ValueError):
        return False, None
    for m in body.get("models", []):
        if m.get("uri") == MODEL_URI:
            return True, str(m.get("state"))
    return True, None


def agent_env(topo: Topology, hosts: list[Host], host: Host, *, peers: bool, token: Path) -> dict[str, str]:
    """The environment of one node's agent: S3 on the S3 host; the peer contract when ``peers``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIPPED)}
    env.update({"AWS_ENDPOINT_URL": f"http://{topo.s3.ip}:{S3_PORT}", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"})
    if peers:
        env.update({"WEIGHTCACHE_PEER_TOKEN_FILE": str(token), "WEIGHTCACHE_PEER_PORT": str(PEER_PORT),
                    "WEIGHTCACHE_PEERS": ",".join(f"{h.ip}:{PEER_PORT}" for h in hosts),
                    "WEIGHTCACHE_PEER_ADDRESS": f"{host.ip}:{PEER_PORT}"})
    return env


def start_agents(topo: Topology, n: int, work: Path, *, peers: bool, extra: list[str]) -> list[Agent]:
    policy, pods, token = work / "policy.yaml", work / "pods.yaml", work / "peer-token"
    # nodeSelector {} matches every node: each agent warms the model as soon as it starts.
    policy.write_text(json.dumps({"allow": [f"s3://{BUCKET}/"],
                                  "warm": [{"nodeSelector": {}, "models": [MODEL_URI]}]}))
    pods.write_text("")
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return [start_agent(topo, n, i, work, peers=peers, extra=extra) for i in range(n)]


def start_agent(topo: Topology, n: int, i: int, work: Path, *, peers: bool, extra: list[str]) -> Agent:
    """Node ``i`` of ``n``'s agent (the policy, pods file and token already in ``work``)."""
    hosts = topo.nodes[:n]
    host = hosts[i]
    env = agent_env(topo, hosts, host, peers=peers, token=work / "peer-token")
    cache, log = work / f"node-{i}", work / f"agent-{i}.log"
    argv = [sys.executable, "-m", "agent", "run", "--pods-file", str(work / "pods.yaml"),
            "--policy-file", str(work / "policy.yaml"),
            "--cache-dir", str(cache), "--control-socket", str(work / f"control-{i}" / "agent.sock"),
            "--metrics-host", host.ip, "--metrics-port", str(METRICS_PORT),
            "--log-format", "json", "--min-free-bytes", "0", *extra]
    with open(log, "ab") as out:
        proc = topo.popen(host, argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return Agent(i, host, cache, log, proc)


def wait_warm(topo: Topology, agents: list[Agent], t0: float, timeout: float) -> None:
    """Poll every agent until its model is ready (recording when it first answered and when it was ready)."""
    deadline = t0 + timeout
    while any(a.ready_s is None for a in agents):
        for a in agents:
            if a.ready_s is not None:
                continue
            if a.proc.poll() is not None:
                raise RuntimeError(f"agent {a.index} exited with {a.proc.returncode}:\n{tail(a.log)}")
            answered, state = model_state(topo, a)
            now = time.monotonic() - t0
            if answered and a.up_s is None:
                a.up_s = now
            if state == "ready":
                a.ready_s = now
            elif state == "failed":
                raise RuntimeError(f"agent {a.index} failed to fetch the model:\n{tail(a.log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not all {len(agents)} agents warm after {timeout:.0f}s")
        time.sleep(POLL_S)


def late_join(topo: Topology, agents: list[Agent], *, n: int, peers: bool, s3_pid: int, work: Path,
              timeout: float, extra: list[str]) -> dict[str, Any]:
    """The last node leaves and comes back empty while the others hold the model: what S3 sends it, how fast."""
    last = agents[-1]
    topo.stop(last.proc, grace=STOP_GRACE_S)
    shutil.rmtree(last.cache_dir, ignore_errors=True)
    wchar0 = io_wchar(s3_pid)
    t0 = time.monotonic()
    again = start_agent(topo, n, last.index, work, peers=peers, extra=extra)
    agents[-1] = again
    wait_warm(topo, [again], t0, timeout)
    fetched, _ = fetch_bytes(topo, again)
    return {"join_s": again.ready_s, "join_up_s": again.up_s, "join_s3_wchar_bytes": io_wchar(s3_pid) - wchar0,
            "join_fetch_bytes": fetched}


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def run_once(topo: Topology, n: int, *, peers: bool, s3_pid: int, work: Path, model_bytes: int, timeout: float,
             extra: list[str]) -> Row:
    work.mkdir(parents=True)
    dropped = drop_caches()
    wchar0 = io_wchar(s3_pid)
    t0 = time.monotonic()
    agents = start_agents(topo, n, work, peers=peers, extra=extra)
    join: dict[str, Any] = {}
    try:
        wait_warm(topo, agents, t0, timeout)
        wchar = io_wchar(s3_pid) - wchar0
        fetched = [fetch_bytes(topo, a) for a in agents]
        times = [a.ready_s for a in agents if a.ready_s is not None]
        if n >= 2:
            join = late_join(topo, agents, n=n, peers=peers, s3_pid=s3_pid, work=work, timeout=timeout,
                             extra=extra)
    finally:
        codes = [topo.stop(a.proc, grace=STOP_GRACE_S) for a in agents]
    if any(codes):
        print(f"warning: agent exit codes after SIGTERM: {codes}", file=sys.stderr)
    all_warm = max(times)
    row = Row(
        peers="on" if peers else "off", nodes=n, all_warm_s=all_warm, first_warm_s=min(times),
        median_warm_s=statistics.median(times),
        median_agent_up_s=statistics.median(a.up_s for a in agents if a.up_s is not None),
        aggregate_mib_s=n * model_bytes / all_warm / 2**20, s3_wchar_bytes=wchar,
        agents_s3_bytes=sum(f["s3"] for f, _ in fetched), agents_peer_bytes=sum(f["peer"] for f, _ in fetched),
        peer_metrics=any(labelled for _, labelled in fetched), model_bytes=model_bytes,
        s3_cap_bound_s=n * model_bytes / (topo.s3_mbps * 1e6),
        per_agent=[{"node": a.index, "ip": a.host.ip, "up_s": a.up_s, "ready_s": a.ready_s, "fetch_bytes": f,
                    "exit_code": c} for a, (f, _), c in zip(agents, fetched, codes)], join=join)
    if not dropped:
        row.per_agent.append({"note": "page cache not dropped (not root)"})
    shutil.rmtree(work, ignore_errors=True)  # N × model size on disk: free it before the next run
    return row


def plot(rows: list[Row], title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ns = sorted({r.nodes for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    styles = {"off": ("#9aa5b1", "o-"), "on": ("#2a7de1", "s-")}
    for mode, (color, marker) in styles.items():
        sel = sorted((r for r in rows if r.peers == mode), key=lambda r: r.nodes)
        if not sel:
            continue
        x = [r.nodes for r in sel]
        ax1.plot(x, [r.all_warm_s for r in sel], marker, color=color, label=f"peers {mode}: all warm")
        ax1.plot(x, [r.first_warm_s for r in sel], marker[0] + "--", color=color, alpha=0.6,
                 label=f"peers {mode}: first warm")
        ax2.plot(x, [r.s3_copies for r in sel], marker, color=color, label=f"peers {mode}")
    bound = {r.nodes: r.s3_cap_bound_s for r in rows}
    ax1.plot(ns, [bound[n] for n in ns], ":", color="#c0392b", label="N copies through the S3 cap")
    ax1.set_xlabel("nodes starting together (N)")
    ax1.set_ylabel("seconds from agent start")
    ax1.set_xticks(ns)
    ax1.legend(fontsize=7)
    ax1.set_title("time to warm", fontsize=9)
    ax2.plot(ns, ns, ":", color="#c0392b", label="N copies (no sharing)")
    ax2.axhline(1.0, color="#27ae60", linestyle=":", label="one copy")
    ax2.set_xlabel("nodes starting together (N)")
    ax2.set_ylabel("S3 bytes sent ÷ model size")
    ax2.set_xticks(ns)
    ax2.legend(fontsize=7)
    ax2.set_title("copies of the model S3 sent (rclone wchar)", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "scaleup.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def report(rows: list[Row], *, args: argparse.Namespace, command: str, model_bytes: int, files: int) -> str:
    size_mib = model_bytes / 2**20
    mib = 2**20
    table = markdown_table(
        ["peers", "nodes (N)", "all warm (s)", "first warm (s)", "median agent up (s)", "N copies at the S3 cap (s)",
         "aggregate MiB/s", "S3 sent ÷ model (rclone wchar)", "agents: from S3 (MiB)", "agents: from peers (MiB)"],
        [[r.peers, r.nodes, f"{r.all_warm_s:.2f}", f"{r.first_warm_s:.2f}", f"{r.median_agent_up_s:.2f}",
          f"{r.s3_cap_bound_s:.1f}", f"{r.aggregate_mib_s:.0f}", f"{r.s3_copies:.2f}",
          f"{r.agents_s3_bytes / mib:.0f}", f"{r.agents_peer_bytes / mib:.0f}"] for r in rows])
    joins = [r for r in rows if r.join]
    join_table = markdown_table(
        ["peers", "nodes (N)", "rejoin: warm (s)", "rejoin: S3 sent ÷ model (rclone wchar)",
         "rejoin: from S3 (MiB)", "rejoin: from peers (MiB)"],
        [[r.peers, r.nodes, f"{r.join['join_s']:.2f}", f"{r.join['join_s3_wchar_bytes'] / r.model_bytes:.3f}",
          f"{r.join['join_fetch_bytes']['s3'] / mib:.0f}", f"{r.join['join_fetch_bytes']['peer'] / mib:.0f}"]
         for r in joins]) if joins else ""
    on_rows = [r for r in rows if r.peers == "on"]
    peer_note = ""
    if on_rows and not any(r.peer_metrics for r in on_rows):
        peer_note = ("\n**The agent under test ignored the peer settings** (its `weightcache_fetch_bytes_total` has "
                     "no `source` label): the \"peers on\" rows measure peers off, until peer exchange lands.\n")
    return f"""# Scale-up benchmark: separate hosts, a shared S3 cap, peers off and on

N agents start together, each a fresh node with its own cache root on the local disk, and each warms the same
{size_mib:.0f} MiB model ({files} objects, `{MODEL_URI}`) through the policy file's warm set — the
cluster-autoscaler scale-up path. Every node is its **own host**: a network namespace with one veth into a bridge
(`bench/netns.py`). S3 (`rclone serve s3`, data on tmpfs) is another host whose egress is **one shared cap of
{args.s3_mbps:g} MB/s** (HTB, a fair share per node); node links run at {args.node_mbps:g} MB/s each way (TBF).
Times run from starting the agents (interpreter start and imports included) until each agent's `/v1/models` says
`ready` (xxh3-128 verification, fsync and atomic publish included). {machine_note()}.
{peer_note}
{table}

- **N copies at the S3 cap**: N × model ÷ cap, the floor for "all warm" when every node fetches its own copy
  (peers off). With peers on, S3 need send about one copy: the floor is the N = 1 time, whatever N.
- **S3 sent ÷ model** is what the S3 server wrote (`wchar` growth of its process in `/proc/<pid>/io`, headers and
  listings included): N with peers off, ideally about 1 with peers on. It is cross-checked against the agents'
  own `weightcache_fetch_bytes_total{{source="s3"}}` (and `{{source="peer"}}` for bytes from other nodes).

Then, with the model warm on all N, the last node leaves and comes back with an empty cache (a node replaced while
the others hold the model): what it took from S3, and how long it took from its start.

{join_table}

**Caveat.** The hosts are namespaces on one machine with {os.cpu_count()} cores and one disk: the links are shaped,
but the N agents still share the CPU (HTTP, xxh3 hashing, copying between veths) and the disk. With peers off the
S3 cap ({args.s3_mbps:g} MB/s in total) is far below what this machine can move, so those rows measure the design.
With peers on, node-to-node traffic can go much faster than the S3 cap, and then the shared cores and disk — not a
real node's own NIC and NVMe — may be what limits it: on a real scale-up each node has its own, so these peers-on
times are an upper bound. There is no added latency (the kernel here has no netem). One run per row.

![time to warm and S3 copies vs N](scaleup.png)

Command: `{command}`
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256MiB", help="model size (default 256MiB: 5 s per copy at 50 MB/s)")
    parser.add_argument("--shard-size", default="128MiB", help="largest safetensors shard (default 128MiB)")
    parser.add_argument("--nodes", default="1,2,4,8", help="comma-separated node counts (default 1,2,4,8)")
    parser.add_argument("--peers", choices=["on", "off", "both"], default="both",
                        help="run with peer exchange off, on, or both for every N (default both)")
    parser.add_argument("--s3-mbps", type=float, default=50.0, help="S3 egress cap, shared by all nodes (MB/s)")
    parser.add_argument("--node-mbps", type=float, default=1000.0, help="every node's link, each way (MB/s)")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up on one run after this many seconds")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the node caches go (default: a temp dir on the local disk, not tmpfs)")
    parser.add_argument("--agent-args", default="", help="extra flags for every agent, e.g. '--concurrency 16'")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.nodes.split(",") if x.strip()]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.peers]
    extra = shlex.split(args.agent_args)

    shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    work_root = args.work_dir or Path("/var/tmp")
    swept = sweep_stale(NETNS_PREFIX) + sweep_stale_dirs([shm, work_root])
    if swept:
        print(f"removed what killed runs left behind: {swept}", flush=True)
    base = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=work_root))
    data = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-s3-", dir=shm))
    rows: list[Row] = []
    try:
        model_bytes, files = make_model(data / BUCKET / PREFIX, args.size, args.shard_size)
        with Topology(max(counts), s3_mbps=args.s3_mbps, node_mbps=args.node_mbps, prefix=NETNS_PREFIX) as topo:
            s3 = start_s3(topo, data, base / "rclone.log")
            print(f"model {MODEL_URI}: {model_bytes / 2**20:.0f} MiB in {files} objects; S3 on {topo.s3.ip} "
                  f"capped at {args.s3_mbps:g} MB/s; nodes {topo.subnet} at {args.node_mbps:g} MB/s; caches "
                  f"under {base}", flush=True)
            for n in counts:
                for peers in modes:
                    row = run_once(topo, n, peers=peers, s3_pid=s3.pid, work=base / f"n{n}-peers-{'on' if peers else 'off'}",
                                   model_bytes=model_bytes, timeout=args.timeout, extra=extra)
                    rows.append(row)
                    print(f"N={n} peers {row.peers}: all warm in {row.all_warm_s:.2f}s (first "
                          f"{row.first_warm_s:.2f}s; N copies at the cap {row.s3_cap_bound_s:.1f}s); S3 sent "
                          f"{row.s3_copies:.2f} copies (wchar); agents: {row.agents_s3_bytes / 2**20:.0f} MiB from "
                          f"S3, {row.agents_peer_bytes / 2**20:.0f} MiB from peers", flush=True)
            topo.stop(s3)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)

    command = " ".join(["python -m bench.scaleup",
                        *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    markdown = report(rows, args=args, command=command, model_bytes=model_bytes, files=files)
    write_results("scaleup", markdown=markdown,
                  data={"command": command, "model_uri": MODEL_URI, "model_bytes": model_bytes, "files": files,
                        "s3_mbps": args.s3_mbps, "node_mbps": args.node_mbps, "machine": machine_note(),
                        "cpu_count": os.cpu_count(),
                        "rows": [{**asdict(r), "s3_copies": r.s3_copies} for r in rows]})
    if plot(rows, f"{model_bytes / 2**20:.0f} MiB model, S3 capped at {args.s3_mbps:g} MB/s shared, node links "
                  f"{args.node_mbps:g} MB/s (namespaces on one {os.cpu_count()}-core machine)") is None:
        print("matplotlib missing: no scaleup.png", file=sys.stderr)
    print(markdown)
    return 0


if __name__ == "__main__":
    with page_reporting_held():  # see bench/common.py: measure the tools, not this VM's memory hand-back
        sys.exit(main())
