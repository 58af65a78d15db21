"""S3 client stacks side by side: which one should carry the agent's bytes (issue 10, item 6).

Not a test. The design named aiobotocore; the agent ships botocore (control plane, in threads) plus a hand-written
data plane (:mod:`agent.transfer.s3data`: a lean HTTP/1.1 client over sockets). This puts the candidates on the same data,
the same server and the same work, so the choice is measured rather than argued:

- ``plane``: today's ``agent.transfer.s3.S3Client`` — botocore lists, GETs are presigned with hmac (checked against botocore
  once per bucket), ``read_range`` ``recv_into``s a 4 MiB buffer in a worker thread and ``pwrite``s it;
- ``aiobotocore``: ``get_object(Range=…)`` on the event loop, the body streamed with ``iter_chunks(1 MiB)`` and each
  chunk ``pwrite``n from the loop;
- ``botocore+urllib3``: botocore's synchronous client in worker threads, ``get_object(Range=…)``, then urllib3's
  ``HTTPResponse.readinto`` (botocore's raw stream) into a 4 MiB buffer and ``pwrite``;
- ``awscrt``: ``awscrt.s3.S3Client`` (C, its own event-loop threads): the listing as a plain signed request, then
  one ``GET_OBJECT`` meta-request per object that the CRT splits into ranged parts and writes itself
  (``recv_filepath``).

The same work for each, in a child process of its own (so its CPU seconds and peak RSS are its own, interpreter
start-up and imports included, as a ``prefetch`` pays them): list the prefix, then GET every object in parts of
``--part-size`` with ``--concurrency`` parts in flight, into files on the local disk (preallocated with
``posix_fallocate`` where the stack lets us). No hashing, no fsync, no publish: only the S3 stack differs.

Server: ``rclone serve s3`` (``demo.s3server.EmbeddedS3``) on loopback with its data on tmpfs, over HTTP and over
HTTPS. HTTPS uses rclone's own TLS (Go, on every core) with a self-signed certificate the clients trust through
``AWS_CA_BUNDLE``: a Python TLS front (``tests/fixtures/tlsfront.py``) would be the bottleneck measured here.
Each round runs every stack once, in rotated order, the page cache dropped before every run (when root) after an
un-timed write of the model's size (as in ``bench/datapath.py``: on this VM a writer right after another process's
large free pays seconds of system time, and rotation alone keeps one stack always right after awscrt); the table
gives medians of ``--runs`` rounds, after rclone has hashed every object for its ETag (untimed).

Writes ``bench/results/s3stacks.md`` and ``s3stacks.json``. Usage:
``python -m bench.s3stacks [--runs 3] [--large-size 1GiB --large-count 2 --small-size 1MiB --small-count 40]
[--tls both] [--only plane --only awscrt]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUCKET, PREFIX = "bench", "stacks/"
MiB = 1024 * 1024
#: Each GET's receive buffer where the stack lets us choose one (the agent's own size).
BUFFER = 4 * MiB
STACKS = ("plane", "aiobotocore", "botocore+urllib3", "awscrt")

_T0 = time.perf_counter()  # the child's clock starts before any S3 library is imported


# ---------------------------------------------------------------------------------------------------------------
# The child: one stack, one download of the whole prefix, a JSON line of in-process timings on stdout.


@dataclass(frozen=True)
class Part:
    key: str
    etag: str
    size: int
    start: int
    length: int


def plan_parts(objects: list[tuple[str, int, str]], part_size: int) -> list[Part]:
    """Every object cut into parts of ``part_size``; big objects first, so the small files fill in behind."""
    parts = []
    for key, size, etag in sorted(objects, key=lambda o: -o[1]):
        for start in range(0, max(size, 1), part_size):
            parts.append(Part(key, etag, size, start, min(part_size, size - start)))
    return parts


def open_dest(dest: Path, prefix: str, key: str, size: int) -> int:
    path = dest / key[len(prefix):]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if size:
        os.posix_fallocate(fd, 0, size)
    return fd


def pwrite_all(fd: int, view: memoryview | bytes, offset: int) -> None:
    view = memoryview(view)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class Files:
    """One preallocated fd per object, closed at the end."""

    def __init__(self, dest: Path, prefix: str, objects: list[tuple[str, int, str]]) -> None:
        self.fds = {key: open_dest(dest, prefix, key, size) for key, size, _ in objects}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def child_plane(a: argparse.Namespace) -> dict[str, float]:
    import asyncio

    from agent.config import load_settings
    from agent.transfer.s3 import S3Client

    async def main() -> dict[str, float]:
        settings = load_settings(env={}, cache_dir=a.dest, concurrency=a.concurrency)
        async with S3Client(settings) as s3:
            t_ready = time.perf_counter()
            objects = [(o.key, o.size, o.etag) for o in await s3.list_objects(a.bucket, a.prefix)]
            files = Files(a.dest, a.prefix, objects)
            buffers = [bytearray(BUFFER) for _ in range(a.concurrency)]
            slots = asyncio.Semaphore(a.concurrency)

            async def get(p: Part) -> None:
                async with slots:
                    buffer = buffers.pop()
                    fd = files.fds[p.key]
                    try:
                        await s3.read_range(bucket=a.bucket, key=p.key, etag=p.etag, start=p.start, length=p.length,
                                            buffer=buffer, write=lambda off, view: pwrite_all(fd, view, off))
                    finally:
                        buffers.append(buffer)

            await asyncio.gather(*(get(p) for p in plan_parts(objects, a.part_size) if p.length))
            files.close()
        return {"ready": t_ready - _T0, "bytes": float(sum(o[1] for o in objects))}

    return asyncio.run(main())


def child_aiobotocore(a: argparse.Namespace) -> dict[str, float]:
    import asyncio

    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    async def main() -> dict[str, float]:
        config = AioConfig(max_pool_connections=a.concurrency, s3={"addressing_style": "path"},
                           signature_version="s3v4", retries={"total_max_attempts": 3, "mode": "standard"},
                           response_checksum_validation="when_required", read_timeout=60)
        async with get_session().create_client("s3", config=config) as client:
            t_ready = time.perf_counter()
            objects = []
            async for page in client.get_paginator("list_objects_v2").paginate(Bucket=a.bucket, Prefix=a.prefix):
                objects += [(o["Key"], int(o["Size"]), o["ETag"].strip('"')) for o in page.get("Contents", [])]
            files = Files(a.dest, a.prefix, objects)
            slots = asyncio.Semaphore(a.concurrency)

            async def get(p: Part) -> None:
                async with slots:
                    resp = await client.get_object(Bucket=a.bucket, Key=p.key, IfMatch=f'"{p.etag}"',
                                                   Range=f"bytes={p.start}-{p.start + p.length - 1}")
                    offset, fd = p.start, files.fds[p.key]
                    async with resp["Body"] as body:
                        async for chunk in body.iter_chunks(MiB):
                            pwrite_all(fd, chunk, offset)
                            offset += len(chunk)
                    if offset != p.start + p.length:
                        raise RuntimeError(f"{p.key}: short part at {offset}")

            await asyncio.gather(*(get(p) for p in plan_parts(objects, a.part_size) if p.length))
            files.close()
        return {"ready": t_ready - _T0, "bytes": float(sum(o[1] for o in objects))}

    return asyncio.run(main())


def child_botocore_urllib3(a: argparse.Namespace) -> dict[str, float]:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import botocore.session
    from botocore.config import Config

    config = Config(max_pool_connections=a.concurrency, s3={"addressing_style": "path"}, signature_version="s3v4",
                    retries={"total_max_attempts": 3, "mode": "standard"},
                    response_checksum_validation="when_required", read_timeout=60)
    client = botocore.session.get_session().create_client("s3", config=config)
    t_ready = time.perf_counter()
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=a.bucket, Prefix=a.prefix):
        objects += [(o["Key"], int(o["Size"]), o["ETag"].strip('"')) for o in page.get("Contents", [])]
    files = Files(a.dest, a.prefix, objects)
    local = threading.local()

    def get(p: Part) -> None:
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            buffer = local.buffer = memoryview(bytearray(BUFFER))
        resp = client.get_object(Bucket=a.bucket, Key=p.key, IfMatch=f'"{p.etag}"',
                                 Range=f"bytes={p.start}-{p.start + p.length - 1}")
        raw = resp["Body"]._raw_stream  # urllib3.response.HTTPResponse
        offset, left, fd = p.start, p.length, files.fds[p.key]
        while left:
            n = raw.readinto(buffer[:min(len(buffer), left)])
            if not n:
                raise RuntimeError(f"{p.key}: short part at {offset}")
            pwrite_all(fd, buffer[:n], offset)
            offset += n
            left -= n
        raw.release_conn()

    with ThreadPoolExecutor(a.concurrency) as pool:
        for _ in pool.map(get, [p for p in plan_parts(objects, a.part_size) if p.length]):
            pass
    files.close()
    return {"ready": t_ready - _T0, "bytes": float(sum(o[1] for o in objects))}


def child_awscrt(a: argparse.Namespace) -> dict[str, float]:
    import urllib.parse
    import xml.etree.ElementTree as ET

    from awscrt import auth, http, io, s3

    endpoint = urllib.parse.urlsplit(os.environ["AWS_ENDPOINT_URL"])
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    tls = endpoint.scheme == "https"
    elg = io.EventLoopGroup()
    bootstrap = io.ClientBootstrap(elg, io.DefaultHostResolver(elg))
    credentials = auth.AwsCredentialsProvider.new_static(os.environ["AWS_ACCESS_KEY_ID"],
                                                         os.environ["AWS_SECRET_ACCESS_KEY"])
    tls_options = None
    if tls:
        options = io.TlsContextOptions()
        if os.environ.get("AWS_CA_BUNDLE"):
            options.override_default_trust_store_from_path(None, os.environ["AWS_CA_BUNDLE"])
        tls_options = io.ClientTlsContext(options).new_connection_options()
        tls_options.set_server_name(endpoint.hostname or "127.0.0.1")
    client = s3.S3Client(
        bootstrap=bootstrap, region=region,
        tls_mode=s3.S3RequestTlsMode.ENABLED if tls else s3.S3RequestTlsMode.DISABLED,
        signing_config=s3.create_default_s3_signing_config(region=region, credential_provider=credentials),
        tls_connection_options=tls_options, part_size=a.part_size, max_active_connections_override=a.concurrency)
    t_ready = time.perf_counter()

    def request(path: str, *extra: tuple[str, str]) -> http.HttpRequest:
        return http.HttpRequest("GET", path, http.HttpHeaders([("Host", endpoint.netloc), *extra]))

    ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    objects: list[tuple[str, int, str]] = []
    token = ""
    while True:  # ListObjectsV2 as a plain signed request: the CRT has no listing of its own
        query = {"list-type": "2", "prefix": a.prefix, **({"continuation-token": token} if token else {})}
        body = bytearray()
        meta = client.make_request(type=s3.S3RequestType.DEFAULT, operation_name="ListObjectsV2",
                                   request=request(f"/{a.bucket}?{urllib.parse.urlencode(query)}"),
                                   on_body=lambda chunk, sink=body, **_: sink.extend(chunk))
        meta.finished_future.result()
        root = ET.fromstring(bytes(body))
        for item in root.iter(f"{ns}Contents"):
            objects.append((item.findtext(f"{ns}Key") or "", int(item.findtext(f"{ns}Size") or 0),
                            (item.findtext(f"{ns}ETag") or "").strip('"')))
        token = root.findtext(f"{ns}NextContinuationToken") or ""
        if root.findtext(f"{ns}IsTruncated") != "true" or not token:
            break
    metas = []
    for key, _size, etag in sorted(objects, key=lambda o: -o[1]):
        path = a.dest / key[len(a.prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        metas.append(client.make_request(
            type=s3.S3RequestType.GET_OBJECT, operation_name="GetObject", recv_filepath=str(path),
            request=request("/" + urllib.parse.quote(f"{a.bucket}/{key}"), ("If-Match", f'"{etag}"'))))
    for meta in metas:
        meta.finished_future.result()
    return {"ready": t_ready - _T0, "bytes": float(sum(o[1] for o in objects))}


CHILDREN: dict[str, Callable[[argparse.Namespace], dict[str, float]]] = {
    "plane": child_plane, "aiobotocore": child_aiobotocore, "botocore+urllib3": child_botocore_urllib3,
    "awscrt": child_awscrt,
}


def child_main(a: argparse.Namespace) -> int:
    out = CHILDREN[a.child](a)
    out["total"] = time.perf_counter() - _T0
    out["transfer"] = out["total"] - out["ready"]
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The parent: data, servers, rounds, the table.


@dataclass
class Sample:
    wall: float  # process start → exit
    transfer: float  # in the process: listing → last byte written (client start-up and imports excluded)
    cpu: float  # user + sys of the child
    rss_mb: float  # the child's peak RSS


def make_data(root: Path, *, large: tuple[int, int], small: tuple[int, int]) -> dict[str, int]:
    """The model: ``large`` = (count, size) shards of random bytes, ``small`` = (count, size) files."""
    d = root / BUCKET / PREFIX.rstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    block = os.urandom(16 * MiB)
    sizes = {}
    for i in range(large[0]):
        name = f"model-{i + 1:05d}-of-{large[0]:05d}.safetensors"
        with open(d / name, "wb") as f:
            left = large[1]
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
        sizes[name] = large[1]
    for i in range(small[0]):
        name = f"extra/file-{i:03d}.bin"
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(os.urandom(small[1]))
        sizes[name] = small[1]
    return sizes


def warm(env: dict[str, str], sizes: dict[str, int]) -> None:
    """List and HEAD everything once: rclone hashes each object for its ETag on first sight (untimed here)."""
    import botocore.session
    from botocore.config import Config

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = botocore.session.get_session().create_client(
            "s3", config=Config(s3={"addressing_style": "path"}, read_timeout=300))
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX).get("Contents", [])
        if len(listed) != len(sizes):
            raise RuntimeError(f"the server lists {len(listed)} objects, expected {len(sizes)}")
        for name in sizes:
            client.head_object(Bucket=BUCKET, Key=PREFIX + name)
        client.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def verify(source: Path, dest: Path, sizes: dict[str, int]) -> None:
    """Every file complete, and its first, middle and last 64 KiB equal to the source's."""
    for name, size in sizes.items():
        got = dest / name
        if not got.is_file() or got.stat().st_size != size:
            raise RuntimeError(f"{name}: missing or wrong size in {dest}")
        with open(source / name, "rb") as a, open(got, "rb") as b:
            for at in (0, max(size // 2 - 32768, 0), max(size - 65536, 0)):
                a.seek(at)
                b.seek(at)
                if a.read(65536) != b.read(65536):
                    raise RuntimeError(f"{name}: bytes differ near offset {at}")


def run_child(stack: str, env: dict[str, str], dest: Path, a: argparse.Namespace) -> Sample:
    from bench.common import run_timed

    cmd = [sys.executable, "-m", "bench.s3stacks", "--child", stack, "--dest", str(dest),
           "--part-size", str(a.part_size), "--concurrency", str(a.concurrency)]
    t0 = os.times()
    timed = run_timed(cmd, env=env, timeout=600)
    t1 = os.times()
    if timed.returncode != 0:
        raise RuntimeError(f"{stack} failed ({timed.returncode}):\n{timed.output[-3000:]}")
    line = next(x for x in timed.output.splitlines() if x.startswith("RESULT "))
    inner = json.loads(line.removeprefix("RESULT "))
    cpu = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
    return Sample(wall=timed.seconds, transfer=inner["transfer"], cpu=cpu, rss_mb=timed.max_rss_mb)


def rotated(items: tuple[str, ...] | list[str], by: int) -> Iterator[str]:
    n = len(items)
    for i in range(n):
        yield items[(i + by) % n]


def main(argv: list[str] | None = None) -> int:
    from common.units import parse_size

    parser = argparse.ArgumentParser(prog="python -m bench.s3stacks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--large-size", default="1GiB")
    parser.add_argument("--large-count", type=int, default=2)
    parser.add_argument("--small-size", default="1MiB")
    parser.add_argument("--small-count", type=int, default=40)
    parser.add_argument("--part-size", default="64MiB", help="ranged-GET part size, every stack (8–64 MiB)")
    parser.add_argument("--concurrency", type=int, default=8, help="parts in flight, every stack")
    parser.add_argument("--tls", choices=["http", "https", "both"], default="both")
    parser.add_argument("--only", action="append", choices=STACKS, default=[])
    parser.add_argument("--dest", type=Path, default=None, help="download parent on the local disk (not tmpfs)")
    # Child mode (internal): run one stack and print its timings.
    parser.add_argument("--child", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--bucket", default=BUCKET, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default=PREFIX, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    a.part_size = parse_size(str(a.part_size))
    if a.child:
        return child_main(a)

    from bench.common import drop_caches, machine_note, median, write_results
    from bench.datapath import settle
    from demo.s3server import EmbeddedS3

    stacks = tuple(s for s in STACKS if not a.only or s in a.only)
    schemes = ["http", "https"] if a.tls == "both" else [a.tls]
    large = (a.large_count, parse_size(a.large_size))
    small = (a.small_count, parse_size(a.small_size))
    data_dir = Path(tempfile.mkdtemp(prefix="wc-s3stacks-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    dest_parent = a.dest or Path(tempfile.mkdtemp(prefix="wc-s3stacks-dest-", dir="/var/tmp"))
    dest = dest_parent / "dest"
    samples: dict[tuple[str, str], list[Sample]] = {}
    dropped = True
    load_before = os.getloadavg()[0]
    try:
        sizes = make_data(data_dir, large=large, small=small)
        total = sum(sizes.values())
        print(f"data: {total / 2**30:.2f} GiB ({large[0]} × {a.large_size} + {small[0]} × {a.small_size}); "
              f"stacks: {', '.join(stacks)}; downloads into {dest}", file=sys.stderr, flush=True)
        for scheme in schemes:
            with EmbeddedS3(data_dir=data_dir, tls=scheme == "https") as server:
                env = {**os.environ, **server.env(), "PYTHONPATH": str(REPO), "AWS_REGION": "us-east-1",
                       "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
                for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
                    env.pop(name, None)
                warm(server.env(), sizes)
                for run in range(a.runs):
                    for stack in rotated(stacks, run):
                        shutil.rmtree(dest, ignore_errors=True)
                        dest.mkdir(parents=True)
                        # Rotation keeps the cyclic order, so one stack always ran right after awscrt (1.2 GB
                        # freed): the settling write makes every stack meet the page cache alike (bench/datapath.py).
                        settle(dest, total)
                        dropped = drop_caches() and dropped
                        s = run_child(stack, env, dest, a)
                        verify(data_dir / BUCKET / PREFIX.rstrip("/"), dest, sizes)
                        samples.setdefault((scheme, stack), []).append(s)
                        print(f"  {scheme} run {run + 1}: {stack:17s} wall {s.wall:6.2f} s  transfer "
                              f"{s.transfer:6.2f} s  cpu {s.cpu:6.2f} s  rss {s.rss_mb:5.0f} MB",
                              file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(dest_parent, ignore_errors=True)

    data: list[dict[str, Any]] = []
    for (scheme, stack), ss in samples.items():
        data.append({"scheme": scheme, "stack": stack, "bytes": total, "wall": median([s.wall for s in ss]),
                     "transfer": median([s.transfer for s in ss]), "cpu": median([s.cpu for s in ss]),
                     "peak_rss_mb": max(s.rss_mb for s in ss), "samples": [s.__dict__ for s in ss]})
    meta = {"command": ("python -m bench.s3stacks " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
            "bytes": total, "large": [large[0], a.large_size], "small": [small[0], a.small_size],
            "part_size": a.part_size, "concurrency": a.concurrency, "runs": a.runs, "dropped": dropped,
            "loadavg": [load_before, os.getloadavg()[0]], "machine": machine_note()}
    md = render(data, meta)
    print(md)
    write_results("s3stacks", markdown=md, data={"meta": meta, "results": data})
    return 0


def render(data: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown table (medians; the wall's spread beside them, for a machine that is not quiet)."""
    from bench.common import markdown_table

    gib = meta["bytes"] / 2**30
    rows: list[list[object]] = []
    base = {d["scheme"]: d["wall"] for d in data if d["stack"] == "plane"}
    order = {name: i for i, name in enumerate(STACKS)}
    for d in sorted(data, key=lambda d: (d["scheme"] != "http", order[d["stack"]])):
        walls = [s["wall"] for s in d["samples"]]
        vs = f"{base[d['scheme']] / d['wall']:.2f}×" if d["scheme"] in base else "—"
        rows.append([d["scheme"], d["stack"], f"{d['wall']:.2f}", f"{min(walls):.2f}–{max(walls):.2f}",
                     f"{d['transfer']:.2f}", f"{gib / d['transfer']:.2f}", vs, f"{d['cpu']:.2f}",
                     f"{d['cpu'] / gib:.2f}", f"{d['peak_rss_mb']:.0f}"])
    (n_large, large), (n_small, small) = meta["large"], meta["small"]
    dropped = "dropped before every run" if meta["dropped"] else "NOT dropped (not root)"
    return (f"# S3 client stacks, side by side\n\n`{meta['command']}` — {gib:.2f} GiB ({n_large} × {large} + "
            f"{n_small} × {small}) from `rclone serve s3` on loopback (data on tmpfs) to the local disk; "
            f"{meta['concurrency']} ranged GETs of ≤ {meta['part_size'] / MiB:g} MiB in flight for every stack; "
            f"median of {meta['runs']} rotated rounds; page cache {dropped}"
            + (f"; 1-minute load average {meta['loadavg'][0]:.1f} at the start, {meta['loadavg'][1]:.1f} at the end"
               if meta.get("loadavg") else "") + ".\n\n"
            "*wall*: child process start → exit (interpreter, imports, client start-up included), median and "
            "range; *transfer*: inside the process, listing → last byte written; *vs plane*: today's plane wall "
            "÷ this wall (> 1 is faster); CPU: user + sys of the child; RSS: the child's peak.\n\n"
            + markdown_table(["scheme", "stack", "wall (s)", "wall range", "transfer (s)", "transfer GiB/s",
                              "vs plane", "CPU (s)", "CPU s/GiB", "peak RSS (MB)"], rows)
            + f"\n\n{meta['machine']}\n")


if __name__ == "__main__":
    from bench.common import page_reporting_held

    with page_reporting_held():  # see bench/common.py: measure the tools, not this VM's memory hand-back
        sys.exit(main())
