"""The hardening scenarios, each a plain function that runs one guarantee end to end and returns its figures.

The CI tests (``tests/hardening/test_*.py``) call them small; ``bench/soak.py`` calls them large and writes the
figures to ``bench/results/guarantees.{md,json}``. A broken guarantee raises :class:`ScenarioFailure` with the
evidence. Every scenario talks to real servers it is handed (an S3 server, a fault proxy, a FakeKube) and runs
the agent as ``python -m agent``; none of them patches or replaces a project function.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from tests.agent.daemon_helpers import NODE, RecordingReporter, pod_manifest
from tests.fixtures.fakekube import FakeKube
from tests.fixtures.faultproxy import FaultPlan, FaultProxy
from tests.fixtures.s3servers import S3Server
from tests.hardening.support import (
    Agent,
    KiB,
    MiB,
    agent_env,
    check,
    digests,
    make_files,
    mirrored,
    popen_cli,
    run_cli,
    staging_dirs,
    tree_digests,
    upload,
    visible_is_whole,
    wait_until,
)

Figures = dict[str, Any]


def _nothing_published(root: Path, uri: str) -> None:
    check(not os.path.lexists(mirrored(root, uri)), f"{uri} is visible although its fetch failed")
    check(not staging_dirs(root), lambda: f"staging left behind: {staging_dirs(root)}")
    manifests = list((root / "manifests").glob("*.json")) if (root / "manifests").exists() else []
    check(not manifests, lambda: f"a manifest was written for a failed fetch: {manifests}")


# ===== 1. S3 faults =============================================================================================


def fetch_through_faults(server: S3Server, bucket: str, proxy: FaultProxy, *, work: Path, plan: FaultPlan,
                         sizes: dict[str, int], seed: int = 1, concurrency: int = 16,
                         **settings: str) -> Figures:
    """Fetch a multi-file model through ``plan``'s faults; it must come out byte-identical."""
    files = make_files(seed, sizes)
    prefix = f"faults-{seed}-{plan.always or 'mix'}/"
    upload(server, bucket, prefix, files)
    uri = f"s3://{bucket}/{prefix}"
    root = work / f"cache-{seed}-{plan.always or 'mix'}"
    proxy.plan = plan
    proxy.reset_stats()
    env = agent_env(root=root, s3=server, endpoint_url=proxy.url, WEIGHTCACHE_CONCURRENCY=str(concurrency),
                    **settings)
    started = time.monotonic()
    r = run_cli("prefetch", uri, env=env, timeout=240)
    seconds = time.monotonic() - started
    stats = proxy.stats()
    check(r.returncode == 0, lambda: f"prefetch through faults failed ({r.returncode}); faults {dict(stats.faults)}"
                                     f"\n{r.stderr[-4000:]}")
    check(tree_digests(mirrored(root, uri)) == digests(files), f"{uri}: fetched bytes differ from S3's")
    return {"model_bytes": sum(sizes.values()), "files": len(sizes), "requests": stats.eligible,
            "faults": dict(stats.faults), "faults_total": stats.total_faults,
            "bytes_forwarded": stats.body_bytes, "seconds": round(seconds, 2), "bytes_lost": 0}


def faults_never_stop(server: S3Server, bucket: str, proxy: FaultProxy, *, work: Path, kind: str,
                      **settings: str) -> Figures:
    """Every GET faults: the fetch must fail after its retry budget, say why, and publish nothing."""
    files = make_files(7, {"w.bin": 2 * MiB + 3, "config.json": 500})
    prefix = f"never-{kind}/"
    upload(server, bucket, prefix, files)
    uri = f"s3://{bucket}/{prefix}"
    root = work / f"cache-never-{kind}"
    proxy.plan = FaultPlan(always=kind, rates={}, stall_seconds=5.0)  # type: ignore[arg-type]
    proxy.reset_stats()
    env = agent_env(root=root, s3=server, endpoint_url=proxy.url, WEIGHTCACHE_MAX_ATTEMPTS="3",
                    WEIGHTCACHE_READ_TIMEOUT="0.5", **settings)
    r = run_cli("prefetch", uri, env=env, timeout=120)
    stats = proxy.stats()
    check(r.returncode == 1, lambda: f"prefetch should fail when every GET faults ({kind}), got {r.returncode}:\n"
                                     f"{r.stderr[-3000:]}")
    _nothing_published(root, uri)
    return {"kind": kind, "faults_total": stats.total_faults, "stderr": _failure_line(r.stderr),
            "asyncio_errors": r.stderr.count("exception was never retrieved")}


def _failure_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.startswith("weightcache-agent: ")]
    return lines[-1] if lines else stderr.strip()[-500:]


# ===== 2. crash soak ============================================================================================


def crash_soak(server: S3Server, bucket: str, proxy: FaultProxy, *, work: Path, kills: int, seed: int,
               kills_per_round: int = 5) -> Figures:
    """``kill -9`` the one-shot agent at seeded points of a multi-file fetch, restart, repeat; then it completes.

    After every kill nothing partial may be visible at the mirrored path, and each round ends byte-identical
    with no temp file left. ``redownloaded_bytes``: bytes S3 sent beyond one copy of the model (lost in-flight
    parts and the files that had to start over).
    """
    rng = random.Random(seed)
    sizes = {"model-00001.safetensors": 12 * MiB + 123, "model-00002.safetensors": 12 * MiB,
             "model-00003.safetensors": 6 * MiB + 7, "tokenizer.json": 900 * KiB, "config.json": 700,
             "nested/extra.bin": 3 * MiB}
    files = make_files(seed, sizes)
    prefix = f"crash-{seed}/"
    upload(server, bucket, prefix, files)
    expected = digests(files)
    total = sum(sizes.values())
    uri = f"s3://{bucket}/{prefix}"
    proxy.plan = FaultPlan.none()
    done = rounds = 0
    redownloaded = 0
    points: list[dict[str, Any]] = []
    started = time.monotonic()
    while done < kills:
        root = work / f"crash-round-{rounds}"
        env = agent_env(root=root, s3=server, endpoint_url=proxy.url, WEIGHTCACHE_CONCURRENCY="4")
        proxy.reset_stats()
        in_round = 0
        while True:
            before = proxy.body_bytes_forwarded
            remaining = max(total - before, 1)
            p = popen_cli("prefetch", uri, env=env, log_path=work / f"crash-{rounds}.log")
            killed = False
            if in_round < kills_per_round and done < kills:
                frac = rng.random()
                after_bytes = frac >= 0.9  # one in ten: once every byte is in, during hash/adopt/publish
                target = before + (remaining if after_bytes else max(1, int(frac / 0.9 * remaining)))
                while p.poll() is None and proxy.body_bytes_forwarded < target:
                    time.sleep(0.002)
                if after_bytes:
                    time.sleep(rng.uniform(0, 0.3))
                if p.poll() is None:
                    p.kill()
                    killed = True
                    points.append({"round": rounds, "at_bytes": proxy.body_bytes_forwarded - before,
                                   "phase": "after-download" if after_bytes else "download"})
            rc = p.wait(timeout=240)
            visible_is_whole(root, uri, expected)  # raises on a partial model, killed or not
            if killed:
                done += 1
                in_round += 1
                continue
            check(rc == 0, lambda: f"prefetch after {in_round} kills failed ({rc}):\n"  # noqa: B023
                                   f"{(work / f'crash-{rounds}.log').read_text()[-4000:]}")  # noqa: B023
            check(visible_is_whole(root, uri, expected), f"{uri}: not visible after a successful prefetch")
            leftovers = sorted(p.name for p in (root / "tmp").iterdir())
            check(not leftovers, f"temp files left after the round completed: {leftovers}")
            break
        redownloaded += max(proxy.body_bytes_forwarded - total, 0)
        rounds += 1
    return {"kills": done, "rounds": rounds, "model_bytes": total, "files": len(sizes),
            "redownloaded_bytes": redownloaded, "bytes_lost": 0, "kill_points": points,
            "seconds": round(time.monotonic() - started, 1)}


# ===== 3. objects changing under a fetch ==========================================================================


def object_changes(server: S3Server, bucket: str, proxy: FaultProxy, *, work: Path, case: str) -> Figures:
    """Change the model in S3 while its first GET is stalled; the result is one whole revision or a clean failure.

    ``case``: ``overwrite`` (the file being fetched gets new bytes), ``delete`` (it disappears), ``gain`` (the
    prefix gains a file after it was listed), ``lose`` (a listed file not yet fetched disappears).
    """
    old = make_files(11, {"a.bin": 2 * MiB + 5, "b.bin": 700 * KiB})
    prefix = f"change-{case}-{os.getpid()}-{time.monotonic_ns()}/"
    upload(server, bucket, prefix, old)
    uri = f"s3://{bucket}/{prefix}"
    root = work / f"cache-change-{case}"
    new = dict(old)
    # The first ranged GET (a.bin's: one GET per file at concurrency 1, files in key order) stalls past the read
    # timeout, so the agent's resumed GET is the first to see what changed.
    proxy.plan = FaultPlan(always="stall", rates={}, max_faults=1, stall_seconds=3.0)
    proxy.reset_stats()
    env = agent_env(root=root, s3=server, endpoint_url=proxy.url, WEIGHTCACHE_CONCURRENCY="1",
                    WEIGHTCACHE_READ_TIMEOUT="1", WEIGHTCACHE_MAX_ATTEMPTS="4")
    log = work / f"change-{case}.log"
    p = popen_cli("prefetch", uri, env=env, log_path=log)
    try:
        wait_until(lambda: any(e.fault == "stall" for e in proxy.stats().events), timeout=60,
                   what="the stalled first GET", log=lambda: log.read_text())
        if case == "overwrite":
            new["a.bin"] = make_files(12, {"a.bin": 2 * MiB + 999})["a.bin"]
            server.put(bucket, prefix + "a.bin", new["a.bin"])
        elif case == "delete":
            del new["a.bin"]
            server.delete(bucket, prefix + "a.bin")
        elif case == "gain":
            new["c.bin"] = make_files(13, {"c.bin": 300 * KiB})["c.bin"]
            server.put(bucket, prefix + "c.bin", new["c.bin"])
        elif case == "lose":
            del new["b.bin"]
            server.delete(bucket, prefix + "b.bin")
        else:
            raise ValueError(case)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    old_d, new_d = digests(old), digests(new)
    text = log.read_text()
    if rc == 0:
        check(visible_is_whole(root, uri, old_d, new_d), f"{uri}: prefetch succeeded but nothing is visible")
        outcome = "new revision" if tree_digests(mirrored(root, uri)) == new_d else "old revision (as listed)"
    else:
        check(any(r in text for r in ("NotFound", "ObjectChanged")),
              lambda: f"{case}: the failure does not say why:\n{text[-3000:]}")
        _nothing_published(root, uri)
        outcome = "clean failure: " + ("NotFound" if "NotFound" in text else "ObjectChanged")
    proxy.plan = FaultPlan.none()
    again = run_cli("prefetch", uri, env=env)
    check(again.returncode == 0, lambda: f"{case}: the next demand failed:\n{again.stderr[-3000:]}")
    check(tree_digests(mirrored(root, uri)) == new_d, f"{case}: the next demand does not show S3's current state")
    return {"case": case, "first_fetch": outcome, "next_demand": "current revision", "mixed_models": 0}


# ===== 4. disk =================================================================================================


def budget_exceeded(server: S3Server, bucket: str, proxy: FaultProxy, *, work: Path) -> Figures:
    """A model larger than the budget fails at once with BudgetExceeded; nothing downloaded, others untouched."""
    small = make_files(21, {"s.bin": 300 * KiB})
    big = make_files(22, {"w1.bin": 2 * MiB, "w2.bin": 1 * MiB})
    upload(server, bucket, "budget-small/", small)
    upload(server, bucket, "budget-big/", big)
    root = work / "cache-budget"
    proxy.plan = FaultPlan.none()
    env = agent_env(root=root, s3=server, endpoint_url=proxy.url, WEIGHTCACHE_MAX_BYTES="2MiB")
    ok = run_cli("prefetch", f"s3://{bucket}/budget-small/", env=env)
    check(ok.returncode == 0, lambda: ok.stderr[-2000:])
    proxy.reset_stats()
    r = run_cli("prefetch", f"s3://{bucket}/budget-big/", env=env)
    check(r.returncode == 1 and "BudgetExceeded" in r.stderr, lambda: f"expected BudgetExceeded:\n{r.stderr}")
    # The listing (a few hundred bytes of XML) is how the agent learns the size; no object may be read after it.
    reads = [e.path for e in proxy.stats().events
             if e.method in ("GET", "HEAD") and "/budget-big/" in e.path.split("?")[0]]
    check(not reads, f"objects read for a model that cannot fit: {reads}")
    _nothing_published_for = mirrored(root, f"s3://{bucket}/budget-big/")
    check(not os.path.lexists(_nothing_published_for), "the over-budget model is visible")
    check(tree_digests(mirrored(root, f"s3://{bucket}/budget-small/")) == digests(small), "the other model changed")
    return {"error": _failure_line(r.stderr)[:300], "bytes_downloaded": 0, "listing_bytes": proxy.body_bytes_forwarded}


class TmpfsUnavailable(RuntimeError):
    """``mount -t tmpfs`` was refused (not root, or no CAP_SYS_ADMIN)."""


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "20m") -> Any:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        raise TmpfsUnavailable(f"mount -t tmpfs refused: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _write_pods(path: Path, pods: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(pods) if pods else "")
    os.replace(tmp, path)


def _model_state(agent: Agent, uri: str) -> dict[str, Any] | None:
    status, body = agent.get("/v1/models")
    if status != 200:
        return None
    for m in json.loads(body)["models"]:
        if m["uri"] == uri:
            return dict(m)
    return None


def disk_full(server: S3Server, bucket: str, proxy: FaultProxy, *, work: Path) -> Figures:
    """A real ENOSPC on a 20 MiB tmpfs cache root while the daemon fetches: DiskFull, temp files gone, the other
    model untouched, the daemon still serving, and the next model that fits is fetched."""
    a = make_files(31, {"a.bin": 1 * MiB})
    # Two small files take B's two open-file slots (concurrency 1); the 8 MiB one waits for a slot, and reserves
    # its space only then — after the disk has filled.
    b = make_files(32, {"a.bin": 1 * MiB, "b.bin": 1 * MiB, "c.bin": 8 * MiB})
    c = make_files(33, {"c.bin": 1 * MiB})
    for name, files in (("disk-a/", a), ("disk-b/", b), ("disk-c/", c)):
        upload(server, bucket, name, files)
    ua, ub, uc = (f"s3://{bucket}/disk-{x}/" for x in "abc")
    with small_tmpfs(work / "tmpfs") as mount:
        root = mount / "cache"
        pods_file = work / "pods.yaml"
        _write_pods(pods_file, [pod_manifest("pod-a", ua)])
        proxy.plan = FaultPlan.none()
        env = agent_env(root=root, s3=server, endpoint_url=proxy.url, WEIGHTCACHE_CONCURRENCY="1",
                        WEIGHTCACHE_PODS_FILE=str(pods_file))
        agent = Agent(env=env, log_path=work / "disk-agent.log").start()
        try:
            agent.wait_ready()
            wait_until(lambda: (_model_state(agent, ua) or {}).get("state") == "ready", timeout=60,
                       what="model A ready", log=agent.log)
            # B's first file stalls in flight; meanwhile something else fills the disk, so B's big file meets a
            # real ENOSPC when the agent reserves its space.
            proxy.plan = FaultPlan(always="stall", rates={}, max_faults=1, stall_seconds=2.0)
            proxy.reset_stats()
            _write_pods(pods_file, [pod_manifest("pod-a", ua), pod_manifest("pod-b", ub)])
            wait_until(lambda: any(e.fault == "stall" for e in proxy.stats().events), timeout=60,
                       what="B's stalled GET", log=agent.log)
            filler = mount / "filler"
            free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(free - 3 * MiB, MiB))
            finally:
                os.close(fd)
            state = wait_until(lambda: (s := _model_state(agent, ub)) and s.get("state") == "failed" and s,
                               timeout=60, what="model B failed", log=agent.log)
            check("DiskFull" in agent.log() and "no space" in str(state.get("error")),
                  lambda: f"B failed without saying the disk is full: {state}\n{agent.log()[-3000:]}")
            check(agent.get("/healthz")[0] == 200, "/healthz not 200 after a full disk")
            check(not os.path.lexists(mirrored(root, ub)), "B is visible after DiskFull")
            check(not staging_dirs(root), lambda: f"staging left: {staging_dirs(root)}")
            big_tmp = [p.name for p in (root / "tmp").iterdir() if p.stat().st_size >= 8 * MiB]
            check(not big_tmp, f"B's 8 MiB reservation was left in tmp/: {big_tmp}")
            check(tree_digests(mirrored(root, ua)) == digests(a), "model A changed after DiskFull")
            filler.unlink()
            _write_pods(pods_file, [pod_manifest("pod-a", ua), pod_manifest("pod-b", ub),
                                    pod_manifest("pod-c", uc)])
            wait_until(lambda: (_model_state(agent, uc) or {}).get("state") == "ready", timeout=60,
                       what="model C ready after the disk freed up", log=agent.log)
            check(tree_digests(mirrored(root, uc)) == digests(c), "model C differs")
            check(agent.get("/healthz")[0] == 200, "/healthz not 200")
        finally:
            agent.stop()
    return {"tmpfs": "20m", "error": str(state.get("error"))[:200], "healthz_after": 200, "other_model_intact": True,
            "next_model_ready": True}


# ===== 5. corruption ===========================================================================================


def corrupt_and_verify(server: S3Server, bucket: str, *, work: Path, flips: int = 1, seed: int = 5) -> Figures:
    """Flip bytes in cached blobs; ``weightcache-agent verify`` must find each and repair it from S3."""
    rng = random.Random(seed)
    files = make_files(seed, {"w1.bin": 1 * MiB + 1, "w2.bin": 2 * MiB, "config.json": 300})
    prefix = f"corrupt-{seed}/"
    upload(server, bucket, prefix, files)
    uri = f"s3://{bucket}/{prefix}"
    root = work / f"cache-corrupt-{seed}"
    env = agent_env(root=root, s3=server)
    r = run_cli("prefetch", uri, env=env)
    check(r.returncode == 0, lambda: r.stderr[-2000:])
    found = repaired = 0
    for i in range(flips):
        snap = Path(os.path.realpath(mirrored(root, uri)))
        victim = snap / rng.choice(sorted(files))
        offset = rng.randrange(victim.stat().st_size)
        with open(victim, "r+b") as f:  # root may write the 0444 blob: that is the corruption we simulate
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
        v = run_cli("verify", env=env)
        check(v.returncode == 0 and "REPAIRED" in v.stdout,
              lambda: f"flip {i}: verify did not repair ({v.returncode}):\n{v.stdout}\n{v.stderr[-2000:]}")  # noqa: B023
        found += v.stdout.count("REPAIRED")
        repaired += v.stdout.count("REPAIRED")
        check(tree_digests(mirrored(root, uri)) == digests(files), f"flip {i}: model not restored by verify")
    clean = run_cli("verify", "--no-repair", env=env)
    check(clean.returncode == 0 and "REPAIRED" not in clean.stdout and "BAD" not in clean.stdout,
          lambda: f"verify after repair still finds problems:\n{clean.stdout}")
    return {"flips": flips, "found": found, "repaired": repaired, "bytes_lost": 0}


# ===== 7. tenants ==============================================================================================


def tenant_policy(server: S3Server, bucket_a: str, bucket_b: str, proxy: FaultProxy, *, work: Path) -> Figures:
    """Per-namespace allowlists: team-a cannot pull team-b's bucket, nor a look-alike prefix, through the agent."""
    upload(server, bucket_a, "team-a/m/", make_files(41, {"w.bin": 200 * KiB}))
    upload(server, bucket_a, "team-a-secret/m/", make_files(42, {"w.bin": 200 * KiB}))
    upload(server, bucket_b, "m/", make_files(43, {"w.bin": 200 * KiB}))
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump({"namespaces": {"team-a": [f"s3://{bucket_a}/team-a/"],
                                                     "team-b": [f"s3://{bucket_b}/"]}}))
    own, other, lookalike = (f"s3://{bucket_a}/team-a/m/", f"s3://{bucket_b}/m/", f"s3://{bucket_a}/team-a-secret/m/")
    pods_file = work / "tenant-pods.yaml"
    _write_pods(pods_file, [pod_manifest("pa", f"{own}, {other}, {lookalike}", namespace="team-a")])
    proxy.plan = FaultPlan.none()
    proxy.reset_stats()
    root = work / "cache-tenants"
    env = agent_env(root=root, s3=server, endpoint_url=proxy.url, WEIGHTCACHE_PODS_FILE=str(pods_file),
                    WEIGHTCACHE_POLICY_FILE=str(policy))
    agent = Agent(env=env, log_path=work / "tenant-agent.log").start()
    try:
        agent.wait_ready()
        wait_until(lambda: (_model_state(agent, own) or {}).get("state") == "ready", timeout=60,
                   what="team-a's own model ready", log=agent.log)
        wait_until(lambda: agent.log().count("PolicyDenied") >= 2, timeout=20, what="two PolicyDenied events",
                   log=agent.log)
        time.sleep(0.5)
        log = agent.log()
        for denied in (other, lookalike):
            check(f"{denied} is not allowed for namespace team-a" in log, f"no PolicyDenied event for {denied}")
            check(not os.path.lexists(mirrored(root, denied)), f"{denied} was fetched for team-a")
        touched = sorted({e.path.split("?")[0] for e in proxy.stats().events if bucket_b in e.path
                          or "team-a-secret" in e.path})
        check(not touched, f"the agent sent S3 requests for denied models: {touched}")
    finally:
        agent.stop()
    return {"denied": 2, "allowed": 1, "requests_for_denied": 0}


def control_socket_private(*, work: Path) -> Figures:
    """The control socket is 0600 in a 0700 directory outside the root: another uid (an inference pod's) cannot
    connect."""
    # The other uid must reach the cache root (as a pod reads its hostPath) so that only the socket's own modes
    # stop it: ``work`` may sit below 0700 directories (pytest's basetemp), so the root lives in /tmp instead.
    base = Path(tempfile.mkdtemp(prefix="wc-sock-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        return _control_socket_private(base / "cache", work=work)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _control_socket_private(root: Path, *, work: Path) -> Figures:
    pods_file = work / "empty-pods.yaml"
    pods_file.write_text("")
    env = agent_env(root=root, WEIGHTCACHE_PODS_FILE=str(pods_file))
    agent = Agent(env=env, log_path=work / "sock-agent.log").start()
    try:
        agent.wait_ready()
        sock_path = Path(env["WEIGHTCACHE_CONTROL_SOCKET"])
        wait_until(lambda: sock_path.exists(), timeout=10, what="the control socket")
        mode_sock = stat.S_IMODE(os.stat(sock_path).st_mode)
        mode_dir = stat.S_IMODE(os.stat(sock_path.parent).st_mode)
        check(mode_sock == 0o600, f"control socket mode {oct(mode_sock)}, want 0o600")
        check(mode_dir == 0o700, f"control directory mode {oct(mode_dir)}, want 0o700")
        # The agent's own user can use it.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(sock_path))
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            reply = s.recv(100)
        check(reply.startswith(b"HTTP/1.1 200"), f"the agent's own user cannot use the socket: {reply!r}")
        probe = (
            "import json, os, socket\n"
            f"root, sock = {str(root)!r}, {str(sock_path)!r}\n"
            "out = {'uid': os.getuid(), 'root_listable': bool(os.listdir(root))}\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "try:\n"
            "    s.connect(sock); out['connect'] = 'connected'\n"
            "except OSError as e:\n"
            "    out['connect'] = type(e).__name__\n"
            "print(json.dumps(out))\n"
        )
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"

        def drop() -> None:
            os.setgid(65534)
            os.setgroups([])
            os.setuid(65534)

        r = subprocess.run([python, "-c", probe], preexec_fn=drop, capture_output=True, text=True, timeout=30,
                           check=False, cwd="/")
        check(r.returncode == 0, f"the uid-65534 probe failed: {r.stderr}")
        seen = json.loads(r.stdout)
        check(seen["uid"] == 65534 and seen["root_listable"], f"probe did not run as another uid that can read "
                                                              f"the root: {seen}")
        check(seen["connect"] == "PermissionError", f"another uid reached the control socket: {seen}")
    finally:
        agent.stop()
    return {"socket_mode": "0600", "dir_mode": "0700", "other_uid": "PermissionError"}


SECRET_KEY = "wcSECRETkey/0123456789abcdefghijklmnopqrstuv"
SESSION_TOKEN = "wcSESSIONtoken+0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ/abcdefghijklmnopqrstuvwxyz=="


def no_credentials_leak(server: S3Server, bucket: str, proxy: FaultProxy, *, work: Path) -> Figures:
    """Run the daemon at DEBUG through S3 faults, failures and bad input: no secret appears anywhere."""
    upload(server, bucket, "cred/ok/", make_files(51, {"w.bin": 3 * MiB, "c.json": 100}))
    upload(server, bucket, "cred/retried/", make_files(52, {"w.bin": 2 * MiB}))
    kube = FakeKube(token="wc-kube-bearer-" + "Z9" * 20)
    kube.start()
    agent = None
    try:
        kube.add_node(NODE)
        kubeconfig = kube.write_kubeconfig(work / "kubeconfig")
        proxy.plan = FaultPlan(seed=3, rates={"slowdown_503": 0.2, "reset_mid_body": 0.1, "truncate": 0.1})
        proxy.reset_stats()
        creds = server.with_endpoint(proxy.url)
        env = agent_env(root=work / "cache-cred", s3=creds, kubeconfig=kubeconfig, NODE_NAME=NODE,
                        WEIGHTCACHE_LOG_LEVEL="DEBUG", WEIGHTCACHE_MAX_ATTEMPTS="12")
        # moto checks no credential, so the agent may carry any secret: make them recognisable.
        env["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
        env["AWS_SESSION_TOKEN"] = SESSION_TOKEN
        agent = Agent(env=env, log_path=work / "cred-agent.log").start().wait_ready()
        kube.add_pod(pod_manifest("ok", f"s3://{bucket}/cred/ok/"))
        kube.add_pod(pod_manifest("missing", f"s3://{bucket}/cred/none/"))
        kube.add_pod(pod_manifest("bad", "s3://x/../etc/, http://evil/, s3://Bad_Bucket/k"))
        wait_until(lambda: [e for e in kube.events(involved_name="ok") if e["reason"] == "WeightsReady"],
                   timeout=60, what="WeightsReady on pod ok", log=agent.log)
        wait_until(lambda: [e for e in kube.events(involved_name="missing") if e["reason"] == "WeightsFailed"],
                   timeout=60, what="WeightsFailed on pod missing", log=agent.log)
        wait_until(lambda: [e for e in kube.events(involved_name="bad") if e["type"] == "Warning"],
                   timeout=60, what="a Warning on pod bad", log=agent.log)
        # The drawn faults above may all miss a handful of GETs (the draw hashes the presigned URL, which changes
        # every run): two certain 503s on one more model make sure the retry path logs at DEBUG too.
        proxy.plan = FaultPlan(always="slowdown_503", rates={}, max_faults=proxy.stats().total_faults + 2)
        kube.add_pod(pod_manifest("retried", f"s3://{bucket}/cred/retried/"))
        wait_until(lambda: [e for e in kube.events(involved_name="retried") if e["reason"] == "WeightsReady"],
                   timeout=60, what="WeightsReady on pod retried", log=agent.log)
        metrics = agent.get("/metrics")[1].decode()
        models = agent.get("/v1/models")[1].decode()
        events = json.dumps(kube.events())
        log = agent.log()
    finally:
        if agent is not None:
            agent.stop()
        kube.stop()
    secrets = {"aws_secret_key": SECRET_KEY, "aws_session_token": SESSION_TOKEN, "kube_bearer_token": kube.token}
    leaks = [f"{name} in {where}" for name, value in secrets.items()
             for where, text in (("log", log), ("events", events), ("metrics", metrics), ("/v1/models", models))
             if value in text or value.replace("/", "%2F").replace("+", "%2B").replace("=", "%3D") in text]
    check(not leaks, f"credentials leaked: {leaks}")
    check("DEBUG" in log, "the agent did not log at DEBUG")
    return {"log_lines_scanned": log.count("\n"), "events_scanned": len(json.loads(events)),
            "faults_during_run": proxy.stats().total_faults, "leaks": 0}


# ===== 8. Kubernetes API faults =================================================================================


def kube_faults(server: S3Server, bucket: str, *, work: Path, drops: int, storms: int, outage_seconds: float,
                seed: int = 8) -> Figures:
    """Watch drops, 410 storms and an API-server outage: every pod still gets its model and its Events."""
    rng = random.Random(seed)
    upload(server, bucket, "kube/m/", make_files(61, {"w.bin": 300 * KiB}))
    uri = f"s3://{bucket}/kube/m/"
    kube = FakeKube(bookmark_interval=0.5)
    kube.start()
    agent = None
    n = failed_lists = 0
    try:
        kube.add_node(NODE)
        kubeconfig = kube.write_kubeconfig(work / "kubeconfig")
        env = agent_env(root=work / "cache-kube", s3=server, kubeconfig=kubeconfig, NODE_NAME=NODE,
                        WEIGHTCACHE_RECONNECT_MAX_DELAY="1", WEIGHTCACHE_WATCH_INACTIVITY_TIMEOUT="5",
                        WEIGHTCACHE_READ_TIMEOUT="3", WEIGHTCACHE_CONNECT_TIMEOUT="1")
        agent = Agent(env=env, log_path=work / "kube-agent.log").start().wait_ready()
        names: list[str] = []

        def add() -> None:
            nonlocal n
            n += 1
            name = f"p{n}"
            kube.add_pod(pod_manifest(name, uri))
            names.append(name)

        def all_ready() -> bool:
            return all(any(e["reason"] == "WeightsReady" for e in kube.events(involved_name=x)) for x in names)

        add()
        wait_until(all_ready, timeout=60, what="the first pod's WeightsReady", log=agent.log)
        for _ in range(drops):  # watches cut mid-stream, pods added around the cuts
            kube.wait_for_watches(1, timeout=30)
            add()
            kube.drop_watches(graceful=rng.random() < 0.3)
            add()
            time.sleep(rng.uniform(0.1, 0.6))
        for _ in range(storms):  # 410: the history is compacted under the watch, which must relist
            kube.wait_for_watches(1, timeout=30)
            kube.compact()
            kube.drop_watches()
            add()
            times = rng.randint(1, 2)  # ...and the relist itself fails once or twice
            kube.fail_next(500, method="GET", path=r"/api/v1/pods$", times=times)
            failed_lists += times
            time.sleep(rng.uniform(0.05, 0.3))
        wait_until(all_ready, timeout=60, what="WeightsReady on every pod after drops and 410s", log=agent.log)
        deleted = names.pop(0)
        kube.stop()  # the API server goes away...
        outage_started = time.monotonic()
        during = []
        while time.monotonic() - outage_started < outage_seconds:
            time.sleep(min(1.0, outage_seconds / 3))
            # …while pods come and go (the state lives on in FakeKube and is served again after restart)
            n += 1
            name = f"p{n}"
            kube.add_pod(pod_manifest(name, uri))
            names.append(name)
            during.append(name)
        kube.delete_pod("default", deleted)
        check(agent.get("/healthz")[0] == 200, "the agent's /healthz failed during the API outage")
        kube.start()
        back = time.monotonic()
        kube.wait_for_watches(1, timeout=30)
        reconnect_seconds = time.monotonic() - back
        wait_until(all_ready, timeout=60, what="WeightsReady on pods added during the outage", log=agent.log)
        reconnects = agent.metric_sum("weightcache_watch_reconnects_total")
        check(reconnects >= drops + storms, f"weightcache_watch_reconnects_total = {reconnects}, want ≥ "
                                            f"{drops + storms}")
        # Bounded backoff: WEIGHTCACHE_RECONNECT_MAX_DELAY is 1 s, so the watch is back within a few seconds.
        check(reconnect_seconds < 10, f"the watch took {reconnect_seconds:.1f}s to come back after the outage")
        missed = [x for x in names if not any(e["reason"] == "WeightsReady" for e in kube.events(involved_name=x))]
        check(not missed, f"pods that never got WeightsReady: {missed}")
    finally:
        if agent is not None:
            agent.stop()
        kube.stop()
    return {"pods": n, "watch_drops": drops, "storms_410": storms, "list_failures_injected": failed_lists,
            "outage_seconds": outage_seconds,
            "pods_added_during_outage": len(during), "reconnects_metric": reconnects,
            "reconnect_after_outage_seconds": round(reconnect_seconds, 2), "missed": 0}


# ===== 6. bad input =============================================================================================

ALLOWED_PREFIX = "s3://allowed-models/"
_SEPARATORS = st.sampled_from([",", " ", ", ", "\n", "\t", ",,", " ,\n", "\u3000", "\x0b"])
_NASTY_SEGMENTS = st.sampled_from([
    "..", ".", "", "a", "weights.safetensors", "x" * 256, "é" * 128, "\x00", "\x01", "\x7f", "\udcff", "\ud800",
    "a\nb", "a b", "%2e%2e", "..\\..", "/", "~", "$(id)", "a\x00b", "\u202e", "\ufeff", "CON", "😀" * 70,
])
_SEGMENTS = st.one_of(_NASTY_SEGMENTS, st.text(max_size=12),
                      st.text(alphabet=st.characters(codec=None, categories=("Cs", "Cc", "Zs", "Ll")), max_size=8))
_BUCKETS = st.one_of(st.sampled_from(["allowed-models", "other-bucket", "UPPER", "a", "ab", "x" * 64, "a..b",
                                      "-a-", "b_b", "", "1.2.3.4", "a/b"]), st.text(max_size=10))
_SCHEMES = st.sampled_from(["s3://", "s3://", "s3://", "S3://", "s3:/", "http://", "file://", "", "s3:///", "gs://"])


@st.composite
def model_uris(draw: st.DrawFn) -> str:
    """URI-shaped text: mostly ``s3://bucket/seg/seg[/]``, every part drawn from valid and hostile values."""
    segments = draw(st.lists(_SEGMENTS, max_size=6))
    return draw(_SCHEMES) + draw(_BUCKETS) + "/" + "/".join(segments) + draw(st.sampled_from(["", "/", "//"]))


@st.composite
def annotations(draw: st.DrawFn) -> str:
    entries = draw(st.lists(st.one_of(model_uris(), st.text(max_size=30)), max_size=8))
    out = ""
    for e in entries:
        out += e + draw(_SEPARATORS)
    return out


class AnnotationFuzzer:
    """One in-process :class:`Reconciler` (its fetch workers are not started, so nothing is ever fetched) fed pods
    with arbitrary annotations under a policy that allows only ``ALLOWED_PREFIX``. Every entry that is not a valid,
    allowed URI must earn the pod a Warning Event; nothing may crash and nothing may appear outside the root."""

    def __init__(self, root: Path) -> None:
        from agent.cluster.policy import parse_policy
        from agent.config import load_settings
        from agent.daemon.demand import Reconciler
        from agent.store.cache import Cache
        from agent.transfer.fetch import Fetcher
        from agent.transfer.s3 import S3Client

        self.root = root
        self.loop = asyncio.new_event_loop()
        settings = load_settings(env={}, cache_dir=root, min_free_bytes=0, fsync=False)
        self.cache = Cache(root, fsync=False)
        self.cache.ensure_layout()
        self.s3 = S3Client(settings)  # never entered: no connection is ever made
        self.policy = parse_policy(f"allow: [{ALLOWED_PREFIX}]")
        self.reporter = RecordingReporter()
        self.reconciler = Reconciler(settings=settings, cache=self.cache, fetcher=Fetcher(settings, self.cache, self.s3),
                                     reporter=self.reporter, policy=lambda: self.policy)
        self.pods = self.entries = self.warnings = 0

    def feed(self, annotation: str) -> None:
        from agent.cluster.pods import PodInfo
        from agent.uris import MAX_URIS_PER_ANNOTATION, parse_annotation

        self.pods += 1
        pod = PodInfo(uid=f"uid-{self.pods}", namespace="fuzz", name=f"p{self.pods}", node_name=NODE,
                      phase="Running", annotation=annotation, has_gate=False, deleting=False)
        before = len(self.reporter.events)
        self.loop.run_until_complete(self.reconciler.upsert(pod))
        warnings = [e for e in self.reporter.events[before:] if e.type == "Warning"]
        parsed = parse_annotation(annotation)
        denied = [u for u in parsed.uris if not self.policy.allows("fuzz", u)]
        check(len(warnings) == len(parsed.errors) + len(denied),
              lambda: f"{len(warnings)} warnings for {len(parsed.errors)} invalid + {len(denied)} denied entries "
                      f"in {annotation[:200]!r}")
        read = _entries(annotation)[:MAX_URIS_PER_ANNOTATION]
        bad = [e for e in read if not _valid_and_allowed(e)]
        check(not bad or warnings, lambda: f"no Warning for bad entries {bad[:3]!r}")
        check(all(len(e.message) <= 2048 for e in warnings), "an Event message echoes unbounded input")
        self.loop.run_until_complete(self.reconciler.delete(pod.uid))
        self.entries += len(read)
        self.warnings += len(warnings)

    def close(self) -> None:
        self.loop.run_until_complete(self.reconciler.aclose())
        self.loop.close()
        check(not list((self.root / "models").iterdir()), "something was published from fuzzed input")
        outside = sorted(p.name for p in self.root.parent.iterdir() if p != self.root)
        check(not outside, f"files appeared beside the cache root: {outside}")


def _entries(annotation: str) -> list[str]:
    import re

    return [e for e in re.split(r"[\s,]+", annotation) if e]


def _valid_and_allowed(entry: str) -> bool:
    from agent.errors import InvalidUriError
    from agent.uris import parse_model_uri

    try:
        return parse_model_uri(entry).uri.startswith(ALLOWED_PREFIX)
    except InvalidUriError:
        return False


def check_uri_text(text: str) -> str:
    """Parse arbitrary text as a model URI: a clean InvalidUriError, or a path that stays inside the cache root."""
    from agent.errors import InvalidUriError
    from agent.uris import parse_model_uri

    try:
        uri = parse_model_uri(text)
    except InvalidUriError:
        return "rejected"
    _inside("/cache/root", uri.mirrored_relpath, f"URI {text!r}")
    return "accepted"


def check_object_key(relpath: str) -> str:
    """An S3 key under a model's prefix: rejected cleanly, or a relative path that stays inside the snapshot."""
    from agent.errors import InvalidUriError
    from agent.uris import validate_relative_key

    try:
        validate_relative_key(relpath, key=f"models/{relpath}")
    except InvalidUriError:
        return "rejected"
    _inside("/cache/root/snapshots/id/rev", relpath, f"key {relpath!r}")
    return "accepted"


def _inside(base: str, rel: str, what: str) -> None:
    check(all(seg not in ("", ".", "..") for seg in rel.split("/")), f"{what}: accepted with a bad segment")
    check("\x00" not in rel and not rel.startswith("/"), f"{what}: accepted a NUL or absolute path")
    rel.encode("utf-8")  # a surrogate accepted here would crash the first open(): raises UnicodeEncodeError
    check(all(len(seg.encode()) <= 255 for seg in rel.split("/")), f"{what}: accepted an overlong component")
    target = os.path.normpath(os.path.join(base, rel))
    check(target.startswith(base + "/"), f"{what}: resolves outside its root ({target})")


def fuzz(examples: int, *, root: Path, seed: int = 0) -> Figures:
    """Hypothesis-driven fuzzing of annotations (through the Reconciler), URIs and object keys."""
    counts = {"annotations": 0, "uris": 0, "keys": 0}
    outcomes: dict[str, int] = {}
    fuzzer = AnnotationFuzzer(root)
    cfg = hyp_settings(max_examples=examples, deadline=None, database=None, derandomize=seed == 0,
                       suppress_health_check=list(HealthCheck))

    @cfg
    @given(annotations())
    def fuzz_annotation(text: str) -> None:
        counts["annotations"] += 1
        fuzzer.feed(text)

    @cfg
    @given(st.one_of(model_uris(), st.text()))
    def fuzz_uri(text: str) -> None:
        counts["uris"] += 1
        r = check_uri_text(text)
        outcomes[f"uri {r}"] = outcomes.get(f"uri {r}", 0) + 1

    @cfg
    @given(st.lists(_SEGMENTS, min_size=1, max_size=5).map("/".join))
    def fuzz_key(text: str) -> None:
        counts["keys"] += 1
        r = check_object_key(text)
        outcomes[f"key {r}"] = outcomes.get(f"key {r}", 0) + 1

    started = time.monotonic()
    try:
        fuzz_annotation()
        fuzz_uri()
        fuzz_key()
    finally:
        fuzzer.close()
    return {"inputs_tried": sum(counts.values()), **counts, "annotation_entries": fuzzer.entries,
            "warning_events": fuzzer.warnings, "outcomes": outcomes, "crashes": 0, "files_outside_root": 0,
            "seconds": round(time.monotonic() - started, 1)}
