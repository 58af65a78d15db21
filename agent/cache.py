"""The on-disk cache: content-addressed blobs, snapshots, manifests, atomic publish, locks and recovery.

Layout under the root (after huggingface_hub's cache, with hardlinks where it uses symlinks so that a model file
is a plain file a pod can mmap, and relative symlinks only for the published pointer)::

    blobs/<xxh3-128>                      every distinct file once, read-only; nlink-1 = snapshots using it
    tmp/<source-id>.incomplete            a download in progress (+ .parts: finished parts, for resume)
    tmp/<model-id>.<revision>.journal     files of a model already verified (for resume)
    snapshots/<model-id>/<revision>/...   a model's files (hardlinks of blobs); built as <revision>.incomplete
    manifests/<model-id>.json             the model's manifest (files, sizes, xxh3, ETags, revision, times)
    models/s3/<bucket>/<key-or-prefix>    the published pointer: a relative symlink into snapshots/
    locks/                                flock files: one per model, one for blob mutations
    state/pins.json                       models the daemon's pods use (never evicted)

A model becomes visible at ``models/...`` only by ``os.replace`` of a finished symlink, after its snapshot and
manifest are complete: nothing is ever visible half-written. This module does no network I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from agent.errors import CacheError, DiskFullError, IntegrityError, OverlappingModelError
from agent.manifest import Manifest, ManifestFile, now_iso
from agent.uris import ModelUri

log = logging.getLogger(__name__)

#: A blob whose inode changed this recently may be between adoption and its snapshot link: never sweep it.
SWEEP_MIN_AGE_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class Lookup:
    """Where a URI is served from, if it is ready: its own model, or an outer prefix model that contains it."""

    path: Path
    manifest: Manifest
    via_outer: bool = False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: fsyncs in flight at once when publishing: concurrent fsyncs share journal commits (ext4, xfs), so a model
#: of many small files is durable in a few commits instead of one commit per file.
FSYNC_PARALLELISM = 16


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_files(paths: list[Path]) -> None:
    """fsync every file, many at once; the first error is raised after all have been tried."""
    if len(paths) <= 1:
        for p in paths:
            _fsync_file(p)
        return
    with ThreadPoolExecutor(max_workers=min(FSYNC_PARALLELISM, len(paths)), thread_name_prefix="fsync") as pool:
        for future in [pool.submit(_fsync_file, p) for p in paths]:
            future.result()


def _make_dirs_inside(staging: Path, dest: Path) -> None:
    """Create ``dest``'s parent directories below ``staging``, never ``staging`` itself.

    A failed fetch removes its staging tree; a late adopt (a worker thread that outlived its cancelled task) must
    then fail with FileNotFoundError, not quietly re-create the tree and leave it behind under ``snapshots/``.
    """
    if not staging.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the staging tree is gone (its fetch was abandoned)", str(staging))
    d = staging
    for part in dest.relative_to(staging).parts[:-1]:
        d = d / part
        with contextlib.suppress(FileExistsError):
            d.mkdir()


def _translate_oserror(e: OSError, what: str) -> CacheError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"{what}: no space left on the cache filesystem")
    return CacheError(f"{what}: {e}")


class Cache:
    """The cache root and every operation on its layout. Safe across processes (flock) and threads."""

    def __init__(self, root: Path | str, *, fsync: bool = True) -> None:
        self.root = Path(root).absolute()
        self.fsync = fsync
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.snapshots = self.root / "snapshots"
        self.manifests_dir = self.root / "manifests"
        self.models = self.root / "models"
        self.locks = self.root / "locks"
        self.state = self.root / "state"

    # ----- layout ---------------------------------------------------------------------------------------------

    def ensure_layout(self) -> None:
        """Create the directories (idempotent). The root stays world-readable: pods mount it read-only."""
        try:
            for d in (self.root, self.blobs, self.tmp, self.snapshots, self.manifests_dir, self.models,
                      self.locks, self.state):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the cache layout under {self.root}: {e}") from e

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest

    def manifest_path(self, model_id: str) -> Path:
        return self.manifests_dir / f"{model_id}.json"

    def snapshot_dir(self, model_id: str, revision: str) -> Path:
        return self.snapshots / model_id / revision

    def staging_dir(self, model_id: str, revision: str) -> Path:
        return self.snapshots / model_id / f"{revision}.incomplete"

    def journal_path(self, model_id: str, revision: str) -> Path:
        return self.tmp / f"{model_id}.{revision}.journal"

    def tmp_download_path(self, src_id: str) -> Path:
        return self.tmp / f"{src_id}.incomplete"

    def mirrored_path(self, uri: ModelUri) -> Path:
        return self.root / uri.mirrored_relpath

    # ----- manifests --------------------------------------------------------------------------------------

    def read_manifest(self, model_id: str) -> Manifest | None:
        try:
            data = json.loads(self.manifest_path(model_id).read_text("utf-8"))
            return Manifest.from_dict(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("ignoring unreadable manifest %s: %s", model_id, e)
            return None

    def write_manifest(self, manifest: Manifest) -> None:
        self._atomic_write(self.manifest_path(manifest.model_id), manifest.to_json().encode("utf-8"))

    def list_manifests(self) -> list[Manifest]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for p in sorted(self.manifests_dir.glob("*.json")):
                m = self.read_manifest(p.stem)
                if m is not None:
                    out.append(m)
        return out

    def touch(self, model_id: str) -> None:
        """Record a use (for LRU). Best effort: a failure here never fails a demand."""
        m = self.read_manifest(model_id)
        if m is not None:
            with contextlib.suppress(OSError):
                self.write_manifest(replace(m, last_used=now_iso()))

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise _translate_oserror(e, f"writing {path.name}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # ----- lookup ---------------------------------------------------------------------------------------------

    def _outer_pointer(self, uri: ModelUri) -> Path | None:
        """The first symlink among the ancestors of ``uri``'s mirrored path, if any (an outer model)."""
        rel = Path(uri.mirrored_relpath)
        cur = self.root
        for part in rel.parts[:-1]:
            cur = cur / part
            if cur.is_symlink():
                return cur
            if cur.exists() and not cur.is_dir():
                raise OverlappingModelError(f"{uri}: {cur.relative_to(self.root)} is a file of another model")
        return None

    def _manifest_for_pointer(self, pointer: Path) -> Manifest | None:
        try:
            target = Path(os.path.realpath(pointer))
            rel = target.relative_to(self.snapshots)
        except (OSError, ValueError):
            return None
        model_id = rel.parts[0] if rel.parts else ""
        m = self.read_manifest(model_id)
        if m is None or len(rel.parts) < 2 or rel.parts[1] != m.revision:
            return None
        return m

    def lookup(self, uri: ModelUri) -> Lookup | None:
        """The ready path for ``uri`` (its own model, or inside a ready outer prefix model), or None."""
        outer = self._outer_pointer(uri)
        if outer is not None:
            m = self._manifest_for_pointer(outer)
            path = self.mirrored_path(uri)
            if m is None:
                return None
            if not path.exists() or (uri.is_prefix != path.is_dir()):
                raise OverlappingModelError(
                    f"{uri} lies inside the cached model {m.uri}, which has no "
                    f"{'directory' if uri.is_prefix else 'file'} there; request {m.uri} or a path it contains")
            return Lookup(path=path, manifest=m, via_outer=True)
        pointer = self.mirrored_path(uri)
        if not pointer.is_symlink():
            return None
        m = self._manifest_for_pointer(pointer)
        if m is None or m.uri != uri.uri or not pointer.exists():
            return None
        return Lookup(path=pointer, manifest=m)

    def check_overlap(self, uri: ModelUri) -> None:
        """Refuse a URI whose mirrored path already holds inner models (a real directory), with the reason."""
        self._outer_pointer(uri)
        path = self.mirrored_path(uri)
        if path.is_dir() and not path.is_symlink():
            inner = [m.uri for m in self.list_manifests() if m.path.startswith(uri.mirrored_relpath + "/")]
            raise OverlappingModelError(
                f"{uri} overlaps models already cached inside it ({', '.join(inner[:3]) or 'unknown'}); "
                "evict those first or request them individually")

    # ----- locks ------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def model_lock(self, model_id: str, *, poll: float = 0.05) -> AsyncIterator[None]:
        """Exclusive across processes and tasks: one download per model on the node."""
        async with self._async_flock(f"model-{model_id}.lock", poll=poll):
            yield

    @contextlib.asynccontextmanager
    async def source_lock(self, src_id: str, *, poll: float = 0.05) -> AsyncIterator[None]:
        """Exclusive across processes and tasks: one writer per ``tmp/<source-id>.incomplete``.

        Two models can contain the same object (``s3://b/m/`` and ``s3://b/m/a.bin``); their downloads resume into
        the same temp file, so without this one would truncate or adopt the file under the other.
        """
        async with self._async_flock(f"source-{src_id}.lock", poll=poll):
            yield

    @contextlib.asynccontextmanager
    async def _async_flock(self, name: str, *, poll: float) -> AsyncIterator[None]:
        # flock belongs to the open file description, so two tasks of one process exclude each other too.
        self.locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.locks / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(poll)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def is_locked(self, model_id: str) -> bool:
        """True if some process holds the model's lock (a fetch is in progress)."""
        path = self.locks / f"model-{model_id}.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def blob_lock(self) -> Iterator[None]:
        """Short exclusive lock around blob adoption and deletion (blocking; hold it briefly, off the loop)."""
        self.locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.locks / "blobs.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _publish_lock(self) -> Iterator[None]:
        """Short exclusive lock around swapping pointers under ``models/`` (blocking; off the loop)."""
        self.locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.locks / "publish.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ----- building a model -----------------------------------------------------------------------------

    def reset_staging(self, model_id: str, revision: str) -> Path:
        staging = self.staging_dir(model_id, revision)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def adopt_file(self, tmp_file: Path, *, digest: str, size: int, staging: Path, relpath: str) -> None:
        """Move a verified download into ``blobs/`` (or reuse an identical blob) and link it into the staging tree."""
        blob = self.blob_path(digest)
        dest = staging / relpath
        try:
            _make_dirs_inside(staging, dest)
            with self.blob_lock():
                os.chmod(tmp_file, 0o444)
                try:
                    os.link(tmp_file, blob)
                except FileExistsError:
                    if blob.stat().st_size != size:
                        raise IntegrityError(f"blob {digest} exists with the wrong size; run verify") from None
                with contextlib.suppress(FileNotFoundError):
                    dest.unlink()
                os.link(blob, dest)
            tmp_file.unlink()
        except OSError as e:
            raise _translate_oserror(e, f"storing {relpath}") from e

    def link_existing_blob(self, *, digest: str, size: int, staging: Path, relpath: str) -> bool:
        """Link an already-cached blob into the staging tree; False if it is gone or damaged."""
        blob = self.blob_path(digest)
        dest = staging / relpath
        try:
            _make_dirs_inside(staging, dest)
            with self.blob_lock():
                if blob.stat().st_size != size:
                    return False
                with contextlib.suppress(FileNotFoundError):
                    dest.unlink()
                os.link(blob, dest)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise _translate_oserror(e, f"linking {relpath}") from e

    def source_index(self) -> dict[tuple[str, str, str, int], str]:
        """(bucket, key, etag, size) → digest for every file of every ready model (to skip re-downloads)."""
        index: dict[tuple[str, str, str, int], str] = {}
        for m in self.list_manifests():
            bucket = m.model_uri.bucket
            for f in m.files:
                if f.etag:
                    index[(bucket, f.key, f.etag, f.size)] = f.xxh3_128
        return index

    def publish(self, *, uri: ModelUri, revision: str, files: list[ManifestFile], fetch_seconds: float) -> Manifest:
        """Turn the staging tree into a snapshot, write the manifest, then atomically swap the pointer."""
        model_id = uri.model_id
        staging = self.staging_dir(model_id, revision)
        snapshot = self.snapshot_dir(model_id, revision)
        pointer = self.mirrored_path(uri)
        self.check_overlap(uri)
        total = sum(f.size for f in files)
        try:
            if self.fsync:
                _fsync_files([staging / f.path for f in files])
            # One publisher at a time, overlap checked again inside: an outer prefix model published while this
            # (inner) one downloaded would otherwise have its snapshot written into through its own pointer.
            with self._publish_lock():
                self.check_overlap(uri)
                outer = self._outer_pointer(uri)
                if outer is not None:
                    raise OverlappingModelError(
                        f"{uri} lies inside {outer.relative_to(self.root)}, a model published meanwhile; "
                        "it is served from there")
                if snapshot.exists():  # same revision published before (e.g. pointer lost): replace it whole
                    shutil.rmtree(snapshot)
                os.rename(staging, snapshot)
                target = snapshot if uri.is_prefix else snapshot / files[0].path
                snapshot_rel = str(snapshot.relative_to(self.root))
                old = self.read_manifest(model_id)
                manifest = Manifest(
                    uri=uri.uri, kind="prefix" if uri.is_prefix else "object", model_id=model_id,
                    revision=revision, snapshot=snapshot_rel, path=uri.mirrored_relpath, files=tuple(files),
                    total_bytes=total, fetched_at=now_iso(), last_used=now_iso(),
                    fetch_seconds=round(fetch_seconds, 3))
                self.write_manifest(manifest)
                pointer.parent.mkdir(parents=True, exist_ok=True)
                link_text = os.path.relpath(target, pointer.parent)
                tmp_link = pointer.parent / f".{pointer.name}.{uuid.uuid4().hex}.link"
                os.symlink(link_text, tmp_link)
                try:
                    os.replace(tmp_link, pointer)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp_link.unlink()
                if self.fsync:
                    _fsync_dir(pointer.parent)
            if old is not None and old.revision != revision:
                log.info("published %s revision %s (replaces %s, kept for open readers)", uri, revision,
                         old.revision)
            return manifest
        except OSError as e:
            raise _translate_oserror(e, f"publishing {uri}") from e

    # ----- journal (resume of whole files) --------------------------------------------------------------

    def journal_append(self, model_id: str, revision: str, entry: ManifestFile) -> None:
        line = json.dumps(asdict(entry), ensure_ascii=False) + "\n"
        try:
            fd = os.open(self.journal_path(model_id, revision), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
        except OSError as e:  # a full disk here is DiskFull like anywhere else, not an InternalError
            raise _translate_oserror(e, f"recording {entry.path} in the journal") from e

    def journal_read(self, model_id: str, revision: str) -> dict[str, ManifestFile]:
        """Files already verified for this model revision (a torn last line is ignored)."""
        out: dict[str, ManifestFile] = {}
        try:
            text = self.journal_path(model_id, revision).read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            try:
                f = ManifestFile(**json.loads(line))
                out[f.path] = f
            except (ValueError, TypeError):
                continue
        return out

    def journal_clear(self, model_id: str, revision: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.journal_path(model_id, revision).unlink()

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
                    total += e.stat(follow_symlinks=False).st_blocks * 512
        return total

    def used_bytes(self) -> int:
        """Bytes the cache occupies: every blob once, plus downloads in progress."""
        return self.blob_bytes() + self.tmp_bytes()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def read_pins(self) -> set[str]:
        """Model ids the daemon's pods use (written by the daemon; read by any process that evicts)."""
        try:
            data = json.loads((self.state / "pins.json").read_text("utf-8"))
            return {str(x) for x in data.get("model_ids", [])}
        except (FileNotFoundError, ValueError, AttributeError):
            return set()

    def write_pins(self, model_ids: Iterable[str]) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self._atomic_write(self.state / "pins.json",
                           json.dumps({"model_ids": sorted(set(model_ids)), "written_at": now_iso()}).encode())

    # ----- removal ---------------------------------------------------------------------------------------

    def remove_model(self, model_id: str) -> int:
        """Evict one model: pointer first, then manifest, snapshots, and the blobs nothing else uses.

        Returns the bytes freed. The caller holds the model's lock so no fetch of it runs meanwhile.
        """
        m = self.read_manifest(model_id)
        if m is not None:
            pointer = self.root / m.path
            if pointer.is_symlink():
                pointer.unlink()
                self._prune_empty_parents(pointer.parent)
            with contextlib.suppress(FileNotFoundError):
                self.manifest_path(model_id).unlink()
        digests = {f.xxh3_128 for f in m.files} if m else set()
        shutil.rmtree(self.snapshots / model_id, ignore_errors=True)
        freed = 0
        with self.blob_lock():
            for d in digests:
                blob = self.blob_path(d)
                try:
                    st = blob.stat()
                except FileNotFoundError:
                    continue
                if st.st_nlink <= 1:
                    blob.unlink()
                    freed += st.st_size
        return freed

    def _prune_empty_parents(self, directory: Path) -> None:
        models_s3 = self.models / "s3"
        while directory != models_s3 and models_s3 in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def remove_old_revisions(self, *, min_age_seconds: float) -> int:
        """Delete snapshots no manifest points at any more (replaced revisions), once they are old enough."""
        removed = 0
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for model_dir in self.snapshots.iterdir():
                m = self.read_manifest(model_dir.name)
                for snap in model_dir.iterdir():
                    if snap.name.endswith(".incomplete"):
                        continue
                    if m is not None and snap.name == m.revision:
                        continue
                    if m is None and self.is_locked(model_dir.name):
                        continue
                    if now - snap.stat().st_mtime < min_age_seconds:
                        continue
                    shutil.rmtree(snap, ignore_errors=True)
                    removed += 1
                self._remove_idle_model_dir(model_dir)
        return removed

    def _remove_idle_model_dir(self, model_dir: Path) -> None:
        """``rmdir`` an empty ``snapshots/<model-id>/``, only while holding that model's lock (skip it if busy).

        A fetch creates this directory and then its staging tree inside it (two ``mkdir`` calls) under the model's
        lock; an unlocked ``rmdir`` landing between the two (another model's fetch making room, or maintenance)
        would fail that fetch with FileNotFoundError.
        """
        try:
            fd = os.open(self.locks / f"model-{model_dir.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            model_dir.rmdir()
        except OSError:
            pass  # a fetch holds the lock (BlockingIOError), or the directory is not empty
        finally:
            os.close(fd)  # closing releases the lock

    def sweep_orphan_blobs(self, *, min_age_seconds: float = SWEEP_MIN_AGE_SECONDS) -> int:
        """Delete blobs no snapshot links to (nlink == 1) that have not changed recently. Returns bytes freed."""
        freed = 0
        now = time.time()
        with self.blob_lock(), contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.blobs):
                st = e.stat(follow_symlinks=False)
                if st.st_nlink <= 1 and now - st.st_ctime >= min_age_seconds:
                    os.unlink(e.path)
                    freed += st.st_size
        return freed

    # ----- recovery ---------------------------------------------------------------------------------------

    def recover(self, *, orphan_max_age_seconds: float) -> dict[str, int]:
        """Start-up cleanup: dangling pointers, half-built snapshots, stale temp files. Keeps resumable state.

        Partial downloads (``tmp/*.incomplete`` with their part records) are kept so the next fetch resumes them,
        unless untouched for ``orphan_max_age_seconds``.
        """
        self.ensure_layout()
        stats = {"dangling_pointers": 0, "staging_dirs": 0, "stale_tmp": 0, "stray_links": 0}
        now = time.time()
        # Pointers whose snapshot or manifest is gone: a half-published or half-evicted model. Remove them.
        for dirpath, dirnames, filenames in os.walk(self.models):
            for name in list(dirnames) + filenames:
                p = Path(dirpath) / name
                if name.endswith(".link") and name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        stats["stray_links"] += 1
                    continue
                if p.is_symlink():
                    if not p.exists() or self._manifest_for_pointer(p) is None:
                        p.unlink()
                        stats["dangling_pointers"] += 1
                    if name in dirnames:
                        dirnames.remove(name)
        for model_dir in list(self.snapshots.iterdir()) if self.snapshots.exists() else []:
            for snap in list(model_dir.iterdir()):
                if snap.name.endswith(".incomplete") and not self.is_locked(model_dir.name):
                    shutil.rmtree(snap, ignore_errors=True)
                    stats["staging_dirs"] += 1
        for e in os.scandir(self.tmp):
            with contextlib.suppress(FileNotFoundError):
                if now - e.stat().st_mtime > orphan_max_age_seconds:
                    os.unlink(e.path)
                    stats["stale_tmp"] += 1
        for p in self.manifests_dir.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if any(stats.values()):
            log.info("cache recovery: %s", stats)
        return stats


def iter_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield Path(dirpath) / f


__all__ = ["Cache", "Lookup", "iter_files"]
