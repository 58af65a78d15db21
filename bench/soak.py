"""Soak run of the hardening guarantees: every scenario of ``tests/hardening/scenarios.py`` at full size.

Not a benchmark of speed: it is the evidence behind the README's "Guarantees" table. The CI tests in
``tests/hardening/`` run the same scenario functions small; this runs them large, one after another (never in
parallel: the figures must not depend on how busy the machine is), against real servers on loopback:
``rclone serve s3`` and moto (``tests/fixtures/s3servers.py``), each behind a fault proxy
(``tests/fixtures/faultproxy.py``), FakeKube for the Kubernetes API, and the agent as ``python -m agent``.

The areas, at full size:
  1 s3-faults       a multi-file model through 503s, resets and truncated bodies at the proxy's default rates
                    (5 % / 2 % / 2 % of ranged GETs), several seeds; each fault kind alone; faults that never stop
  2 crash           ``kill -9`` of the agent at 20 seeded points across a multi-file fetch, restarted each time
  3 object-changes  an object overwritten / deleted, the prefix gaining / losing a file, mid-fetch
  4 disk            a model over the budget; a real ENOSPC on a 20 MiB tmpfs (needs root for ``mount``)
  5 corruption      20 bytes flipped in cached blobs, one at a time, each found and repaired by ``verify``
  6 bad-input       10,000 hypothesis cases each of annotations (through the Reconciler), URIs and object keys
  7 tenants         per-namespace allowlists, the control socket against another uid, no credential in any output
  8 kube            20 watch drops, 10 410-storms, then the API server down for 60 s while pods come and go

A broken guarantee does not stop the run: the area is marked FAILED with the evidence, the others still run, and
the exit status is 1. Writes ``bench/results/guarantees.md`` and ``guarantees.json`` (``--quick``: small sizes, a
smoke test of this script, written to ``guarantees-quick.*`` so it never overwrites the real figures).

Usage: ``python -m bench.soak [--quick] [--only AREA ...] [--work-dir DIR]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import markdown_table, write_results
from tests.fixtures.faultproxy import DEFAULT_RATES, FaultPlan, FaultProxy
from tests.fixtures.s3servers import S3Server, start_moto, start_rclone
from tests.hardening import scenarios
from tests.hardening.support import MiB, ScenarioFailure

AREAS = ("s3-faults", "crash", "object-changes", "disk", "corruption", "bad-input", "tenants", "kube")
TITLES = {
    "s3-faults": "1. S3 faults", "crash": "2. Crash soak", "object-changes": "3. Objects changing mid-fetch",
    "disk": "4. Disk", "corruption": "5. Corruption", "bad-input": "6. Bad input", "tenants": "7. Tenants",
    "kube": "8. Kubernetes API faults",
}
GUARANTEES = {
    "s3-faults": "a model comes out byte-identical through S3 faults; when they never stop, a clean failure "
                 "with the reason and nothing published",
    "crash": "after any kill -9 nothing partial is visible; the restarted agent finishes byte-identical, "
             "no temp file left",
    "object-changes": "one whole revision or a clean failure, never a mix; the next demand shows S3's state",
    "disk": "over-budget: refused before any object is read; ENOSPC: DiskFull, no temp file, the other model "
            "intact, the daemon serving, the next model fetched",
    "corruption": "every flipped byte found by verify and repaired from S3",
    "bad-input": "no crash, a Warning Event for every invalid or denied entry, nothing resolves outside the root",
    "tenants": "no S3 request for a model a namespace may not use; control socket refuses another uid; no "
               "credential in logs, Events, metrics or the status API",
    "kube": "every pod gets its model and Events through watch drops, 410 storms and an API outage; bounded "
            "reconnect backoff; reconnects in the metrics",
}


@dataclass(frozen=True)
class Sizes:
    """How big each area runs: full (the published figures) or quick (a smoke test of this script)."""

    fault_seeds: tuple[int, ...]
    fault_shards: int
    fault_shard_bytes: int
    kills: int
    flips: int
    fuzz_examples: int
    kube_drops: int
    kube_storms: int
    kube_outage_s: float


FULL = Sizes(fault_seeds=tuple(range(1, 9)), fault_shards=8, fault_shard_bytes=32 * MiB, kills=20, flips=20,
             fuzz_examples=10_000, kube_drops=20, kube_storms=10, kube_outage_s=60.0)
QUICK = Sizes(fault_seeds=(1,), fault_shards=4, fault_shard_bytes=4 * MiB, kills=3, flips=2, fuzz_examples=200,
              kube_drops=2, kube_storms=1, kube_outage_s=3.0)


@dataclass
class Run:
    """One scenario call: its parameters, its figures (or the evidence of the broken guarantee), its time."""

    area: str
    scenario: str
    params: dict[str, Any]
    ok: bool = False
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class Lab:
    """The servers every area shares (started lazily, stopped at the end) and a fresh work dir per scenario."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._running: dict[str, Any] = {}
        self._proxies: dict[str, FaultProxy] = {}

    def server(self, name: str) -> S3Server:
        if name not in self._running:
            self._running[name] = start_rclone() if name == "rclone" else start_moto()
        server: S3Server = self._running[name].server
        return server

    def proxy(self, name: str) -> FaultProxy:
        if name not in self._proxies:
            self._proxies[name] = FaultProxy(self.server(name), FaultPlan.none()).start()
        proxy = self._proxies[name]
        proxy.plan = FaultPlan.none()
        proxy.reset_stats()
        return proxy

    @contextmanager
    def bucket(self, name: str) -> Iterator[str]:
        """A fresh bucket per scenario, deleted after it: the soak's models never pile up in rclone's tmpfs."""
        server = self.server(name)
        bucket = f"wc-soak-{uuid.uuid4().hex[:12]}"
        server.create_bucket(bucket)
        try:
            yield bucket
        finally:
            try:
                server.delete_bucket(bucket)
            except Exception as e:  # noqa: BLE001 - cleanup must not hide the scenario's own outcome
                print(f"  (could not delete bucket {bucket}: {e})", flush=True)

    def workdir(self, label: str) -> Path:
        path = self.base / f"{label}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    def close(self) -> None:
        for proxy in self._proxies.values():
            proxy.stop()
        for running in self._running.values():
            running.stop()


def attempt(runs: list[Run], area: str, params: dict[str, Any], scenario: Callable[..., dict[str, Any]],
            *args: Any, **kwargs: Any) -> Run:
    """Run ``scenario(*args, **kwargs)``, timed; a broken guarantee (or any crash of the scenario) is recorded,
    not raised, so the other areas still run."""
    run = Run(area=area, scenario=scenario.__name__, params=params)
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    print(f"[{area}] {run.scenario}({shown}) ...", flush=True)
    started = time.monotonic()
    try:
        run.figures = scenario(*args, **kwargs)
        run.ok = True
    except Exception as e:  # noqa: BLE001 - ScenarioFailure or anything else: record it, go on with the rest
        run.error = f"{type(e).__name__}: {e}"[-4000:]
        if not isinstance(e, ScenarioFailure):
            run.error += "\n" + traceback.format_exc()[-3000:]
    run.seconds = round(time.monotonic() - started, 1)
    status = "ok" if run.ok else "FAILED: " + run.error.splitlines()[0][:300]
    print(f"[{area}] {run.scenario}: {status} ({run.seconds:.1f}s)", flush=True)
    runs.append(run)
    return run


# ----- the areas ------------------------------------------------------------------------------------------------


def area_s3_faults(lab: Lab, sizes: Sizes, runs: list[Run]) -> None:
    files = {f"model-{i + 1:05d}-of-{sizes.fault_shards:05d}.safetensors": sizes.fault_shard_bytes + i * 4099
             for i in range(sizes.fault_shards)}
    files |= {"tokenizer.json": 2 * MiB + 17, "config.json": 700, "generation_config.json": 180}
    rates = {k: v for k, v in DEFAULT_RATES.items() if v}
    for seed in sizes.fault_seeds:
        with lab.bucket("rclone") as bucket:
            attempt(runs, "s3-faults", {"seed": seed, "files": len(files),
                                        "model_MiB": round(sum(files.values()) / MiB), "rates": rates},
                    scenarios.fetch_through_faults, lab.server("rclone"), bucket, lab.proxy("rclone"),
                    work=lab.workdir(f"faults-{seed}"), plan=FaultPlan(seed=seed, rates=rates), sizes=files,
                    seed=seed)
    # Each kind alone, three times (a lying ETag once: it means "the object changed", which is relisted).
    for kind in ("slowdown_503", "error_500", "reset_mid_body", "truncate", "stall", "wrong_etag"):
        limit = 1 if kind == "wrong_etag" else 3
        with lab.bucket("rclone") as bucket:
            attempt(runs, "s3-faults", {"kind": kind, "faults": limit},
                    scenarios.fetch_through_faults, lab.server("rclone"), bucket, lab.proxy("rclone"),
                    work=lab.workdir(f"kind-{kind}"), concurrency=4,
                    plan=FaultPlan(always=kind, rates={}, max_faults=limit, stall_seconds=30.0),
                    sizes={"w.bin": 3 * MiB + 17, "config.json": 100}, WEIGHTCACHE_READ_TIMEOUT="1")
    for kind in ("slowdown_503", "reset_mid_body", "stall", "wrong_etag"):
        with lab.bucket("rclone") as bucket:
            attempt(runs, "s3-faults", {"kind": kind}, scenarios.faults_never_stop, lab.server("rclone"), bucket,
                    lab.proxy("rclone"), work=lab.workdir(f"never-{kind}"), kind=kind)


def area_crash(lab: Lab, sizes: Sizes, runs: list[Run]) -> None:
    with lab.bucket("rclone") as bucket:
        attempt(runs, "crash", {"kills": sizes.kills, "seed": 20}, scenarios.crash_soak, lab.server("rclone"),
                bucket, lab.proxy("rclone"), work=lab.workdir("crash"), kills=sizes.kills, seed=20)


def area_object_changes(lab: Lab, sizes: Sizes, runs: list[Run]) -> None:
    for case in ("overwrite", "delete", "gain", "lose"):
        with lab.bucket("rclone") as bucket:
            attempt(runs, "object-changes", {"case": case}, scenarios.object_changes, lab.server("rclone"),
                    bucket, lab.proxy("rclone"), work=lab.workdir(f"change-{case}"), case=case)


def area_disk(lab: Lab, sizes: Sizes, runs: list[Run]) -> None:
    with lab.bucket("rclone") as bucket:
        attempt(runs, "disk", {"budget": "2MiB", "model": "3MiB"}, scenarios.budget_exceeded,
                lab.server("rclone"), bucket, lab.proxy("rclone"), work=lab.workdir("budget"))
    with lab.bucket("rclone") as bucket:
        attempt(runs, "disk", {"tmpfs": "20m"}, scenarios.disk_full, lab.server("rclone"), bucket,
                lab.proxy("rclone"), work=lab.workdir("diskfull"))


def area_corruption(lab: Lab, sizes: Sizes, runs: list[Run]) -> None:
    with lab.bucket("moto") as bucket:
        attempt(runs, "corruption", {"flips": sizes.flips, "seed": 5}, scenarios.corrupt_and_verify,
                lab.server("moto"), bucket, work=lab.workdir("corrupt"), flips=sizes.flips, seed=5)


def area_bad_input(lab: Lab, sizes: Sizes, runs: list[Run]) -> None:
    # The fuzzer checks that nothing appears beside its root, so the root gets a fresh directory of its own.
    # seed=1: not derandomized, so each soak run tries inputs the (derandomized) CI run never did.
    attempt(runs, "bad-input", {"examples_each": sizes.fuzz_examples, "derandomized": False}, scenarios.fuzz,
            sizes.fuzz_examples, root=lab.workdir("fuzz") / "cache", seed=1)


def area_tenants(lab: Lab, sizes: Sizes, runs: list[Run]) -> None:
    with lab.bucket("rclone") as a, lab.bucket("rclone") as b:
        attempt(runs, "tenants", {}, scenarios.tenant_policy, lab.server("rclone"), a, b, lab.proxy("rclone"),
                work=lab.workdir("tenants"))
    attempt(runs, "tenants", {"other_uid": 65534}, scenarios.control_socket_private, work=lab.workdir("socket"))
    with lab.bucket("moto") as bucket:
        attempt(runs, "tenants", {"log_level": "DEBUG"}, scenarios.no_credentials_leak, lab.server("moto"),
                bucket, lab.proxy("moto"), work=lab.workdir("creds"))


def area_kube(lab: Lab, sizes: Sizes, runs: list[Run]) -> None:
    with lab.bucket("moto") as bucket:
        attempt(runs, "kube", {"drops": sizes.kube_drops, "storms": sizes.kube_storms,
                               "outage_s": sizes.kube_outage_s},
                scenarios.kube_faults, lab.server("moto"), bucket, work=lab.workdir("kube"), drops=sizes.kube_drops,
                storms=sizes.kube_storms, outage_seconds=sizes.kube_outage_s, seed=60)


RUNNERS: dict[str, Callable[[Lab, Sizes, list[Run]], None]] = {
    "s3-faults": area_s3_faults, "crash": area_crash, "object-changes": area_object_changes, "disk": area_disk,
    "corruption": area_corruption, "bad-input": area_bad_input, "tenants": area_tenants, "kube": area_kube,
}


# ----- figures ------------------------------------------------------------------------------------------------


def _faults(run: Run) -> int:
    f = run.figures
    if run.scenario in ("fetch_through_faults", "faults_never_stop"):
        return int(f["faults_total"])
    if run.scenario == "crash_soak":
        return int(f["kills"])
    if run.scenario == "object_changes":
        return 1  # the change itself (the stall that holds the fetch open is a tool, not a fault counted)
    if run.scenario in ("budget_exceeded", "disk_full"):
        return 1
    if run.scenario == "corrupt_and_verify":
        return int(f["flips"])
    if run.scenario == "no_credentials_leak":
        return int(f["faults_during_run"])
    if run.scenario == "kube_faults":
        return int(f["watch_drops"]) + int(f["storms_410"]) + int(f["list_failures_injected"]) + 1
    return 0


def _redownloaded(run: Run) -> int | None:
    f = run.figures
    if run.scenario == "fetch_through_faults":
        return max(int(f["bytes_forwarded"]) - int(f["model_bytes"]), 0)
    if run.scenario == "crash_soak":
        return int(f["redownloaded_bytes"])
    return None


def _inputs(run: Run) -> int:
    return int(run.figures["inputs_tried"]) if run.scenario == "fuzz" else 0


def _short_error(text: str) -> str:
    """An agent error without the run's random bucket names and temp paths: what a reader needs is the reason."""
    text = re.sub(r"^weightcache-agent: \S+: ", "", text)
    text = re.sub(r"s3://wc-soak-[0-9a-f]+/", "s3://BUCKET/", text)
    return re.sub(r"/\S*/(tmpfs/)", r".../\1", text)[:160]


def _outcome(run: Run) -> str:
    """What the fetch came to: byte-identical, or (faults that never stop) the reason it failed with."""
    if not run.ok:
        return "—"
    if run.scenario != "faults_never_stop":
        return "byte-identical"
    line = str(run.figures.get("stderr", ""))
    reason = re.search(r"failed \((\w+)\)", line)
    tries = re.search(r"gave up after \d+ attempts", line)
    return (f"failed: {reason.group(1)}" if reason else line[:80]) + (f" ({tries.group(0)})" if tries else "") + \
        ", nothing published"


# Scenarios that compare what is visible with S3's bytes (so "bytes lost" and "mixed models" were checked).
CONTENT_CHECKED = {"fetch_through_faults", "faults_never_stop", "crash_soak", "object_changes", "budget_exceeded",
                   "disk_full", "corrupt_and_verify"}


def summarize(area: str, runs: list[Run]) -> dict[str, Any]:
    """The area's row of the guarantees table; None where a column does not apply to the area."""
    mine = [r for r in runs if r.area == area]
    good = [r for r in mine if r.ok]
    redl = [x for r in good if (x := _redownloaded(r)) is not None]
    checked = any(r.scenario in CONTENT_CHECKED for r in mine)
    ok = bool(mine) and len(good) == len(mine)
    return {
        "area": area, "runs": len(mine), "passed": len(good), "ok": ok,
        "faults_injected": sum(_faults(r) for r in good) if area != "bad-input" else None,
        "crashes_survived": (sum(int(r.figures["kills"]) for r in good if r.scenario == "crash_soak")
                             if area == "crash" else None),
        "inputs_tried": sum(_inputs(r) for r in good) if area == "bad-input" else None,
        "bytes_redownloaded": sum(redl) if redl else None,
        # Every content-checked scenario raises on a byte that differs from S3's or on a mixed tree, so a pass
        # means 0; a failed area reports nothing rather than a 0 it did not earn.
        "bytes_lost": (0 if ok else None) if checked else None,
        "mixed_models": (0 if ok else None) if checked else None,
        "seconds": round(sum(r.seconds for r in mine), 1),
    }


def _n(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "—"
    return f"{value / MiB:,.1f} MiB" if value >= MiB else f"{value:,} B"


def _detail_rows(area: str, runs: list[Run]) -> tuple[list[str], list[list[object]]]:
    """One row per scenario call, with the figures that area is about."""
    mine = [r for r in runs if r.area == area]

    def params(r: Run) -> str:
        return ", ".join(f"{k}={v}" for k, v in r.params.items() if k != "rates") or "—"

    def result(r: Run) -> str:
        return "pass" if r.ok else "**FAILED**"

    if area == "s3-faults":
        head = ["scenario", "parameters", "GETs seen", "faults injected", "by kind", "re-downloaded", "outcome",
                "result", "s"]
        rows = [[r.scenario, params(r), _n(r.figures.get("requests")), _n(_faults(r)) if r.ok else "—",
                 ", ".join(f"{k} {v}" for k, v in sorted(r.figures.get("faults", {}).items())) or "—",
                 _bytes(_redownloaded(r)) if r.ok else "—", _outcome(r), result(r), r.seconds]
                for r in mine]
    elif area == "crash":
        head = ["kills (kill -9)", "rounds", "model", "files", "kills after all bytes were in", "re-downloaded",
                "partial models seen", "result", "s"]
        rows = [[_n(r.figures.get("kills")), _n(r.figures.get("rounds")), _bytes(r.figures.get("model_bytes")),
                 _n(r.figures.get("files")),
                 sum(1 for p in r.figures.get("kill_points", []) if p["phase"] == "after-download"),
                 _bytes(r.figures.get("redownloaded_bytes")), 0 if r.ok else "—", result(r), r.seconds]
                for r in mine]
    elif area == "object-changes":
        head = ["change mid-fetch", "first fetch", "next demand", "mixed models", "result", "s"]
        rows = [[r.params["case"], r.figures.get("first_fetch", "—"), r.figures.get("next_demand", "—"),
                 r.figures.get("mixed_models", "—"), result(r), r.seconds] for r in mine]
    elif area == "disk":
        head = ["scenario", "error reported", "objects read / other model / next model", "result", "s"]
        rows = []
        for r in mine:
            f = r.figures
            if r.scenario == "budget_exceeded":
                extra = f"objects read: {f.get('bytes_downloaded', '—')} B (listing {f.get('listing_bytes', '—')} B)"
            else:
                extra = (f"other model intact: {f.get('other_model_intact', '—')}; "
                         f"next model ready: {f.get('next_model_ready', '—')}; /healthz {f.get('healthz_after', '—')}")
            rows.append([r.scenario, _short_error(str(f.get("error", "—"))), extra, result(r), r.seconds])
    elif area == "corruption":
        head = ["bytes flipped (one at a time)", "found by verify", "repaired from S3", "bytes lost", "result", "s"]
        rows = [[_n(r.figures.get("flips")), _n(r.figures.get("found")), _n(r.figures.get("repaired")),
                 r.figures.get("bytes_lost", "—"), result(r), r.seconds] for r in mine]
    elif area == "bad-input":
        head = ["annotations", "URIs", "object keys", "annotation entries", "Warning Events", "outcomes", "crashes",
                "files outside the root", "result", "s"]
        rows = [[_n(r.figures.get("annotations")), _n(r.figures.get("uris")), _n(r.figures.get("keys")),
                 _n(r.figures.get("annotation_entries")), _n(r.figures.get("warning_events")),
                 ", ".join(f"{k} {v:,}" for k, v in sorted(r.figures.get("outcomes", {}).items())) or "—",
                 r.figures.get("crashes", "—"), r.figures.get("files_outside_root", "—"), result(r), r.seconds]
                for r in mine]
    elif area == "tenants":
        head = ["scenario", "figures", "result", "s"]
        rows = [[r.scenario, ", ".join(f"{k}={v}" for k, v in r.figures.items()) or "—", result(r), r.seconds]
                for r in mine]
    else:  # kube
        head = ["pods", "watch drops", "410 storms", "LIST failures", "outage", "pods added during outage",
                "watch back after outage", "reconnects (metric)", "pods missed", "result", "s"]
        rows = [[_n(r.figures.get("pods")), _n(r.figures.get("watch_drops")), _n(r.figures.get("storms_410")),
                 _n(r.figures.get("list_failures_injected")),
                 f"{r.figures['outage_seconds']:.0f} s" if r.ok else "—",
                 _n(r.figures.get("pods_added_during_outage")),
                 f"{r.figures['reconnect_after_outage_seconds']:.2f} s" if r.ok else "—",
                 f"{r.figures['reconnects_metric']:.0f}" if r.ok else "—", r.figures.get("missed", "—"), result(r),
                 r.seconds] for r in mine]
    return head, rows


def render(runs: list[Run], areas: list[str], *, command: str, started: str, seconds: float, quick: bool) -> str:
    summaries = [summarize(a, runs) for a in areas]
    summary_table = markdown_table(
        ["area", "scenario runs", "faults injected", "crashes survived", "inputs tried", "bytes re-downloaded",
         "bytes lost", "mixed models", "result", "time"],
        [[TITLES[s["area"]], f"{s['passed']}/{s['runs']}", _n(s["faults_injected"]), _n(s["crashes_survived"]),
          _n(s["inputs_tried"]), _bytes(s["bytes_redownloaded"]), _n(s["bytes_lost"]), _n(s["mixed_models"]),
          "pass" if s["ok"] else "**FAILED**", f"{s['seconds']:.0f} s"] for s in summaries])
    sections = []
    for a in areas:
        head, rows = _detail_rows(a, runs)
        failures = "".join(f"\n\n**{r.scenario} FAILED** ({', '.join(f'{k}={v}' for k, v in r.params.items())}):\n"
                           f"\n```\n{r.error[:3000]}\n```" for r in runs if r.area == a and not r.ok)
        sections.append(f"## {TITLES[a]}\n\n{GUARANTEES[a]}.\n\n{markdown_table(head, rows)}{failures}\n")
    failed = [s["area"] for s in summaries if not s["ok"]]
    verdict = ("Every guarantee held." if not failed
               else f"**Broken guarantees: {', '.join(TITLES[a] for a in failed)}** (evidence below).")
    quick_note = ("\n> **--quick run: small sizes, a smoke test of the soak script. Not figures to quote.**\n"
                  if quick else "")
    size = "at small sizes" if quick else "at full size"
    return f"""# Guarantees (hardening soak)
{quick_note}
Every scenario of `tests/hardening/scenarios.py` {size}, one after another, against real servers on
loopback: `rclone serve s3` and moto, each behind the fault proxy, FakeKube for the Kubernetes API, and the agent
as `python -m agent` (a real subprocess; nothing patched). {verdict}

Started {started}; {seconds / 60:.1f} min on {os.cpu_count()} CPU cores.

{summary_table}

How to read it: *faults injected* counts what the harness did to the agent (faulted S3 responses, `kill -9`s,
objects changed under a fetch, full disks, flipped bytes, dropped watches, 410s, failed LISTs, the API outage,
S3 faults during the credential scan); *bytes re-downloaded* is what S3 sent beyond one copy of each model
(partial bodies of faulted responses that could not be resumed, parts in flight at a kill; listing XML
included); *bytes lost* and *mixed models* are 0 because every scenario that counts them compares what the cache
shows with S3's bytes (xxh3-128 of every file) after every step and fails on the first difference. A "—" marks a
column that does not apply to the area. Fault rates are per ranged GET.

{chr(10).join(sections)}
Command: `{command}`
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of this script")
    parser.add_argument("--only", choices=AREAS, action="append", help="run only this area (repeatable)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where cache roots and logs go (default: a temp dir under /var/tmp, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (agent logs) after the run")
    args = parser.parse_args(argv)
    # The fault proxy's clients hang up mid-response on purpose (a killed agent, a GET dropped for a lying ETag):
    # aiohttp logs each as a traceback, which is noise here.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    sizes = QUICK if args.quick else FULL
    areas = [a for a in AREAS if not args.only or a in args.only]
    command = "python -m bench.soak " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                           else sys.argv[1:]))
    base = Path(tempfile.mkdtemp(prefix="weightcache-soak-", dir=args.work_dir or "/var/tmp"))
    os.chmod(base, 0o755)
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"soak: areas {', '.join(areas)}; work dir {base}", flush=True)
    lab = Lab(base)
    runs: list[Run] = []
    t0 = time.monotonic()
    try:
        for area in areas:
            RUNNERS[area](lab, sizes, runs)
    finally:
        lab.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    seconds = time.monotonic() - t0
    markdown = render(runs, areas, command=command.strip(), started=started_at, seconds=seconds, quick=args.quick)
    summaries = [summarize(a, runs) for a in areas]
    name = "guarantees-quick" if args.quick else "guarantees"
    path = write_results(name, markdown=markdown, data={
        "command": command.strip(), "started": started_at, "seconds": round(seconds, 1),
        "cpu_count": os.cpu_count(), "quick": args.quick, "sizes": asdict(sizes),
        "summary": summaries, "runs": [asdict(r) for r in runs]})
    print(markdown)
    print(f"written {path} and {path.with_suffix('.json')}", flush=True)
    return 0 if all(s["ok"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
