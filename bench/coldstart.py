"""Cold-start benchmark: process start → ``/readyz`` 200, against the floor and against peer loaders.

Not a test. Builds a demo model of ``--size`` in a node-cache layout (an immutable build, a relative symlink under
models/s3/, a manifest with sizes and xxh3-128 digests) in a temporary directory, then, for each of ``--runs``
rounds and each method, drops the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``: needs root) and
measures a fresh process:

- ``floor``: ``python -c "import torch"`` then ``cat`` of the weight files to /dev/null — the least any
  torch process that reads every byte can cost.
- ``weightcache-server``: ``python -m server`` until ``/readyz`` answers 200, with the server's own split into
  import / wait / load / warm-up (from the ``/readyz`` body).
- ``weightcache load_model``: the server's loader alone, in a bare process.
- ``weightcache-server, fallback fetch``: the same server on a node with *no* agent and an empty cache
  (``WEIGHTCACHE_FALLBACK=fetch``, no grace): it fetches the model from S3 itself (``rclone serve s3`` on loopback,
  data on tmpfs) into a fresh directory, then loads — the seed's "download at container start" case, against the
  node-cache hit above.
- ``safetensors load_file`` and ``torch.load(mmap=True)`` (both lazy on CPU, so followed by touching every page), and
  ``runai-model-streamer`` (``SafetensorsStreamer``) on the same weights.

With ``--device cuda`` (a GPU node) the weights go to the GPU: the floor adds creating the CUDA context, the
server and its loader take the pipelined strategy (several files read at once into pinned buffers, copied to the
GPU on several streams), ``weightcache pipelined, one thread`` is the same loader one chunk at a time (what it was
before), and the peer is ``safetensors load_file(device="cuda")``; the CPU-only peers are left out.

Writes ``bench/results/coldstart.md`` (table, medians, ratios vs the floor) and ``bench/results/coldstart.json``
(``coldstart-cuda.*`` with ``--device cuda``).
Usage: ``python bench/coldstart.py --size 2GiB --runs 3``; on a GPU node
``python bench/coldstart.py --device cuda --dtype bfloat16 --size 16GiB --runs 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import drop_caches, page_reporting_held
from common.units import parse_size
from demo.s3server import EmbeddedS3, free_port
from server.demo_model import DemoShape, shape_for_size, write_demo_model

PY = sys.executable
FALLBACK = "weightcache-server, fallback fetch"
ONE_THREAD = "weightcache pipelined, one thread"
CUDA_PEER = "safetensors load_file(device=cuda)"
URI = "s3://bench/demo/"
MODEL_ID, REVISION = "benchdemo", "rev1"

# Each peer runs in a fresh interpreter and prints {"load_s": seconds spent loading, after imports}.
# BENCH_DEVICE names the device; on cuda each first creates the context (outside load_s) and synchronises at the end.
_DEVICE = """
import os, torch
device = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
if device.type == "cuda":
    torch.empty(1, device=device)
def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)
"""
PEERS: dict[str, str] = {
    "weightcache load_model": _DEVICE + """
import json, sys, time
from pathlib import Path
from server.loading import load_model
t = time.perf_counter()
m = load_model(Path(sys.argv[1]), root=Path(sys.argv[2]), device=device)
sync()
print(json.dumps({"load_s": time.perf_counter() - t, "tensors": len(m.state_dict)}))
""",
    ONE_THREAD: _DEVICE + """
import json, sys, time
from pathlib import Path
from server.formats import discover
from server.loading import PipelinedStrategy
t = time.perf_counter()
state = PipelinedStrategy(workers=1).load(discover(Path(sys.argv[1])), device)
sync()
print(json.dumps({"load_s": time.perf_counter() - t, "tensors": len(state)}))
""",
    CUDA_PEER: _DEVICE + """
import json, sys, time
from safetensors.torch import load_file
t = time.perf_counter()
state = {}
for f in sys.argv[3:]:
    state.update(load_file(f, device=str(device)))
sync()
print(json.dumps({"load_s": time.perf_counter() - t, "tensors": len(state)}))
""",
    "safetensors load_file + touch": """
import json, sys, time
import torch
from safetensors.torch import load_file
t = time.perf_counter()
state = {}
for f in sys.argv[3:]:
    state.update(load_file(f))
lazy = time.perf_counter() - t
# safetensors >= 0.5 maps the file and reads lazily on CPU: touch one byte per page, as for torch.load.
for v in state.values():
    v.view(-1).view(torch.uint8)[::4096].sum()
print(json.dumps({"load_s": time.perf_counter() - t, "lazy_s": lazy, "tensors": len(state)}))
""",
    "torch.load(mmap=True) + touch": """
import json, sys, time
import torch
t = time.perf_counter()
state = torch.load(sys.argv[-1], mmap=True, weights_only=True)
lazy = time.perf_counter() - t
# mmap is lazy: touch one byte per page so the comparison counts the disk reads the others pay for.
for v in state.values():
    v.view(-1).view(torch.uint8)[::4096].sum()
print(json.dumps({"load_s": time.perf_counter() - t, "lazy_s": lazy, "tensors": len(state)}))
""",
    "runai-model-streamer": """
import json, sys, time
import torch
from runai_model_streamer import SafetensorsStreamer
t = time.perf_counter()
state = {}
with SafetensorsStreamer() as s:
    s.stream_files(sys.argv[3:], device="cpu")
    for name, tensor in s.get_tensors():
        state[name] = tensor
print(json.dumps({"load_s": time.perf_counter() - t, "tensors": len(state)}))
""",
}


def pythonpath() -> str:
    """The repo first, then whatever the caller's PYTHONPATH held (a GPU image's extra packages, say)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))


def build(root: Path, size: int, dtype: str, *, torch_file: bool) -> tuple[list[Path], Path]:
    """The demo model in a node-cache layout, plus the same weights as a torch.save file."""
    from agent.store.cache import Cache
    from agent.store.layout import hash_file
    from agent.store.manifest import ManifestFile
    from agent.store.publish import Build
    from agent.uris import parse_model_uri

    # Built and published through the agent's own calls, so the layout is exactly what a node holds.
    cache = Cache(root, fsync=False)
    cache.ensure_layout()
    uri = parse_model_uri(URI)
    staged = root / "staged"
    shape = shape_for_size(size, itemsize=4 if dtype == "float32" else 2)
    shape = DemoShape(shape.input_dim, shape.hidden_size, shape.num_layers, shape.output_dim, dtype)
    started = time.perf_counter()
    write_demo_model(staged, shape)
    b = Build(cache, uri.model_id, REVISION)
    b.create()
    files: list[ManifestFile] = []
    for path in sorted(staged.iterdir()):
        digest = hash_file(path)
        files.append(ManifestFile(path=path.name, size=path.stat().st_size, xxh3_128=digest,
                                  key=f"demo/{path.name}", etag="bench"))
        b.adopt_file(path, digest=digest, size=path.stat().st_size, relpath=path.name)
    b.publish(uri=uri, files=files, fetch_seconds=0.0)
    staged.rmdir()
    data = b.final_dir / "data"
    weights = sorted(data.glob("*.safetensors"))
    # The same tensors for torch.load; built in a subprocess so this process never holds them.
    pt = root / "model.pt"
    if torch_file:
        subprocess.run([PY, "-c", (
            "import sys, torch\nfrom safetensors.torch import load_file\nstate = {}\n"
            "for f in sys.argv[2:]: state.update(load_file(f))\ntorch.save(state, sys.argv[1])"
        ), str(pt), *map(str, weights)], check=True)
    print(f"built {sum(f.size for f in files) / 2**30:.2f} GiB model in {time.perf_counter() - started:.1f} s "
          f"(hidden {shape.hidden_size}, {shape.num_layers} layers, {len(weights)} shards)", file=sys.stderr)
    return weights, pt


def run_floor(weights: list[Path], device: str) -> dict[str, float]:
    code = "import torch" + ("; torch.empty(1, device='cuda')" if device == "cuda" else "")
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", code], check=True)
    t1 = time.perf_counter()
    subprocess.run(["cat", *map(str, weights)], stdout=subprocess.DEVNULL, check=True)
    t2 = time.perf_counter()
    return {"wall_s": t2 - t0, "import_s": t1 - t0, "load_s": t2 - t1}


def run_server(root: Path, timeout: float, device: str, *,
               extra_env: dict[str, str] | None = None) -> dict[str, float]:
    port = free_port()
    env = {**os.environ, "WEIGHTCACHE_MODEL": URI, "WEIGHTCACHE_ROOT": str(root), "WEIGHTCACHE_PORT": str(port),
           "WEIGHTCACHE_HOST": "127.0.0.1", "WEIGHTCACHE_DEVICE": device, "WEIGHTCACHE_LOG_LEVEL": "WARNING",
           "PYTHONPATH": pythonpath(), **(extra_env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, "-m", "server"], env=env, cwd=REPO)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError("server not ready in time")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                    body = json.loads(response.read())
                    wall = time.perf_counter() - t0
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.01)
        phases = body["cold_start_seconds"]
        return {"wall_s": wall, **{f"{k}_s": v for k, v in phases.items() if k != "total"}}
    finally:
        proc.terminate()
        proc.wait(30)


def run_fallback(snapshot: Path, s3_env: dict[str, str], timeout: float, device: str) -> dict[str, float]:
    """The server with no agent: an empty cache root, the fallback fetch from S3 into a fresh directory."""
    scratch = Path(tempfile.mkdtemp(prefix="wc-coldstart-fallback-", dir="/var/tmp"))
    try:
        (scratch / "empty-root").mkdir()
        return run_server(scratch / "empty-root", timeout, device, extra_env={
            **s3_env, "WEIGHTCACHE_FALLBACK": "fetch", "WEIGHTCACHE_FALLBACK_GRACE_SECONDS": "0",
            "WEIGHTCACHE_FALLBACK_DIR": str(scratch / "fallback")})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_peer(name: str, root: Path, weights: list[Path], pt: Path, device: str) -> dict[str, float]:
    args = [PY, "-c", PEERS[name], str(root / "models/s3/bench/demo"), str(root)]
    args += [str(pt)] if name.startswith("torch.load") else list(map(str, weights))
    t0 = time.perf_counter()
    out = subprocess.run(args, check=True, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": pythonpath(), "BENCH_DEVICE": device})
    wall = time.perf_counter() - t0
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, **{k: v for k, v in result.items() if k.endswith("_s")}}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the weights go")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the model (default: a tmp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--skip", action="append", default=[], help="skip a method (repeatable)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--warm", action="store_true",
                        help="keep the page cache: the model as the agent leaves it right after fetching it")
    args = parser.parse_args()
    size = parse_size(args.size)

    workdir = Path(tempfile.mkdtemp(prefix="wc-coldstart-", dir=args.workdir))
    s3: EmbeddedS3 | None = None
    try:
        if args.device == "cuda":
            methods = ["floor", "weightcache-server", "weightcache load_model", ONE_THREAD, CUDA_PEER, FALLBACK]
        else:
            cpu_peers = [p for p in PEERS if p not in (ONE_THREAD, CUDA_PEER)]
            methods = ["floor", "weightcache-server", FALLBACK, *cpu_peers]
        methods = [m for m in methods if m not in args.skip]
        weights, pt = build(workdir, size, args.dtype, torch_file=any(m.startswith("torch.load") for m in methods))
        if FALLBACK in methods:
            # The same files as objects under s3://bench/demo/, written before rclone starts (it caches listings).
            s3 = EmbeddedS3()
            bucket_dir = s3.bucket_dir("bench") / "demo"
            bucket_dir.mkdir(parents=True, exist_ok=True)
            for f in (workdir / "models" / "s3" / "bench" / "demo").iterdir():
                shutil.copyfile(f, bucket_dir / f.name)
            s3.start()
        samples: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        dropped = True
        for run in range(args.runs):
            for method in methods:
                if not args.warm:
                    dropped &= drop_caches()
                if method == "floor":
                    sample = run_floor(weights, args.device)
                elif method == "weightcache-server":
                    sample = run_server(workdir, args.timeout, args.device)
                elif method == FALLBACK:
                    assert s3 is not None
                    sample = run_fallback(workdir, s3.env(), args.timeout, args.device)
                else:
                    sample = run_peer(method, workdir, weights, pt, args.device)
                samples[method].append(sample)
                print(f"run {run + 1}/{args.runs} {method}: " + ", ".join(f"{k} {v:.2f}" for k, v in sample.items()),
                      file=sys.stderr)
    finally:
        if s3 is not None:
            s3.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {m: {k: median([s[k] for s in ss if k in s]) for k in ss[0]} for m, ss in samples.items() if ss}
    write_results(args.out, args.size, size, args.runs, None if args.warm else dropped, summary, samples,
                  device=args.device, dtype=args.dtype)
    return 0


def write_results(out: Path, size_text: str, size: int, runs: int, dropped: bool | None,
                  summary: dict[str, dict[str, float]], samples: dict[str, list[dict[str, float]]], *,
                  device: str, dtype: str) -> None:
    """``dropped``: whether the page cache was dropped before each run; None when it was kept warm on purpose."""
    out.mkdir(parents=True, exist_ok=True)
    floor = summary.get("floor", {})
    floor_wall, floor_load = floor.get("wall_s", float("nan")), floor.get("load_s", float("nan"))
    peers = [m for m in summary
             if m not in ("floor", "weightcache-server", "weightcache load_model", FALLBACK, ONE_THREAD)]
    fastest_peer = min((summary[m]["load_s"] for m in peers), default=float("nan"))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if device == "cuda":
        machine += f", GPU {gpu_name()}"
    cuda = device == "cuda"
    flags = (f" --device cuda --dtype {dtype}" if cuda else (f" --dtype {dtype}" if dtype != "float16" else ""))
    flags += " --warm" if dropped is None else ""
    cache = ("kept warm (the model as the agent leaves it right after a fetch; torch's files cached too)"
             if dropped is None else "dropped" if dropped else "NOT dropped (not root?)")
    lines = [
        "# Cold start: process start → ready" + (" on a GPU" if cuda else ""),
        "",
        (f"Model: demo MLP, {size / 2**30:.2f} GiB {dtype} safetensors in 512 MiB shards, node-cache layout, "
        f"weights loaded onto {'the GPU' if cuda else 'the CPU'}. "
        f"Median of {runs} run(s); page cache {cache} before each "
        f"measurement. Machine: {machine}. Command: `python bench/coldstart.py{flags} --size {size_text} "
        f"--runs {runs}`."),
        "",
        "| method | process start → done (s) | × floor | load (s) | × cat | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    notes = {
        "floor": ("`python -c 'import torch'`" + (" + CUDA context" if cuda else "")
                  + " + `cat` weights > /dev/null; load = the cat"),
        "weightcache-server": "until `/readyz` 200 (weights loaded + warm-up inference ran); load = server's load phase",
        FALLBACK: "no agent, empty cache: the server fetches from S3 (loopback) itself, then loads (its wait phase is the fetch)",
        "weightcache load_model": ("the server's loader alone (pipelined: 4 threads over all files, pinned buffers, "
                                   "a stream each; manifest size check)" if cuda else
                                   "the server's loader alone (mmap + MADV_POPULATE_READ, manifest size check)"),
        ONE_THREAD: "the same pipeline with one thread: one chunk read, then copied, file after file",
        CUDA_PEER: "`safetensors.torch.load_file(f, device='cuda')` per shard",
        "safetensors load_file + touch": "`safetensors.torch.load_file` per shard (lazy on CPU), then one byte per page touched",
        "torch.load(mmap=True) + touch": "lazy mmap, then one byte per page touched (else nothing is read)",
        "runai-model-streamer": "`SafetensorsStreamer.stream_files` to cpu, owned tensors",
    }
    for method, values in summary.items():
        wall, load = values.get("wall_s", float("nan")), values.get("load_s", float("nan"))
        lines.append(f"| {method} | {wall:.2f} | {wall / floor_wall:.2f} | {load:.2f} | {load / floor_load:.2f} | "
                     f"{notes.get(method, '')} |")
    server = summary.get("weightcache-server")
    if server:
        lines += [
            "",
            "Server phases (median, s): " + ", ".join(
                f"{k.removesuffix('_s')} {v:.2f}" for k, v in server.items() if k != "wall_s"),
            "",
            *([(f"Node cache hit vs fetching at container start (fallback): ready in {server['wall_s']:.2f} s vs "
               f"{summary[FALLBACK]['wall_s']:.2f} s (S3 on loopback here; a real S3 link is slower, so the gap "
               "grows)."), ""] if FALLBACK in summary else []),
            (f"Targets: ready ≤ 1.25 × floor → {server['wall_s'] / floor_wall:.2f} × floor; "
            f"server load ({server.get('load_s', float('nan')):.2f} s) vs fastest peer load ({fastest_peer:.2f} s)."),
        ]
    stem = ("coldstart-cuda" if cuda else "coldstart") + ("-warm" if dropped is None else "")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(
        {"size_bytes": size, "dtype": dtype, "device": device, "runs": runs, "page_cache_dropped": dropped,
         "machine": machine,
         "median": summary, "samples": samples}, indent=2))
    print("\n".join(lines))


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


if __name__ == "__main__":
    with page_reporting_held():  # see bench/common.py: measure the loaders, not this VM's memory hand-back
        sys.exit(main())
