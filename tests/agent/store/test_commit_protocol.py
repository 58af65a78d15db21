"""The cache's commit protocol (issue 11), proved three ways: a stateful property test that interleaves every cache
operation across threads and a second process, crash points at every step of a publish, and regressions driven
through the public CLI.

The promise under test: a pod sees a complete, verified revision or nothing. A revision is an immutable build; the
pointer swap is its one commit point; a replaced build stays readable for the grace counted from its replacement;
an object and a prefix of the same name never replace or evict each other; recovery never deletes what another
process builds. Nothing here patches the agent: a second process is a real one (``tests/agent/commit_worker.py``),
a crash is a real ``os._exit(137)`` at a publish failpoint or a real SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from agent.errors import OverlappingModelError
from agent.store import layout
from agent.store.cache import Cache
from agent.store.eviction import execute_plan, plan_eviction
from agent.store.publish import FAILPOINT_ENV, replaced_at
from agent.uris import parse_model_uri
from tests.agent.commit_worker import (
    CHILD_RAISED,
    decode_files,
    encode_files,
    opened,
    publish_revision,
    run_op,
)
from tests.agent.conftest import REPO, agent_env, digest_of, put_all, read_tree, run_agent
from tests.fixtures.s3servers import S3Server, fresh_bucket

MiB = 1024 * 1024
FAILPOINTS = ("sealed-manifest", "renamed-build", "before-swap", "after-swap")
#: Longer than any test runs: a build replaced during the test is always inside this grace.
LONG_GRACE = 3600.0
TWO_DAYS = 2 * 24 * 3600.0


def build_dirs(root: Path, model_id: str) -> set[str]:
    """The complete builds of a model on disk (no staging trees)."""
    d = root / "snapshots" / model_id
    if not d.is_dir():
        return set()
    return {e.name for e in d.iterdir() if e.is_dir() and not e.name.endswith(layout.INCOMPLETE_SUFFIX)}


def staging_trees(root: Path) -> list[Path]:
    return sorted((root / "snapshots").glob(f"*/*{layout.INCOMPLETE_SUFFIX}"))


def stray_links(root: Path) -> list[Path]:
    return sorted((root / "models").rglob(".*.link")) if (root / "models").exists() else []


def live_build(root: Path, uri: str) -> str | None:
    """The build of ``uri``'s own model its pointer names now (None: no pointer, or another model's)."""
    model = parse_model_uri(uri)
    resolved = layout.resolve(root, root / model.mirrored_relpath)
    if resolved is None or resolved.model_id != model.model_id or not resolved.target.exists():
        return None
    return resolved.build


def assert_build_matches(build_dir: Path, files: Mapping[str, bytes]) -> None:
    """The build is complete and every byte is the one published: manifest present, sizes and digests right."""
    manifest = json.loads((build_dir / layout.MANIFEST_NAME).read_text("utf-8"))
    recorded = {f["path"]: (f["size"], f["xxh3_128"]) for f in manifest["files"]}
    assert recorded == {p: (len(d), digest_of(d)) for p, d in files.items()}, build_dir
    for path, data in files.items():
        on_disk = (build_dir / layout.DATA_DIR / path).read_bytes()
        assert on_disk == data, f"{build_dir}/data/{path}: bytes differ from the published revision"


def staged_digests(root: Path) -> set[str]:
    """Blobs a killed publish's staging tree still links (until recovery removes the tree)."""
    staged: set[str] = set()
    for tree in staging_trees(root):
        with contextlib.suppress(FileNotFoundError):
            staged |= {f["xxh3_128"] for f in json.loads((tree / layout.MANIFEST_NAME).read_text())["files"]}
    return staged


def tmp_file_bytes(root: Path) -> int:
    """What ``used_bytes`` should charge for ``tmp/``: its regular files of one link (else a blob), by blocks."""
    total = 0
    for e in os.scandir(root / "tmp"):
        st_ = e.stat(follow_symlinks=False)
        if stat.S_ISREG(st_.st_mode) and st_.st_nlink == 1:
            total += st_.st_blocks * 512
    return total


# ===============================================================================================================
# 1. The stateful property test
# ===============================================================================================================

#: Two names share a place (an object and a prefix of the same name); two more models live beside them.
MODELS = {"obj": "s3://bkt/m", "pre": "s3://bkt/m/", "dir": "s3://bkt/n/", "tok": "s3://cat/o.bin"}
SIBLING = {"obj": "pre", "pre": "obj"}
#: Small, but with an empty file, a shared one and one just over a digest chunk (the chunked digest's 2nd chunk).
POOL = (b"", b"a", b"weights " * 64, b"shared", random.Random(11).randbytes(MiB + 17), b"other " * 9)

model_keys = st.sampled_from(sorted(MODELS))
contents = st.tuples(st.integers(0, len(POOL) - 1), st.integers(0, len(POOL) - 1))
graces = st.sampled_from((0.0, LONG_GRACE))
publishes = st.tuples(st.just("publish"), model_keys, contents)
ops = st.one_of(
    publishes, publishes, publishes,  # a third of all: most races worth having involve a publish
    st.tuples(st.just("touch"), model_keys),
    st.tuples(st.just("evict"), model_keys),
    st.tuples(st.just("gc"), graces),
    st.tuples(st.just("sweep")),
    st.tuples(st.just("verify")),
    st.tuples(st.just("read")),
    st.tuples(st.just("recover")),
)


def files_for(key: str, choice: tuple[int, int]) -> dict[str, bytes]:
    model = parse_model_uri(MODELS[key])
    if model.is_prefix:
        return {"a.bin": POOL[choice[0]], "d/b.bin": POOL[choice[1]]}
    return {model.key.rsplit("/", 1)[-1]: POOL[choice[0]]}


def etag_for(files: Mapping[str, bytes]) -> str:
    """Same bytes, same ETag (so the same revision: a re-publish of one revision is covered too)."""
    return digest_of(b"\0".join(files[p] for p in sorted(files)))[:16]


def command(root: Path, op: tuple[Any, ...]) -> dict[str, Any]:
    """The worker command for one drawn operation."""
    kind = op[0]
    cmd: dict[str, Any] = {"op": kind, "root": str(root)}
    if kind == "publish":
        files = files_for(op[1], op[2])
        cmd.update(uri=MODELS[op[1]], files=encode_files(files), etag=etag_for(files), key=op[1])
    elif kind in ("touch", "evict"):
        cmd.update(model_id=parse_model_uri(MODELS[op[1]]).model_id, key=op[1])
    elif kind == "gc":
        cmd["grace"] = op[1]
    elif kind == "read":
        cmd["uris"] = sorted(MODELS.values())
    return cmd


class Worker:
    """A second process on the same cache root (``python -m tests.agent.commit_worker``): JSON lines both ways."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.agent.commit_worker"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={k: v for k, v in os.environ.items() if not k.startswith("WEIGHTCACHE_")})

    def send(self, cmd: Mapping[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        # One command in flight at a time, so at most one answer is pending: select, then a whole line.
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the worker process did not answer within {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"the worker process died (exit {self.proc.poll()})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        self.send(cmd)
        return self.receive()

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker()
    try:
        yield w
    finally:
        w.stop()


@dataclass
class TrackedBuild:
    """What the model knows of one build: its bytes, its manifest as first seen, and when its grace began."""

    files: dict[str, bytes]
    manifest: bytes
    inodes: dict[str, tuple[int, int]]  # path → (inode, size) when first seen: a build never changes
    #: A lower bound on the moment its grace started (the swap that replaced it, or the gc that first saw it
    #: unnamed); None while it is live, or complete but not yet recorded (a crash between rename and record).
    graced_since: float | None = None


@dataclass
class TrackedModel:
    uri: str
    live: str | None = None
    builds: dict[str, TrackedBuild] = field(default_factory=dict)
    last_used: str = ""

    @property
    def model_id(self) -> str:
        return parse_model_uri(self.uri).model_id


def observe_build(root: Path, model_id: str, name: str, files: Mapping[str, bytes]) -> TrackedBuild:
    build_dir = root / "snapshots" / model_id / name
    assert_build_matches(build_dir, files)
    inodes = {}
    for p in files:
        st_ = (build_dir / layout.DATA_DIR / p).stat()
        inodes[p] = (st_.st_ino, st_.st_size)
    return TrackedBuild(files=dict(files), manifest=(build_dir / layout.MANIFEST_NAME).read_bytes(), inodes=inodes)


class CommitProtocol(RuleBasedStateMachine):
    """Publish, touch, pin, evict, gc, sweep, verify, recover and crash — alone, or several at once across
    threads and a second process — with the cache's promises checked after every step."""

    worker: Worker  # set by the test before the machine runs
    base: Path

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(dir=self.base))
        Cache(self.root).ensure_layout()
        self.models = {k: TrackedModel(uri) for k, uri in MODELS.items()}
        self.pins: set[str] = set()
        self.allowed_orphans: set[str] = set()  # blobs a refused or killed build adopted and nothing links now
        self.staging_allowed = False  # a publish killed before its rename left its staging tree (until recovery)
        self.links_allowed = False  # a publish killed before its swap left its temp link (until recovery)
        self.junk: dict[str, bool] = {}  # name in tmp/ → recovery must remove it

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ----- helpers ---------------------------------------------------------------------------------------

    def key_of(self, model_id: str) -> str:
        return next(k for k, m in self.models.items() if m.model_id == model_id)

    def sibling_live(self, key: str) -> bool:
        sib = SIBLING.get(key)
        return sib is not None and self.models[sib].live is not None

    def backdate_live(self, key: str) -> None:
        """Make the live build look two days old: its grace must still count from its replacement."""
        m = self.models[key]
        if m.live is None:
            return
        build_dir = self.root / "snapshots" / m.model_id / m.live
        old = time.time() - TWO_DAYS
        for p in (build_dir, build_dir / layout.MANIFEST_NAME):
            os.utime(p, (old, old))

    def record_publish(self, key: str, answer: Mapping[str, Any], files: Mapping[str, bytes], t0: float) -> None:
        m = self.models[key]
        if m.live is not None:
            m.builds[m.live].graced_since = t0
        m.live = str(answer["build"])
        m.builds[m.live] = observe_build(self.root, m.model_id, m.live, files)

    def refused(self, key: str, answer: Mapping[str, Any]) -> None:
        """A publish refused because the other model of the same name is cached: a clear error naming both."""
        assert not answer["ok"], f"{MODELS[key]} was published over {MODELS[SIBLING[key]]}"
        assert answer["error"] == "OverlappingModelError", answer
        assert MODELS[key] in answer["message"] and MODELS[SIBLING[key]] in answer["message"], answer

    def note_recorded(self, t0: float) -> None:
        """Builds a gc saw unnamed for the first time are recorded now: their grace starts at the latest here."""
        for m in self.models.values():
            for name, b in m.builds.items():
                if name != m.live and b.graced_since is None:
                    assert replaced_at(Cache(self.root), m.model_id, name) is not None, (
                        f"gc did not record the unnamed build {name} of {m.uri}")
                    b.graced_since = t0

    def forget_evicted(self, key: str) -> None:
        m = self.models[key]
        for b in m.builds.values():
            self.allowed_orphans.update(digest_of(d) for d in b.files.values())  # until _drop_unused_blobs ran
        m.live = None
        m.builds.clear()

    # ----- rules: one operation at a time, in this process or the other ------------------------------------

    @rule(key=model_keys, choice=contents, elsewhere=st.booleans())
    def publish(self, key: str, choice: tuple[int, int], elsewhere: bool) -> None:
        self.backdate_live(key)
        cmd = command(self.root, ("publish", key, choice))
        t0 = time.time()
        answer = self.worker.call(cmd) if elsewhere else run_op(str(self.root), cmd)
        if self.sibling_live(key):
            self.refused(key, answer)
            return
        assert answer["ok"], answer
        self.record_publish(key, answer, files_for(key, choice), t0)

    @rule(key=model_keys, choices=st.lists(contents, min_size=2, max_size=3), elsewhere=st.booleans())
    def publish_revisions(self, key: str, choices: list[tuple[int, int]], elsewhere: bool) -> None:
        """Several revisions in a row: the replaced ones wait out their grace beside the live one."""
        for choice in choices:
            self.publish(key, choice, elsewhere)

    @rule(key=model_keys)
    def touch(self, key: str) -> None:
        m = self.models[key]
        cmd = command(self.root, ("touch", key))
        assert run_op(str(self.root), cmd)["ok"]
        used = Cache(self.root).last_used(m.model_id)
        assert used >= m.last_used, "last use went backwards"
        m.last_used = used

    @rule(keys=st.sets(model_keys))
    def pin(self, keys: set[str]) -> None:
        self.pins = {self.models[k].model_id for k in keys}
        with opened(self.root) as cache:
            cache.write_pins(self.pins)

    @rule(key=model_keys, elsewhere=st.booleans(), by_plan=st.booleans())
    def evict(self, key: str, elsewhere: bool, by_plan: bool) -> None:
        if by_plan:
            self.evict_least_recently_used()
            return
        cmd = command(self.root, ("evict", key))
        answer = self.worker.call(cmd) if elsewhere else run_op(str(self.root), cmd)
        assert answer == {"ok": True, "got": True}, answer
        m = self.models[key]
        assert not build_dirs(self.root, m.model_id)
        assert not (self.root / "state/used" / m.model_id).exists()
        self.forget_evicted(key)

    def evict_least_recently_used(self) -> None:
        """Eviction by plan (what gc and the daemon do) under a budget of one byte: pinned models stay."""
        with opened(self.root) as cache:
            pins = cache.read_pins()
            assert pins == self.pins
            plan = plan_eviction(cache, need_bytes=0, max_bytes=1, min_free_bytes=0, pinned=pins)
            execute_plan(cache, plan)
        for item in plan.items:
            assert item.model_id not in self.pins, f"pinned {item.uri} was evicted"
            self.forget_evicted(self.key_of(item.model_id))

    @rule(grace=graces, elsewhere=st.booleans())
    def gc(self, grace: float, elsewhere: bool) -> None:
        t0 = time.time()
        cmd = {"op": "gc", "root": str(self.root), "grace": grace}
        answer = self.worker.call(cmd) if elsewhere else run_op(str(self.root), cmd)
        assert answer["ok"], answer
        expect_removed = 0
        for m in self.models.values():
            for name, b in list(m.builds.items()):
                if name != m.live and b.graced_since is not None and t0 - b.graced_since >= grace:
                    expect_removed += 1
                    self.allowed_orphans.update(digest_of(d) for d in b.files.values())
                    del m.builds[name]
        assert answer["removed"] == expect_removed, (answer, expect_removed)
        self.note_recorded(t0)

    @rule(elsewhere=st.booleans())
    def sweep(self, elsewhere: bool) -> None:
        cmd = {"op": "sweep", "root": str(self.root)}
        answer = self.worker.call(cmd) if elsewhere else run_op(str(self.root), cmd)
        assert answer["ok"], answer
        self.allowed_orphans = staged_digests(self.root)  # still linked: orphans once recovery drops the tree

    @rule(elsewhere=st.booleans())
    def verify(self, elsewhere: bool) -> None:
        cmd = {"op": "verify", "root": str(self.root)}
        answer = self.worker.call(cmd) if elsewhere else run_op(str(self.root), cmd)
        assert answer == {"ok": True, "bad": {}}, answer

    @rule(elsewhere=st.booleans())
    def recover(self, elsewhere: bool) -> None:
        first_of_boot = not (self.root / "state/boot_id").exists()  # (a recovery during a burst may have run)
        cmd = {"op": "recover", "root": str(self.root)}
        answer = self.worker.call(cmd) if elsewhere else run_op(str(self.root), cmd)
        assert answer["ok"], answer
        assert not staging_trees(self.root) and not stray_links(self.root)
        for name, must_go in self.junk.items():
            assert os.path.lexists(self.root / "tmp" / name) != must_go, f"recovery and tmp/{name}"
        self.junk = {n: g for n, g in self.junk.items() if not g}
        self.staging_allowed = self.links_allowed = False
        if first_of_boot:  # the first recovery of a boot sweeps every orphan blob
            self.allowed_orphans.clear()

    @rule(old=st.booleans())
    def litter_tmp(self, old: bool) -> None:
        """Leave what a killed repair or a stranger may leave in tmp/: a directory, a FIFO, a socket, a file."""
        tag = uuid.uuid4().hex[:6]
        tmp = self.root / "tmp"
        (tmp / f"d{tag}.incomplete").mkdir()
        (tmp / f"d{tag}.incomplete" / "inner.bin").write_bytes(b"x" * 5000)
        os.mkfifo(tmp / f"f{tag}")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp / f"s{tag}"))
        (tmp / f"j{tag}.bin").write_bytes(b"j" * 3000)
        when = time.time() - TWO_DAYS if old else time.time()
        for name in (f"d{tag}.incomplete", f"f{tag}", f"s{tag}", f"j{tag}.bin"):
            os.utime(tmp / name, (when, when), follow_symlinks=False)
        # Directories, FIFOs and sockets always go; a regular file only once older than the orphan age limit.
        self.junk.update({f"d{tag}.incomplete": True, f"f{tag}": True, f"s{tag}": True, f"j{tag}.bin": old})

    @rule(key=model_keys, choice=contents, step=st.sampled_from(FAILPOINTS))
    def crash_while_publishing(self, key: str, choice: tuple[int, int], step: str) -> None:
        """The other process dies at a publish step: the old revision stays live, or the new one is."""
        m = self.models[key]
        files = files_for(key, choice)
        cmd = command(self.root, ("publish", key, choice)) | {"op": "crash", "step": step}
        before_staging = set(staging_trees(self.root))
        before = build_dirs(self.root, m.model_id)
        answer = self.worker.call(cmd)
        if self.sibling_live(key):
            assert answer["status"] == CHILD_RAISED, answer  # refused before it built anything
            return
        assert answer["status"] == 137, answer
        new = build_dirs(self.root, m.model_id) - before
        if step == "sealed-manifest":
            assert not new and len(set(staging_trees(self.root)) - before_staging) == 1
            self.staging_allowed = True
            self.allowed_orphans.update(digest_of(d) for d in files.values())  # once recovery drops the tree
            return
        assert len(new) == 1, new
        name = new.pop()
        tracked = observe_build(self.root, m.model_id, name, files)
        if step == "after-swap":
            if m.live is not None:
                m.builds[m.live].graced_since = None  # replaced, but the record died with the process
            m.live = name
        elif step == "before-swap":
            self.links_allowed = True
        m.builds[name] = tracked

    @rule(batch=st.lists(ops, min_size=2, max_size=4))
    def concurrently(self, batch: list[tuple[Any, ...]]) -> None:
        """Several operations at once: the first in the other process, the rest in threads of this one."""
        t0 = time.time()
        before = {k: (m.live, dict(m.builds)) for k, m in self.models.items()}
        cmds = [command(self.root, op) for op in batch]
        answers: list[dict[str, Any] | None] = [None] * len(cmds)
        start = threading.Barrier(len(cmds))

        def in_thread(i: int) -> None:
            start.wait()
            answers[i] = run_op(str(self.root), cmds[i])

        threads = [threading.Thread(target=in_thread, args=(i,), daemon=True) for i in range(1, len(cmds))]
        for t in threads:
            t.start()
        start.wait()
        try:
            answers[0] = self.worker.call(cmds[0])
        finally:
            for t in threads:
                t.join(timeout=60)
        self.reconcile(t0, before, list(zip(cmds, answers)))

    @rule(key=model_keys, choices=st.lists(contents, min_size=2, max_size=4), grace=graces)
    def gc_and_read_while_publishing(self, key: str, choices: list[tuple[int, int]], grace: float) -> None:
        """The other process publishes revision after revision (fsync on: a wider window between the rename
        and the swap) while threads here run gc, read the model and try to recover, in a loop."""
        t0 = time.time()
        before = {k: (m.live, dict(m.builds)) for k, m in self.models.items()}
        revisions = [files_for(key, c) for c in choices]
        cmd = {"op": "publish_many", "root": str(self.root), "uri": MODELS[key], "fsync": True,
               "revisions": [encode_files(f) for f in revisions], "etags": [etag_for(f) for f in revisions]}
        stop = threading.Event()
        done: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
        lock = threading.Lock()

        def loop(loop_cmd: dict[str, Any]) -> None:
            while True:
                last = stop.is_set()
                answer = run_op(str(self.root), loop_cmd)
                with lock:
                    done.append((loop_cmd, answer))
                if last:
                    return

        threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in (
            {"op": "gc", "root": str(self.root), "grace": grace},
            {"op": "read", "root": str(self.root), "uris": [MODELS[key]]},
            {"op": "recover", "root": str(self.root)})]  # must find someone working, every time: a no-op
        for t in threads:
            t.start()
        try:
            answer = self.worker.call(cmd)
        finally:
            stop.set()
            for t in threads:
                t.join()
        if not answer["ok"]:
            assert self.sibling_live(key), answer
            self.refused(key, answer)
        else:
            for name, files in zip(answer["builds"], revisions):
                done.append(({"op": "publish", "key": key, "files": encode_files(files)},
                             {"ok": True, "build": name}))
        self.reconcile(t0, before, done)

    def reconcile(self, t0: float, before: Mapping[str, tuple[str | None, dict[str, TrackedBuild]]],
                  done: list[tuple[dict[str, Any], dict[str, Any] | None]]) -> None:
        """What several operations at once may have done, in any order; anything else is a broken promise."""
        pubs: dict[str, dict[str, dict[str, bytes]]] = {k: {} for k in MODELS}
        evicted = {cmd["key"] for cmd, answer in done if cmd["op"] == "evict" and answer and answer.get("got")}
        gc0 = gcs = 0  # gcs with no grace; all gcs (any of them records a build it first sees unnamed)
        refused: list[str] = []
        for cmd, answer in done:
            assert answer is not None
            kind = cmd["op"]
            if kind == "publish":
                files = decode_files(cmd["files"])
                if answer["ok"]:
                    pubs[cmd["key"]][answer["build"]] = files
                else:
                    assert cmd["key"] in SIBLING and answer["error"] == "OverlappingModelError", answer
                    refused.append(cmd["key"])
                    self.allowed_orphans.update(digest_of(d) for d in files.values())
            elif kind == "evict":
                assert answer["ok"], answer
            elif kind == "gc":
                assert answer["ok"], answer
                gc0 += cmd["grace"] == 0.0
                gcs += 1
            elif kind not in ("verify", "read"):
                assert answer["ok"], (cmd, answer)
        for cmd, answer in done:  # a damaged build is one no remover may touch: verify must find none
            if cmd["op"] == "verify" and answer is not None:
                if not answer["ok"]:
                    assert gc0 or evicted, answer  # a build removed under the reader, legitimately
                    continue
                for where, problems in answer["bad"].items():
                    key = self.key_of(where.split("/")[0])
                    assert (gc0 or key in evicted) and all("missing" in p for p in problems), answer
        for cmd, answer in done:  # a reader sees a whole revision that was live, or (only if none was) nothing
            if cmd["op"] != "read" or answer is None:
                continue
            assert answer["ok"], answer
            for key, m in self.models.items():
                if m.uri not in answer["seen"]:
                    continue
                seen = answer["seen"][m.uri]
                prev_live, prev_builds = before[key]
                if seen is None:  # (with no grace, the build it resolved may go before its manifest is read)
                    assert prev_live is None or key in evicted or gc0, f"{m.uri} vanished under a reader"
                    continue
                assert seen["build"] in {prev_live, *pubs[key]}, f"{m.uri}: a reader saw build {seen['build']}"
                if "error" in seen:
                    assert gc0 or key in evicted, f"{m.uri}: a live or graced build vanished: {seen['error']}"
                    continue
                want = prev_builds[seen["build"]].files if seen["build"] in prev_builds else pubs[key][seen["build"]]
                assert decode_files(seen["files"]) == want, f"{m.uri}: a reader saw mixed or wrong bytes"
        for key in refused:  # refused only because the other of the same name was cached at some point
            assert before[SIBLING[key]][0] is not None or pubs[SIBLING[key]], f"{MODELS[key]} refused for nothing"
        for key in ("obj", "pre"):
            if pubs[key] and pubs[SIBLING[key]]:
                assert key in evicted or SIBLING[key] in evicted, "an object and its prefix were both published"
        for key, m in self.models.items():
            prev_live, prev_builds = before[key]
            live_now = live_build(self.root, m.uri)
            allowed = set(pubs[key]) | ({None} if key in evicted else set())
            if not pubs[key] and key not in evicted:
                allowed = {prev_live}
            assert live_now in allowed, (
                f"{m.uri}: live {live_now}, expected one of {allowed} ({pubs[key]=}, {key in evicted=})")
            on_disk = build_dirs(self.root, m.model_id)
            known = set(prev_builds) | set(pubs[key])
            assert on_disk <= known, f"{m.uri}: unknown builds {on_disk - known}"
            for name in known - on_disk:
                recorded = name in prev_builds and prev_builds[name].graced_since is not None
                replaced_here = name == prev_live or name in pubs[key]
                ok = key in evicted or (gc0 and name != live_now and (recorded or replaced_here or gcs >= 2))
                assert ok, f"{m.uri}: build {name} removed while live or inside its grace"
            builds = {}
            for name in on_disk:
                tracked = prev_builds.get(name) or observe_build(self.root, m.model_id, name, pubs[key][name])
                if name == live_now:
                    tracked.graced_since = None
                elif tracked.graced_since is None and replaced_at(Cache(self.root), m.model_id, name) is not None:
                    tracked.graced_since = t0
                builds[name] = tracked
            for name in known - on_disk:
                files = prev_builds[name].files if name in prev_builds else pubs[key][name]
                self.allowed_orphans.update(digest_of(d) for d in files.values())
            m.live, m.builds = live_now, builds

    # ----- the promises, after every step -----------------------------------------------------------------

    @invariant()
    def every_pointer_names_a_complete_build(self) -> None:
        models_dir = self.root / "models"
        for dirpath, dirnames, filenames in os.walk(models_dir):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if name.startswith(".") and name.endswith(".link"):
                    assert self.links_allowed, f"a half-done swap left {p}"
                    continue
                if not p.is_symlink():
                    assert p.is_dir(), f"{p} is neither a pointer nor a directory"
                    continue
                assert not os.path.isabs(os.readlink(p)), f"{p} is an absolute link"
                resolved = layout.resolve(self.root, p)
                assert resolved is not None and resolved.target.exists(), f"{p} names no complete build"
                assert not resolved.build.endswith(layout.INCOMPLETE_SUFFIX)
                key = self.key_of(resolved.model_id)
                m = self.models[key]
                assert resolved.build == m.live, f"{p} names {resolved.build}, the live build is {m.live}"
                assert p.relative_to(self.root).as_posix() == parse_model_uri(m.uri).mirrored_relpath
                assert_build_matches(resolved.build_dir, m.builds[m.live].files)
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]

    @invariant()
    def every_live_model_is_found_and_nothing_else(self) -> None:
        cache = Cache(self.root)
        for m in self.models.values():
            found = cache.lookup(parse_model_uri(m.uri))
            if m.live is None:
                assert found is None, f"{m.uri} is served but was never (or no longer) published"
                assert live_build(self.root, m.uri) is None
            else:
                assert found is not None and found.manifest.build == m.live, f"{m.uri} is not served"
                # A live build recorded as replaced would lose its protection as soon as the next gc runs.
                assert replaced_at(cache, m.model_id, m.live) is None, f"{m.uri}: its live build is 'replaced'"
        live = [k for k in ("obj", "pre") if self.models[k].live is not None]
        assert len(live) <= 1, "an object and a prefix of the same name are both live"

    @invariant()
    def no_live_or_graced_build_is_gone_and_none_changed(self) -> None:
        for m in self.models.values():
            assert build_dirs(self.root, m.model_id) == set(m.builds), m.uri
            for name, b in m.builds.items():
                build_dir = self.root / "snapshots" / m.model_id / name
                assert (build_dir / layout.MANIFEST_NAME).read_bytes() == b.manifest, f"{name}'s manifest changed"
                for p, (ino, size) in b.inodes.items():
                    st_ = (build_dir / layout.DATA_DIR / p).stat()
                    assert (st_.st_ino, st_.st_size) == (ino, size), f"{name}/data/{p} changed"
        if not self.staging_allowed:
            assert not staging_trees(self.root), "a staging tree outlived its build"

    @invariant()
    def used_bytes_add_up(self) -> None:
        referenced: dict[str, int] = {}
        for m in self.models.values():
            for name, b in m.builds.items():
                for p, data in b.files.items():
                    digest = digest_of(data)
                    referenced[digest] = len(data)
                    blob = self.root / "blobs" / digest
                    assert os.path.samefile(blob, self.root / "snapshots" / m.model_id / name / "data" / p), (
                        f"{name}/data/{p} is not a link of its blob")
        staged = staged_digests(self.root)
        blobs = {e.name: e.stat().st_size for e in os.scandir(self.root / "blobs")}
        orphans = set(blobs) - set(referenced) - staged
        assert orphans <= self.allowed_orphans, f"blobs nothing uses: {orphans - self.allowed_orphans}"
        unreferenced = set(blobs) - set(referenced)
        expected = sum(referenced.values()) + sum(blobs[o] for o in unreferenced) + tmp_file_bytes(self.root)
        assert Cache(self.root).used_bytes() == expected
        leftovers = {e.name for e in os.scandir(self.root / "tmp")} - set(self.junk)
        assert not leftovers, f"downloads left in tmp/: {leftovers}"


def test_the_commit_protocol_holds_under_any_interleaving(worker: Worker, tmp_path: Path) -> None:
    CommitProtocol.worker = worker
    CommitProtocol.base = tmp_path
    # No shrinking: every replay starts threads and talks to another process, so shrinking a failure takes
    # minutes and often ends "flaky"; the whole trace (at most 20 steps, each with its arguments) reads well enough.
    run_state_machine_as_test(CommitProtocol, settings=settings(
        max_examples=25, stateful_step_count=20, deadline=None,
        phases=(Phase.explicit, Phase.reuse, Phase.generate)))


# ===============================================================================================================
# 2. Crash points: a publish killed at every step, then recovery
# ===============================================================================================================

PUBLISH_ONE = """
import sys
from tests.agent.commit_worker import opened, publish_revision
root, uri, text = sys.argv[1:4]
with opened(root, fsync=True) as cache:
    publish_revision(cache, uri, {"w.bin": text.encode(), "shared.bin": b"shared"}, etag=text)
"""

#: More than fit in the longest delay before the kill (each publish takes milliseconds).
LOOP_REVISIONS = 2000

PUBLISH_LOOP = """
import sys
from tests.agent.commit_worker import opened, publish_revision
root, uri, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with opened(root, fsync=True) as cache:  # held for the process's life, like the daemon's
    print("ready", flush=True)
    for i in range(count):
        m = publish_revision(cache, uri, {"w.bin": f"revision {i}".encode() * 50, "shared.bin": b"shared"},
                             etag=f"rev{i}")
        print(i, m.build, flush=True)
"""


def revision_files(text: bytes) -> dict[str, bytes]:
    return {"w.bin": text, "shared.bin": b"shared"}


def recover(root: Path) -> dict[str, int]:
    cache = Cache(root)
    try:
        return cache.recover(orphan_max_age_seconds=24 * 3600.0)
    finally:
        cache.close()


def assert_exactly_one_of(root: Path, uri: str, candidates: Mapping[str, bytes], *, recovered: bool = True) -> str:
    """Exactly one of the candidate revisions (by its w.bin bytes) is live and whole; returns which.

    Before recovery too: a reader that comes first (a pod, while the agent restarts) sees one of them.
    """
    model = parse_model_uri(uri)
    cache = Cache(root)
    found = cache.lookup(model)
    assert found is not None, f"neither {sorted(candidates)} is live"
    data = (found.resolved / "w.bin").read_bytes()
    which = [name for name, text in candidates.items() if text == data]
    assert len(which) == 1, f"the live revision holds {data[:40]!r}, none of {sorted(candidates)}"
    assert_build_matches(root / found.manifest.snapshot, revision_files(data))
    if recovered:
        assert not staging_trees(root), "recovery left a staging tree"
        assert not stray_links(root), "recovery left a temp link"
    return which[0]


def gc_to_the_live_build(root: Path, uri: str) -> None:
    """Two gcs with no grace (the first records builds it sees unnamed) and a sweep: only the live build is left,
    and the cache uses exactly its blobs."""
    model = parse_model_uri(uri)
    with opened(root) as cache:
        for _ in range(2):
            cache.remove_old_revisions(min_age_seconds=0)
        cache.sweep_orphan_blobs(min_age_seconds=0)
        live = cache.lookup(model)
        assert live is not None
        assert build_dirs(root, model.model_id) == {live.manifest.build}
        live_blobs = {f.xxh3_128: f.size for f in live.manifest.files}
        assert cache.used_bytes() == sum(live_blobs.values()) + tmp_file_bytes(root)


@pytest.mark.parametrize("step", FAILPOINTS)
def test_a_publish_killed_at_any_step_leaves_the_old_or_the_new_revision_live(tmp_path: Path, step: str) -> None:
    root, uri = tmp_path / "root", "s3://bkt/m/"
    with opened(root, fsync=True) as cache:
        publish_revision(cache, uri, revision_files(b"old revision"), etag="old")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTCACHE_")} | {FAILPOINT_ENV: step}
    proc = subprocess.run([sys.executable, "-c", PUBLISH_ONE, str(root), uri, "new revision"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 137, proc.stderr
    revisions = {"old": b"old revision", "new": b"new revision"}
    expected = "new" if step == "after-swap" else "old"
    assert assert_exactly_one_of(root, uri, revisions, recovered=False) == expected
    model_id = parse_model_uri(uri).model_id
    # What the killed publish left, step by step (so the failpoint fired where its name says).
    assert len(staging_trees(root)) == (step == "sealed-manifest")
    assert len(build_dirs(root, model_id)) == (1 if step == "sealed-manifest" else 2)
    assert len(stray_links(root)) == (step == "before-swap")
    recover(root)
    assert assert_exactly_one_of(root, uri, revisions) == expected
    gc_to_the_live_build(root, uri)
    with opened(root) as cache:  # the dead publisher left no lock behind: the next publish goes through
        publish_revision(cache, uri, revision_files(b"next revision"), etag="next")
    assert_exactly_one_of(root, uri, {"next": b"next revision"})


def test_a_publishing_process_killed_at_random_moments_never_leaves_the_model_unpublished(tmp_path: Path) -> None:
    root, uri = tmp_path / "root", "s3://bkt/m/"
    with opened(root, fsync=True) as cache:
        publish_revision(cache, uri, revision_files(b"base"), etag="base")
    recover(root)  # the first recovery of a boot; later ones run as after any restart
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTCACHE_")}
    candidates = {"base": b"base"} | {f"rev{i}": f"revision {i}".encode() * 50 for i in range(LOOP_REVISIONS)}
    previous = "base"
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", PUBLISH_LOOP, str(root), uri, str(LOOP_REVISIONS)], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        done = [int(line.split()[0]) for line in proc.stdout.read().splitlines() if line.strip()]
        proc.stdout.close()
        assert len(done) < LOOP_REVISIONS, "the loop ended before the kill: nothing was killed mid-way"
        # The last revision it reported published, or the one in flight when the kill came.
        allowed = {f"rev{done[-1]}", f"rev{done[-1] + 1}"} if done else {previous, "rev0"}
        for recovered in (False, True):
            live = assert_exactly_one_of(root, uri, candidates, recovered=recovered)
            assert live in allowed, f"seed {seed}, round {round_}: {live} is live, one of {sorted(allowed)} expected"
            if not recovered:
                recover(root)
        previous = live
        gc_to_the_live_build(root, uri)


# ===============================================================================================================
# 3. Regressions through the CLI
# ===============================================================================================================


@pytest.fixture
def moto_bucket(moto_s3: S3Server) -> Iterator[str]:
    """A fresh bucket on moto: it stores a key ``x`` beside keys under ``x/`` (a directory-backed server cannot)."""
    yield from fresh_bucket(moto_s3)


def cli_env(server: S3Server, root: Path, **extra: str) -> dict[str, str]:
    return agent_env(server, WEIGHTCACHE_ROOT=str(root), WEIGHTCACHE_MIN_FREE_BYTES="0", **extra)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def ls_json(env: Mapping[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(ok(run_agent("ls", "--json", env=env)).stdout)
    return rows


def snapshot_of(root: Path, path: Path) -> tuple[Path, dict[str, bytes], bytes]:
    """(build directory, every byte it serves, manifest bytes) of a published path, resolved once."""
    resolved = layout.resolve(root, path)
    assert resolved is not None, f"{path} is not published"
    served = {"": resolved.target.read_bytes()} if resolved.target.is_file() else read_tree(resolved.target)
    return resolved.build_dir, served, resolved.manifest_path.read_bytes()


def names(text: str, uri: str) -> bool:
    """``uri`` appears in ``text`` as itself (``s3://b/x`` does not count as named by ``s3://b/x/``)."""
    return re.search(re.escape(uri) + r"(?![\w/.-])", text) is not None


@pytest.mark.parametrize("first,second", [("x", "x/"), ("x/", "x")])
def test_an_object_and_a_prefix_of_the_same_name_never_replace_each_other(
        moto_s3: S3Server, moto_bucket: str, tmp_path: Path, first: str, second: str) -> None:
    put_all(moto_s3, moto_bucket, {"x": b"the object x", "x/a.bin": b"inside a", "x/b.bin": b"inside b"})
    root = tmp_path / "root"
    env = cli_env(moto_s3, root)
    first_uri, second_uri = f"s3://{moto_bucket}/{first}", f"s3://{moto_bucket}/{second}"
    pointer = Path(ok(run_agent("prefetch", first_uri, env=env)).stdout.strip())
    before = snapshot_of(root, pointer)
    blobs = sorted(p.name for p in (root / "blobs").iterdir())

    refused = run_agent("prefetch", second_uri, env=env)
    assert refused.returncode != 0
    assert names(refused.stderr, first_uri) and names(refused.stderr, second_uri), refused.stderr
    assert snapshot_of(root, pointer) == before, "the cached model was replaced"
    assert sorted(p.name for p in (root / "blobs").iterdir()) == blobs, "the refused model left blobs"
    assert not staging_trees(root)

    ok(run_agent("gc", env=env | {"WEIGHTCACHE_OLD_REVISION_GRACE": "0"}))
    assert snapshot_of(root, pointer) == before, "gc unpublished the cached model"
    assert [(r["uri"], r["state"]) for r in ls_json(env)] == [(first_uri, "ready")]
    assert run_agent("prefetch", second_uri, env=env).returncode != 0, "still refused after gc"
    assert Path(ok(run_agent("prefetch", first_uri, env=env)).stdout.strip()) == pointer


def test_directories_sockets_and_fifos_in_tmp_break_no_command_and_go_at_the_next_recovery(
        moto_s3: S3Server, moto_bucket: str, tmp_path: Path) -> None:
    put_all(moto_s3, moto_bucket, {"m/w.bin": b"weights" * 100})
    root = tmp_path / "root"
    env = cli_env(moto_s3, root)
    ok(run_agent("prefetch", f"s3://{moto_bucket}/m/", env=env))
    tmp = root / "tmp"
    day_ago = time.time() - TWO_DAYS
    (tmp / "0123abcd.incomplete").mkdir()  # named like a download, as a killed repair's could be
    (tmp / "0123abcd.incomplete" / "part").write_bytes(b"p" * 100)
    (tmp / "plain-dir").mkdir()
    os.mkfifo(tmp / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp / "sock"))
    junk = ("0123abcd.incomplete", "plain-dir", "fifo", "sock")
    for name in junk:
        os.utime(tmp / name, (day_ago, day_ago), follow_symlinks=False)

    # A running daemon holds the activity lock: one-shot commands then skip recovery and must live with the junk.
    daemon = Cache(root)
    daemon.join_activity()
    try:
        ok(run_agent("ls", env=env))
        put_all(moto_s3, moto_bucket, {"n/w.bin": b"other" * 100})
        ok(run_agent("prefetch", f"s3://{moto_bucket}/m/", f"s3://{moto_bucket}/n/", env=env))
        ok(run_agent("gc", env=env))
        assert all(os.path.lexists(tmp / name) for name in junk), "recovery ran beside a working process"
    finally:
        daemon.close()

    ok(run_agent("ls", env=env))
    ok(run_agent("gc", env=env))  # nobody works now: its recovery cleans up
    assert not any(os.path.lexists(tmp / name) for name in junk)
    assert sorted(r["state"] for r in ls_json(env)) == ["ready", "ready"]


def test_the_old_revision_grace_counts_from_the_replacement_not_the_build_age(
        moto_s3: S3Server, moto_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{moto_bucket}/m/"
    root = tmp_path / "root"
    env = cli_env(moto_s3, root)
    moto_s3.put(moto_bucket, "m/w.bin", b"revision one" * 100)
    pointer = Path(ok(run_agent("prefetch", uri, env=env)).stdout.strip())
    rev1 = layout.resolve(root, pointer)
    assert rev1 is not None
    # Built two days ago: its manifest says so, and so does its directory.
    manifest = json.loads(rev1.manifest_path.read_text("utf-8"))
    manifest["fetched_at"] = time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(time.time() - TWO_DAYS))
    os.chmod(rev1.manifest_path, 0o644)  # (in case builds are ever made read-only)
    rev1.manifest_path.write_text(json.dumps(manifest), "utf-8")
    day_ago = time.time() - TWO_DAYS
    for p in (rev1.build_dir, rev1.manifest_path, rev1.data_dir):
        os.utime(p, (day_ago, day_ago))

    moto_s3.put(moto_bucket, "m/w.bin", b"revision two" * 100)
    ok(run_agent("prefetch", uri, env=env))
    rev2 = layout.resolve(root, pointer)
    assert rev2 is not None and rev2.build != rev1.build

    ok(run_agent("gc", env=env | {"WEIGHTCACHE_OLD_REVISION_GRACE": "3600"}))
    assert (rev1.data_dir / "w.bin").read_bytes() == b"revision one" * 100, "replaced a moment ago, yet gone"
    ok(run_agent("gc", env=env | {"WEIGHTCACHE_OLD_REVISION_GRACE": "0"}))
    assert not rev1.build_dir.exists(), "with no grace, gc removes the replaced revision"
    assert (pointer / "w.bin").read_bytes() == b"revision two" * 100


def test_a_cache_hit_moves_the_last_use_without_rewriting_the_manifest(
        moto_s3: S3Server, moto_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{moto_bucket}/m/"
    put_all(moto_s3, moto_bucket, {"m/w.bin": b"weights" * 100, "m/config.json": b"{}"})
    root = tmp_path / "root"
    env = cli_env(moto_s3, root)
    pointer = Path(ok(run_agent("prefetch", uri, env=env)).stdout.strip())
    resolved = layout.resolve(root, pointer)
    assert resolved is not None
    manifest = resolved.manifest_path.read_bytes()
    mtime = resolved.manifest_path.stat().st_mtime_ns
    [first] = ls_json(env)

    time.sleep(0.05)  # last use has millisecond resolution
    hit = ok(run_agent("prefetch", uri, env=env))
    assert "cached" in hit.stderr, hit.stderr
    [second] = ls_json(env)
    assert second["last_used"] > first["last_used"], (first, second)
    assert resolved.manifest_path.read_bytes() == manifest, "a hit rewrote the manifest"
    assert resolved.manifest_path.stat().st_mtime_ns == mtime
    assert "last_used" not in json.loads(manifest)
    assert layout.resolve(root, pointer) == resolved, "a hit published another build"


# ===============================================================================================================
# 4. What the tests above found: a crash leftover and two races with an eviction, each pinned on its own
# ===============================================================================================================


def test_a_killed_first_publish_of_an_inner_model_does_not_block_the_outer_names(tmp_path: Path) -> None:
    # The killed swap created models/s3/bkt/m/ for its pointer; recovery must not leave it there, empty.
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTCACHE_")} | {FAILPOINT_ENV: "before-swap"}
    proc = subprocess.run([sys.executable, "-c", PUBLISH_ONE, str(root), "s3://bkt/m/x/", "inner"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 137, proc.stderr
    recover(root)
    with opened(root) as cache:
        try:
            publish_revision(cache, "s3://bkt/m/", revision_files(b"outer"), etag="outer")
        except OverlappingModelError as e:
            raise AssertionError(f"nothing is cached inside s3://bkt/m/, yet: {e}") from e
    assert_exactly_one_of(root, "s3://bkt/m/", {"outer": b"outer"})


def first_error_while_churning(root: Path, churned: str, looked_up: str, *, limit_s: float = 2.0) -> str | None:
    """Publish and evict ``churned`` in a loop in one thread while this one looks ``looked_up`` up; the first
    error a lookup raised (None if none did within ``limit_s``: before the fix, one came within half a second)."""
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            with opened(root) as cache:
                m = publish_revision(cache, churned, {"a.bin": b"A"}, etag=f"e{i}")
                with cache.try_model_lock(m.model_id) as got:
                    assert got
                    cache.remove_model(m.model_id)
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    deadline = time.monotonic() + limit_s
    model = parse_model_uri(looked_up)
    try:
        while time.monotonic() < deadline and thread.is_alive():
            try:
                Cache(root).lookup(model)
            except Exception as e:  # noqa: BLE001 - any error of a lookup here is the finding
                return f"{type(e).__name__}: {e}"
    finally:
        stop.set()
        thread.join()
    return None


def test_evicting_the_last_model_of_a_bucket_never_fails_a_lookup_of_another(tmp_path: Path) -> None:
    # The eviction prunes the emptied bucket directory; a lookup that saw it exist, then not be a directory,
    # took it for "a file of another model".
    error = first_error_while_churning(tmp_path / "root", "s3://bkt/n/", "s3://bkt/other/")
    assert error is None, error


def test_a_lookup_during_the_eviction_of_its_model_finds_it_or_nothing(tmp_path: Path) -> None:
    # os.path.realpath (Python 3.11) lets out the FileNotFoundError of a link unlinked between lstat and readlink.
    root = tmp_path / "root"
    with opened(root) as cache:  # the bucket directory stays: only the pointer itself comes and goes
        publish_revision(cache, "s3://bkt/keep/", {"a.bin": b"K"}, etag="k")
    error = first_error_while_churning(root, "s3://bkt/n/", "s3://bkt/n/")
    assert error is None, error
