"""Cache operations as one process of the node runs them — the other side of the commit-protocol tests.

``tests/agent/store/test_commit_protocol.py`` runs these operations in its own threads and, at the same time, in a second
process started from this module (``python -m tests.agent.commit_worker``): one JSON command per line on stdin, one
JSON answer per line on stdout. Every operation opens its own ``Cache`` (its own flock descriptors, so two threads
exclude each other exactly like two processes), joins the activity lock the way every agent process does, and
closes it afterwards.

It imports only the agent's cache modules and the standard library, so it starts in a tenth of a second, and it
never patches anything: a "crash" is a forked child that dies at a publish failpoint (``FAILPOINT_ENV``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import xxhash

from agent.errors import WeightcacheError
from agent.store import locks, maintenance
from agent.store.cache import Cache
from agent.store.manifest import Manifest, ManifestFile, PlannedFile, compute_revision, source_id
from agent.store.publish import FAILPOINT_ENV, Build
from agent.uris import parse_model_uri

#: An answer's "status" when a crash child raised instead of dying at its failpoint.
CHILD_RAISED = 3


def digest_of(data: bytes) -> str:
    """The cache's chunked xxh3-128 of some bytes (as tests/agent/conftest.py computes it, independently)."""
    chunk = 1024 * 1024
    return xxhash.xxh3_128_hexdigest(b"".join(xxhash.xxh3_128_digest(data[i:i + chunk])
                                              for i in range(0, len(data), chunk)))


@contextlib.contextmanager
def opened(root: str | Path, *, fsync: bool = False) -> Iterator[Cache]:
    """A Cache as one agent process holds it: activity joined (shared) for the operation, released after."""
    cache = Cache(root, fsync=fsync)
    cache.ensure_layout()
    cache.join_activity()
    try:
        yield cache
    finally:
        cache.close()


def publish_revision(cache: Cache, uri: str, files: Mapping[str, bytes], *, etag: str) -> Manifest:
    """Build and publish one revision the way the fetcher does, minus the network.

    Overlap checked first, the model's lock held for the whole build, the staging tree discarded on any failure.
    """
    model = parse_model_uri(uri)
    cache.check_overlap(model)
    planned = [PlannedFile(relpath=p, key=f"{model.key}/{p}" if model.is_prefix else model.key, size=len(d),
                           etag=etag) for p, d in files.items()]
    with locks.hold(cache.locks, locks.model_lock_name(model.model_id)):
        build = Build(cache, model.model_id, compute_revision(planned))
        build.create()
        try:
            entries = []
            for f in planned:
                data = files[f.relpath]
                tmp = cache.tmp_download_path(source_id(model.bucket, f.key, f.etag, f.size))
                tmp.write_bytes(data)
                digest = digest_of(data)
                build.adopt_file(tmp, digest=digest, size=len(data), relpath=f.relpath)
                entries.append(ManifestFile(path=f.relpath, size=len(data), xxh3_128=digest, key=f.key,
                                            etag=f.etag))
            return build.publish(uri=model, files=sorted(entries, key=lambda e: e.path), fetch_seconds=0.01)
        except BaseException:
            build.discard()
            raise


def encode_files(files: Mapping[str, bytes]) -> dict[str, str]:
    return {p: base64.b64encode(d).decode("ascii") for p, d in files.items()}


def decode_files(files: Mapping[str, str]) -> dict[str, bytes]:
    return {p: base64.b64decode(d) for p, d in files.items()}


def _crash(root: str, cmd: Mapping[str, Any]) -> dict[str, Any]:
    """Publish in a forked child that dies (``os._exit(137)``) at the failpoint ``cmd["step"]``."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's stack
        code = 0
        try:
            os.environ[FAILPOINT_ENV] = str(cmd["step"])
            with opened(root) as cache:
                publish_revision(cache, cmd["uri"], decode_files(cmd["files"]), etag=cmd["etag"])
        except BaseException:  # noqa: BLE001 - reported to the parent as an exit status
            code = CHILD_RAISED
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {"ok": True, "status": os.waitstatus_to_exitcode(status)}


def run_op(root: str, cmd: Mapping[str, Any]) -> dict[str, Any]:
    """One operation on the cache at ``root``; the answer says what it did (or which error it raised)."""
    op = cmd["op"]
    if op == "crash":
        return _crash(root, cmd)
    try:
        if op == "recover":
            cache = Cache(root, fsync=False)
            try:
                return {"ok": True, "stats": cache.recover(orphan_max_age_seconds=24 * 3600.0)}
            finally:
                cache.close()
        with opened(root, fsync=bool(cmd.get("fsync"))) as cache:
            if op == "publish":
                m = publish_revision(cache, cmd["uri"], decode_files(cmd["files"]), etag=cmd["etag"])
                return {"ok": True, "build": m.build, "model_id": m.model_id}
            if op == "publish_many":  # one revision after another, as fast as they go
                builds = []
                for files, etag in zip(cmd["revisions"], cmd["etags"]):
                    builds.append(publish_revision(cache, cmd["uri"], decode_files(files), etag=etag).build)
                return {"ok": True, "builds": builds}
            if op == "touch":
                cache.touch(cmd["model_id"])
                return {"ok": True}
            if op == "evict":
                with cache.try_model_lock(cmd["model_id"]) as got:
                    if got:
                        maintenance.remove_model(cache, cmd["model_id"])
                return {"ok": True, "got": got}
            if op == "gc":
                return {"ok": True, "removed": maintenance.remove_old_revisions(cache, grace_seconds=cmd["grace"])}
            if op == "sweep":
                return {"ok": True, "freed": maintenance.sweep_orphan_blobs(cache, min_age_seconds=0)}
            if op == "read":  # as a pod would: resolve once, then read every file from that build
                seen: dict[str, Any] = {}
                for uri in cmd["uris"]:
                    found = cache.lookup(parse_model_uri(uri))
                    if found is None:
                        seen[uri] = None
                        continue
                    data = Path(root) / found.manifest.data_relpath
                    try:
                        files = {f.path: (data / f.path).read_bytes() for f in found.manifest.files}
                    except FileNotFoundError as e:
                        seen[uri] = {"build": found.manifest.build, "error": str(e)}
                        continue
                    seen[uri] = {"build": found.manifest.build, "files": encode_files(files)}
                return {"ok": True, "seen": seen}
            if op == "verify":
                bad = {}
                for build, m in list(cache.live_builds()):
                    problems = maintenance.check_build(cache, build, m)
                    if problems:
                        bad[f"{m.model_id}/{build.name}"] = [f"{f.path}: {why}" for f, why in problems]
                return {"ok": True, "bad": bad}
        raise ValueError(f"unknown op {op!r}")
    except (WeightcacheError, OSError) as e:
        return {"ok": False, "error": type(e).__name__, "message": str(e)}


def main() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            answer = run_op(cmd["root"], cmd)
        except Exception as e:  # noqa: BLE001 - the test reads the failure; the worker stays up
            answer = {"ok": False, "error": type(e).__name__, "message": str(e)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
