"""``make demo``: the whole flow on one machine, with real processes and a real S3 server on loopback.

embedded S3 (rclone) ← demo model (~1 GiB, sharded safetensors)
pod 1 annotated → weightcache-agent run --pods-file → S3 → local cache → weightcache-server (waiting) → ready
pod 2, same model → cache hit → second server ready with near-zero wait
Everything started here is stopped before the demo exits, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from demo.s3server import EmbeddedS3, free_port

MODEL_URI = "s3://models/demo-llm/"
BOLD, DIM, GREEN, RESET = ("\033[1m", "\033[2m", "\033[32m", "\033[0m") if sys.stdout.isatty() else ("",) * 4

POD_TEMPLATE = """\
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: inference
  annotations:
    weightcache.io/models: "{uri}"
spec:
  nodeName: demo-node
  readinessGates: [{{conditionType: weightcache.io/weights-ready}}]
  containers: [{{name: server, image: weightcache-server}}]
"""


def say(msg: str) -> None:
    print(f"{BOLD}==>{RESET} {msg}", flush=True)


def http_json(url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def scrape(url: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (enough for a report)."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"^(\S+)\s+(\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
    return out


class Processes:
    """Every child process of the demo, so that all of them are stopped whatever happens."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        f = open(log, "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        f.close()
        self.procs.append((name, p))
        return p

    def stop_all(self) -> list[str]:
        for _name, p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        stuck = []
        for name, p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                stuck.append(name)
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        return stuck


def wait_until(pred: Any, *, timeout: float, what: str, interval: float = 0.1, on_tick: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if on_tick:
            on_tick()
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", help="demo model size (default 1GiB)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, cache) afterwards")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="weightcache-demo-"))
    procs = Processes()
    s3 = EmbeddedS3()
    t_start = time.monotonic()
    try:
        model_dir = s3.bucket_dir("models") / "demo-llm"
        say(f"writing a {args.size} sharded demo model into the embedded S3 bucket (s3://models/demo-llm/)")
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "server.demo_model", "--size", args.size, str(model_dir)],
                       check=True, stdout=subprocess.DEVNULL)
        files = sorted(p for p in model_dir.rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files)
        print(f"    {len(files)} objects, {total / 2**20:.0f} MiB, in {time.monotonic() - t:.1f}s")
        say(f"starting the embedded S3 server (rclone serve s3) on loopback; work dir {work}")
        s3.start()
        env = {**os.environ, **s3.env(), "PYTHONUNBUFFERED": "1"}

        cache = work / "cache"
        pods = work / "pods.yaml"
        pods.write_text("")
        agent_port = free_port()
        say("starting weightcache-agent run --pods-file (the DaemonSet, minus Kubernetes)")
        procs.start("agent", [sys.executable, "-m", "agent", "run", "--pods-file", str(pods), "--cache-dir",
                              str(cache), "--metrics-port", str(agent_port), "--metrics-host", "127.0.0.1",
                              "--log-format", "text", "--file-poll-interval", "0.2"], env, work / "agent.log")
        agent = f"http://127.0.0.1:{agent_port}"
        wait_until(lambda: _ok(f"{agent}/readyz"), timeout=30, what="the agent")

        say(f"pod infer-1 is scheduled with weightcache.io/models: {MODEL_URI}")
        pods.write_text(POD_TEMPLATE.format(name="infer-1", uri=MODEL_URI))
        t_sched = time.monotonic()
        server1 = _start_server(procs, env, cache, work, "server-1")
        last = [0.0]

        tty = sys.stdout.isatty()

        def show_progress() -> None:
            if time.monotonic() - last[0] < (0.3 if tty else 2.0):
                return
            last[0] = time.monotonic()
            fetched = sum(v for k, v in scrape(f"{agent}/metrics").items()
                          if k.startswith("weightcache_fetch_bytes_total{"))  # S3 and peers
            pct = 100 * fetched / total if total else 0
            bar = "#" * int(pct / 4) + "-" * (25 - int(pct / 4))
            print(f"{chr(13) if tty else ''}    agent fetching [{bar}] {pct:5.1f}%  {fetched / 2**20:7.0f} MiB",
                  end="" if tty else "\n", flush=True)

        wait_until(lambda: _model_ready(agent), timeout=600, what="the agent to fetch the model",
                   on_tick=show_progress)
        t_fetched = time.monotonic()
        last[0] = 0.0
        show_progress()
        if tty:
            print()
        wait_until(lambda: _ok(f"{server1}/readyz"), timeout=300, what="server 1 to become ready")
        t_ready1 = time.monotonic()
        status, answer = http_json(f"{server1}/v1/predict", {"inputs": [[0.5] * 64]})
        if status != 200:
            raise RuntimeError(f"predict failed: {status} {answer}")
        outputs = answer["outputs"][0]
        print(f"    {GREEN}server 1 ready{RESET}; POST /v1/predict → {len(outputs)} outputs, "
              f"first {', '.join(f'{x:.3f}' for x in outputs[:3])} …")
        phases1 = _phases(server1)

        say("pod infer-2 is scheduled on the same node, same model")
        pods.write_text(POD_TEMPLATE.format(name="infer-1", uri=MODEL_URI) + "---\n" +
                        POD_TEMPLATE.format(name="infer-2", uri=MODEL_URI))
        t_sched2 = time.monotonic()
        server2 = _start_server(procs, env, cache, work, "server-2")
        wait_until(lambda: _ok(f"{server2}/readyz"), timeout=300, what="server 2 to become ready")
        t_ready2 = time.monotonic()
        status, _ = http_json(f"{server2}/v1/predict", {"inputs": [[0.25] * 64]})
        phases2 = _phases(server2)
        time.sleep(0.5)
        m = scrape(f"{agent}/metrics")
        hits = m.get('weightcache_cache_requests_total{result="hit"}', 0)
        misses = m.get('weightcache_cache_requests_total{result="miss"}', 0)
        events = [line for line in (work / "agent.log").read_text().splitlines() if "Weights" in line]

        fetch_s = t_fetched - t_sched
        print()
        print(f"{BOLD}weightcache demo report{RESET}")
        print(f"  model              {MODEL_URI}  {total / 2**30:.2f} GiB in {len(files)} objects")
        print(f"  fetch (S3 → NVMe)  {fetch_s:.2f}s  ≈ {total / fetch_s / 2**20:.0f} MiB/s (incl. listing, "
              "xxh3 verification, atomic publish)")
        print(f"  pod 1 (miss)       scheduled → ready {t_ready1 - t_sched:.2f}s   server phases: {_fmt(phases1)}")
        print(f"  pod 2 (hit)        scheduled → ready {t_ready2 - t_sched2:.2f}s   server phases: {_fmt(phases2)}")
        print(f"  cache requests     hit={hits:.0f} miss={misses:.0f}  (hit rate {hits / max(hits + misses, 1):.0%})")
        print(f"  pod Events         {DIM}(kubectl describe pod would show these){RESET}")
        for e in events[-6:]:
            print(f"    {DIM}{e[:160]}{RESET}")
        if status != 200 or hits < 1 or misses < 1:
            raise RuntimeError("the second pod was not served from the cache")
        return 0
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        for log in sorted(work.glob("*.log")):
            print(f"--- last lines of {log.name} ---", file=sys.stderr)
            print("\n".join(log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stuck = procs.stop_all()
        s3.stop()
        if stuck:
            print(f"processes that ignored SIGTERM (killed): {stuck}", file=sys.stderr)
        say(f"stopped everything ({'kept' if args.keep else 'removed'} {work}); "
            f"demo took {time.monotonic() - t_start:.0f}s")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _ok(url: str) -> bool:
    try:
        return http_json(url, timeout=2)[0] == 200
    except OSError:
        return False


def _model_ready(agent: str) -> bool:
    try:
        _, body = http_json(f"{agent}/v1/models")
    except OSError:
        return False
    return any(m["uri"] == MODEL_URI and m["state"] == "ready" for m in body.get("models", []))


def _start_server(procs: Processes, env: dict[str, str], cache: Path, work: Path, name: str) -> str:
    port = free_port()
    senv = {**env, "WEIGHTCACHE_ROOT": str(cache), "WEIGHTCACHE_MODEL": MODEL_URI, "WEIGHTCACHE_PORT": str(port),
            "WEIGHTCACHE_HOST": "127.0.0.1", "WEIGHTCACHE_DEVICE": "cpu", "WEIGHTCACHE_WAIT_TIMEOUT_SECONDS": "600"}
    procs.start(name, [sys.executable, "-m", "server"], senv, work / f"{name}.log")
    return f"http://127.0.0.1:{port}"


def _phases(server: str) -> dict[str, float]:
    m = scrape(f"{server}/metrics")
    out = {}
    for key, v in m.items():
        found = re.match(r'weightcache_server_cold_start_seconds\{phase="(\w+)"\}', key)
        if found:
            out[found.group(1)] = v
    return out


def _fmt(phases: dict[str, float]) -> str:
    order = ["import", "wait", "load", "warmup"]
    return "  ".join(f"{k} {phases[k]:.2f}s" for k in order if k in phases)


if __name__ == "__main__":
    sys.exit(main())
