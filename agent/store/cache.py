"""The node cache: where things are, which build of a model is live, and the mutable bookkeeping beside it.

The layout itself (and how a reader resolves a pointer) is :mod:`agent.store.layout`, shared with the server.
This module
answers "is this URI ready, and from where?" and keeps the bookkeeping that may change (last use, pins, when a
build was replaced) in ``state/``, written atomically: losing any of it costs at most an LRU ordering or a longer
grace. Building and publishing live in :mod:`agent.store.publish`; eviction, gc, flushing and recovery in
:mod:`agent.store.maintenance`. This module does no network I/O and never writes a build or a pointer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from agent.errors import CacheError, DiskFullError, OverlappingModelError
from agent.store import layout, locks
from agent.store.manifest import Manifest, now_iso
from agent.uris import ModelUri

log = logging.getLogger(__name__)

#: A blob whose inode changed this recently may be between adoption and its snapshot link: never sweep it.
SWEEP_MIN_AGE_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class Lookup:
    """Where a URI is served from, if it is ready: its own model, or an outer prefix model that contains it.

    ``path`` is the published path (under ``models/``); ``resolved`` is the build it named when looked up — read
    from there, not through ``path``, to never mix two revisions.
    """

    path: Path
    manifest: Manifest
    resolved: Path
    via_outer: bool = False


def translate_oserror(e: OSError, what: str) -> CacheError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"{what}: no space left on the cache filesystem")
    return CacheError(f"{what}: {e}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write ``path`` whole or not at all (temp file + rename); fsync file and directory if ``durable``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as e:
        raise translate_oserror(e, f"writing {path.name}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class Cache:
    """The cache root and read access to its layout. Safe across processes (flock) and threads."""

    def __init__(self, root: Path | str, *, fsync: bool = True) -> None:
        self.root = Path(root).absolute()
        self.fsync = fsync
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.snapshots = self.root / "snapshots"
        self.legacy_manifests = self.root / "manifests"  # version-1 manifests, read only to migrate them
        self.models = self.root / "models"
        self.locks = self.root / "locks"
        self.state = self.root / "state"
        self._activity_fd: int | None = None

    # ----- layout ---------------------------------------------------------------------------------------------

    def ensure_layout(self) -> None:
        """Create the directories (idempotent). The root stays world-readable: pods mount it read-only."""
        try:
            for d in (self.root, self.blobs, self.tmp, self.snapshots, self.models, self.locks, self.state,
                      self.state / "used", self.state / "replaced"):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the cache layout under {self.root}: {e}") from e

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest

    def model_dir(self, model_id: str) -> Path:
        return self.snapshots / model_id

    def build_dir(self, model_id: str, build: str) -> Path:
        return self.snapshots / model_id / build

    def journal_path(self, model_id: str, revision: str) -> Path:
        return self.tmp / f"{model_id}.{revision}.journal"

    def chunks_path(self, digest: str) -> Path:
        return self.state / "chunks" / digest

    def tmp_download_path(self, src_id: str) -> Path:
        return self.tmp / f"{src_id}.incomplete"

    def mirrored_path(self, uri: ModelUri) -> Path:
        return self.root / uri.mirrored_relpath

    # ----- activity: who may recover ------------------------------------------------------------------------

    def join_activity(self, *, exclusive: bool = False) -> bool:
        """Hold the activity lock for this process's life: shared to work, exclusive (if free now) to recover.

        Returns True if the exclusive lock was taken (the caller may then delete half-built state, and must call
        :meth:`share_activity` afterwards). Every process that builds holds at least the shared lock, so a
        recovery never deletes what another process is building.
        """
        if self._activity_fd is None:
            self._activity_fd = locks.open_lock_file(self.locks, locks.ACTIVITY_LOCK)
        if exclusive and locks.try_lock_exclusive(self._activity_fd):
            return True
        locks.lock_shared(self._activity_fd)  # waits only while another process recovers
        return False

    @property
    def joined_activity(self) -> bool:
        return self._activity_fd is not None

    def share_activity(self) -> None:
        """Downgrade an exclusive activity lock to shared (after recovery)."""
        if self._activity_fd is not None:
            locks.lock_shared(self._activity_fd)

    def close(self) -> None:
        """Leave the activity lock (it also goes when the process exits)."""
        if self._activity_fd is not None:
            os.close(self._activity_fd)
            self._activity_fd = None

    def __del__(self) -> None:
        self.close()

    # ----- builds and manifests ---------------------------------------------------------------------------

    def read_build_manifest(self, build_dir: Path) -> Manifest | None:
        try:
            return Manifest.from_dict(layout.read_manifest_data(build_dir))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("ignoring unreadable manifest in %s: %s", build_dir, e)
            return None

    def builds(self, model_id: str) -> list[Path]:
        """The complete builds of a model (live, replaced or never published), oldest name first."""
        out: list[Path] = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for e in os.scandir(self.model_dir(model_id)):
                if e.is_dir(follow_symlinks=False) and not e.name.endswith(layout.INCOMPLETE_SUFFIX):
                    out.append(Path(e.path))
        return sorted(out)

    def model_ids(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(e.name for e in os.scandir(self.snapshots) if e.is_dir(follow_symlinks=False))
        return []

    def pointer_target(self, pointer: Path) -> layout.ResolvedModel | None:
        """The build a pointer names (None: no pointer, a dangling one, or one outside ``snapshots/``)."""
        if not pointer.is_symlink():
            return None
        resolved = layout.resolve(self.root, pointer)
        if resolved is None or not resolved.target.exists():
            return None
        return resolved

    def live_build(self, model_id: str) -> tuple[Path, Manifest] | None:
        """The build of ``model_id`` its pointer names, with its manifest; trusted or not."""
        for build in reversed(self.builds(model_id)):
            m = self.read_build_manifest(build)
            if m is None:
                continue
            resolved = self.pointer_target(self.root / m.path)
            if resolved is None or resolved.model_id != model_id:
                return None
            live = resolved.build_dir
            if live == build:
                return build, m
            lm = self.read_build_manifest(live)
            return (live, lm) if lm is not None else None
        return None

    def live_builds(self) -> Iterator[tuple[Path, Manifest]]:
        """Every model's live build with its manifest, trusted or not."""
        for model_id in self.model_ids():
            live = self.live_build(model_id)
            if live is not None:
                yield live

    def read_manifest(self, model_id: str) -> Manifest | None:
        """The live, trusted manifest of a model (with its last use), or None."""
        live = self.live_build(model_id)
        if live is None:
            return None
        build, m = live
        if not layout.is_trusted(build, m.boot_id):
            return None
        return replace(m, last_used=self.last_used(model_id) or m.fetched_at)

    def list_manifests(self) -> list[Manifest]:
        """Every live, trusted model."""
        out = []
        for model_id in self.model_ids():
            m = self.read_manifest(model_id)
            if m is not None:
                out.append(m)
        return out

    # ----- lookup ---------------------------------------------------------------------------------------------

    def _outer_pointer(self, uri: ModelUri) -> Path | None:
        """The first symlink among the ancestors of ``uri``'s mirrored path, if any (an outer model)."""
        rel = Path(uri.mirrored_relpath)
        cur = self.root
        for part in rel.parts[:-1]:
            cur = cur / part
            try:
                mode = os.lstat(cur).st_mode  # one look: a directory pruned meanwhile is simply absent
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(mode):
                return cur
            if not stat.S_ISDIR(mode):
                raise OverlappingModelError(f"{uri}: {cur.relative_to(self.root)} is a file of another model")
        return None

    def _trusted_manifest(self, resolved: layout.ResolvedModel) -> Manifest | None:
        m = self.read_build_manifest(resolved.build_dir)
        if m is None or m.model_id != resolved.model_id or not layout.is_trusted(resolved.build_dir, m.boot_id):
            return None
        return replace(m, last_used=self.last_used(m.model_id) or m.fetched_at)

    def lookup(self, uri: ModelUri) -> Lookup | None:
        """The ready path for ``uri`` (its own model, or inside a ready outer prefix model), or None."""
        outer = self._outer_pointer(uri)
        path = self.mirrored_path(uri)
        if outer is not None:
            resolved_outer = self.pointer_target(outer)
            m = self._trusted_manifest(resolved_outer) if resolved_outer else None
            if m is None:
                return None
            if not path.exists() or (uri.is_prefix != path.is_dir()):
                raise OverlappingModelError(
                    f"{uri} lies inside the cached model {m.uri}, which has no "
                    f"{'directory' if uri.is_prefix else 'file'} there; request {m.uri} or a path it contains")
            return Lookup(path=path, manifest=m, resolved=Path(os.path.realpath(path)), via_outer=True)
        resolved = self.pointer_target(path)
        if resolved is None or resolved.model_id != uri.model_id:
            return None  # nothing there, or the place of another model (``s3://b/m`` vs ``s3://b/m/``)
        m = self._trusted_manifest(resolved)
        if m is None or m.uri != uri.uri:
            return None
        return Lookup(path=path, manifest=m, resolved=resolved.target)

    def check_overlap(self, uri: ModelUri) -> None:
        """Refuse a URI whose place holds inner models, or another model of the same name, with the reason."""
        self._outer_pointer(uri)
        path = self.mirrored_path(uri)
        if path.is_dir() and not path.is_symlink():
            inner = [m.uri for m in self.list_manifests() if m.path.startswith(uri.mirrored_relpath + "/")]
            raise OverlappingModelError(
                f"{uri} overlaps models already cached inside it ({', '.join(inner[:3]) or 'unknown'}); "
                "evict those first or request them individually")
        resolved = self.pointer_target(path) if path.is_symlink() else None
        if resolved is not None and resolved.model_id != uri.model_id:
            m = self.read_build_manifest(resolved.build_dir)
            other = m.uri if m else "another model"
            raise OverlappingModelError(
                f"{uri} and {other} name the same place ({uri.mirrored_relpath}): an object and a prefix of the "
                f"same name cannot both be cached; evict {other} first")

    # ----- locks ------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def model_lock(self, model_id: str, *, poll: float = 0.05) -> AsyncIterator[None]:
        """Exclusive across processes and tasks: one builder (or evicter, or gc) per model on the node."""
        async with locks.hold_async(self.locks, locks.model_lock_name(model_id), poll=poll):
            yield

    @contextlib.asynccontextmanager
    async def source_lock(self, src_id: str, *, poll: float = 0.05) -> AsyncIterator[None]:
        """Exclusive across processes and tasks: one writer per ``tmp/<source-id>.incomplete``.

        Two models can contain the same object (``s3://b/m/`` and ``s3://b/m/a.bin``); their downloads resume into
        the same temp file, so without this one would truncate or adopt the file under the other.
        """
        async with locks.hold_async(self.locks, locks.source_lock_name(src_id), poll=poll):
            yield

    def try_model_lock(self, model_id: str) -> contextlib.AbstractContextManager[bool]:
        """The model's lock if free right now (blocking callers off the loop: gc, eviction)."""
        return locks.try_hold(self.locks, locks.model_lock_name(model_id))

    def is_locked(self, model_id: str) -> bool:
        """True if some process holds the model's lock (a fetch is in progress)."""
        return locks.is_held(self.locks, locks.model_lock_name(model_id))

    @contextlib.contextmanager
    def blob_lock(self) -> Iterator[None]:
        """Short exclusive lock around blob adoption and deletion (blocking; hold it briefly, off the loop)."""
        with locks.hold(self.locks, locks.BLOBS_LOCK):
            yield

    @contextlib.contextmanager
    def publish_lock(self) -> Iterator[None]:
        """Short exclusive lock around swapping and pruning pointers under ``models/`` (blocking; off the loop)."""
        with locks.hold(self.locks, locks.PUBLISH_LOCK):
            yield

    # ----- bookkeeping ------------------------------------------------------------------------------------

    def touch(self, model_id: str) -> None:
        """Record a use (for LRU). Best effort: a failure here never fails a demand, nor touches a build."""
        with contextlib.suppress(OSError, CacheError):
            atomic_write(self.state / "used" / model_id, now_iso().encode())

    def last_used(self, model_id: str) -> str:
        try:
            return (self.state / "used" / model_id).read_text("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return ""

    def read_pins(self) -> set[str]:
        """Model ids the daemon's pods use (written by the daemon; read by any process that evicts)."""
        try:
            data = json.loads((self.state / "pins.json").read_text("utf-8"))
            return {str(x) for x in data.get("model_ids", [])}
        except (FileNotFoundError, ValueError, AttributeError):
            return set()

    def write_pins(self, model_ids: Iterable[str]) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state / "pins.json",
                     json.dumps({"model_ids": sorted(set(model_ids)), "written_at": now_iso()}).encode())

    def source_index(self) -> dict[tuple[str, str, str, int], str]:
        """(bucket, key, etag, size) → digest for every file of every live, trusted model (to skip downloads)."""
        index: dict[tuple[str, str, str, int], str] = {}
        for m in self.list_manifests():
            if m.digest_scheme != layout.DIGEST_SCHEME:
                continue
            bucket = m.model_uri.bucket
            for f in m.files:
                if f.etag:
                    index[(bucket, f.key, f.etag, f.size)] = f.xxh3_128
        return index

    # ----- accounting ------------------------------------------------------------------------------------

    def blob_bytes(self) -> int:
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.blobs):
                with contextlib.suppress(FileNotFoundError):
                    total += e.stat(follow_symlinks=False).st_size
        return total

    def tmp_bytes(self) -> int:
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.tmp):
                with contextlib.suppress(FileNotFoundError):
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:  # a second link: a blob, counted there
                        total += st.st_blocks * 512
        return total

    def used_bytes(self) -> int:
        """Bytes the cache occupies: every blob once, plus downloads in progress."""
        return self.blob_bytes() + self.tmp_bytes()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # ----- maintenance (implemented in agent.store.maintenance; here for callers that hold a Cache) -------------

    def remove_model(self, model_id: str) -> int:
        from agent.store import maintenance

        return maintenance.remove_model(self, model_id)

    def remove_old_revisions(self, *, min_age_seconds: float) -> int:
        from agent.store import maintenance

        return maintenance.remove_old_revisions(self, grace_seconds=min_age_seconds)

    def sweep_orphan_blobs(self, *, min_age_seconds: float = SWEEP_MIN_AGE_SECONDS) -> int:
        from agent.store import maintenance

        return maintenance.sweep_orphan_blobs(self, min_age_seconds=min_age_seconds)

    def recover(self, *, orphan_max_age_seconds: float) -> dict[str, int]:
        from agent.store import maintenance

        return maintenance.recover(self, orphan_max_age_seconds=orphan_max_age_seconds)


__all__ = ["Cache", "Lookup", "atomic_write", "fsync_dir", "translate_oserror"]
