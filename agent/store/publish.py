"""Building a revision beside the live one, and the one commit point: the pointer swap.

A build starts as ``snapshots/<id>/<revision>.<random>.incomplete/data/``; verified downloads are adopted into
``blobs/`` and hardlinked there. ``publish`` writes the build's manifest inside it, renames the directory to its
final name (from then on it never changes) and swaps the pointer under ``models/`` with ``os.replace`` of a new
relative symlink. The replaced build is recorded with the time of the swap, so it stays readable for the grace
period counted from then. Nothing here waits for the disk: the build's bytes are flushed afterwards
(:func:`agent.store.maintenance.flush_build`), and until then the build is trusted only during the boot that wrote it.

The caller holds the model's lock for the whole build (:meth:`agent.store.cache.Cache.model_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from agent.errors import CacheError, IntegrityError, OverlappingModelError
from agent.store import layout
from agent.store.cache import Cache, atomic_write, fsync_dir, translate_oserror
from agent.store.manifest import Manifest, ManifestFile, now_iso
from agent.uris import ModelUri

log = logging.getLogger(__name__)

#: Test-only: the name of a publish step at which to ``os._exit`` (crash-point tests kill a publish mid-way).
FAILPOINT_ENV = "WEIGHTCACHE_TEST_FAILPOINT"


def _failpoint(step: str) -> None:
    if os.environ.get(FAILPOINT_ENV) == step:
        os._exit(137)


class Build:
    """One revision of a model under construction: a staging tree only its builder writes."""

    def __init__(self, cache: Cache, model_id: str, revision: str) -> None:
        self.cache = cache
        self.model_id = model_id
        self.revision = revision
        self.name = f"{revision}.{uuid.uuid4().hex[:8]}"
        self.final_dir = cache.build_dir(model_id, self.name)
        self.staging = self.final_dir.with_name(self.name + layout.INCOMPLETE_SUFFIX)
        self.data = self.staging / layout.DATA_DIR

    def create(self) -> None:
        try:
            self.data.mkdir(parents=True)
        except OSError as e:
            raise translate_oserror(e, f"creating the build of {self.model_id}") from e

    def discard(self) -> None:
        """Remove the staging tree (a failed or abandoned build); its model directory too if now empty."""
        shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.staging.parent.rmdir()  # only if empty: no other build of this model lives there

    def _dest(self, relpath: str) -> Path:
        """The staging path for ``relpath``, its parent directories created — never the staging tree itself.

        A failed fetch removes its staging tree; a late adopt (a worker thread that outlived its cancelled task)
        must then fail with FileNotFoundError, not quietly re-create the tree and leave it behind.
        """
        if not self.data.is_dir():
            raise FileNotFoundError(errno.ENOENT, "the staging tree is gone (its fetch was abandoned)",
                                    str(self.staging))
        dest = self.data / relpath
        d = self.data
        for part in dest.relative_to(self.data).parts[:-1]:
            d = d / part
            with contextlib.suppress(FileExistsError):
                d.mkdir()
        return dest

    def adopt_file(self, tmp_file: Path, *, digest: str, size: int, relpath: str,
                   chunks: list[bytes] | None = None) -> None:
        """Move a verified download into ``blobs/`` (or reuse an identical blob) and link it into the build.

        ``chunks`` (the file's chunk digests) are kept beside the blob, so peers can be served it chunk by chunk.
        """
        blob = self.cache.blob_path(digest)
        try:
            dest = self._dest(relpath)
            with self.cache.blob_lock():
                os.chmod(tmp_file, 0o444)
                try:
                    os.link(tmp_file, blob)
                except FileExistsError:
                    if blob.stat().st_size != size:
                        raise IntegrityError(f"blob {digest} exists with the wrong size; run verify") from None
                with contextlib.suppress(FileNotFoundError):
                    dest.unlink()
                os.link(blob, dest)
                if chunks is not None:  # under the blob lock: a sweep never sees it without its blob
                    record_chunks(self.cache, digest, chunks)
            tmp_file.unlink()
        except OSError as e:
            raise translate_oserror(e, f"storing {relpath}") from e

    def link_existing_blob(self, *, digest: str, size: int, relpath: str) -> bool:
        """Link an already-cached blob into the build; False if it is gone or damaged."""
        blob = self.cache.blob_path(digest)
        try:
            dest = self._dest(relpath)
            with self.cache.blob_lock():
                if blob.stat().st_size != size:
                    return False
                with contextlib.suppress(FileNotFoundError):
                    dest.unlink()
                os.link(blob, dest)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise translate_oserror(e, f"linking {relpath}") from e

    def publish(self, *, uri: ModelUri, files: list[ManifestFile], fetch_seconds: float) -> Manifest:
        """Seal the build (manifest inside, final name), then swap the pointer: the one commit point."""
        cache = self.cache
        pointer = cache.mirrored_path(uri)
        cache.check_overlap(uri)
        manifest = Manifest(
            uri=uri.uri, kind="prefix" if uri.is_prefix else "object", model_id=self.model_id,
            revision=self.revision, snapshot=str(self.final_dir.relative_to(cache.root)),
            path=uri.mirrored_relpath, files=tuple(files), total_bytes=sum(f.size for f in files),
            fetched_at=now_iso(), fetch_seconds=round(fetch_seconds, 3), build=self.name,
            boot_id=layout.current_boot_id())
        swapped = False
        try:
            with open(self.staging / layout.MANIFEST_NAME, "x", encoding="utf-8") as f:
                f.write(manifest.to_json())
            _failpoint("sealed-manifest")
            os.rename(self.staging, self.final_dir)
            _failpoint("renamed-build")
            if cache.fsync:
                fsync_dir(self.final_dir.parent)  # the rename that seals the build survives power loss
            data = self.final_dir / layout.DATA_DIR
            target = data if uri.is_prefix else data / files[0].path
            # One publisher at a time, overlap checked again inside: an outer prefix model published while this
            # (inner) one downloaded would otherwise have its build written into through its own pointer.
            with cache.publish_lock():
                cache.check_overlap(uri)
                outer = cache._outer_pointer(uri)
                if outer is not None:
                    raise OverlappingModelError(
                        f"{uri} lies inside {outer.relative_to(cache.root)}, a model published meanwhile; "
                        "it is served from there")
                old = cache.pointer_target(pointer)
                pointer.parent.mkdir(parents=True, exist_ok=True)
                tmp_link = pointer.parent / f".{pointer.name}.{uuid.uuid4().hex}.link"
                os.symlink(os.path.relpath(target, pointer.parent), tmp_link)
                try:
                    _failpoint("before-swap")
                    os.replace(tmp_link, pointer)  # <- the commit point
                    swapped = True
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp_link.unlink()
                _failpoint("after-swap")
                if cache.fsync:
                    fsync_dir(pointer.parent)
            if old is not None and old.build_dir != self.final_dir:
                record_replaced(cache, self.model_id, old.build)
                log.info("published %s build %s (replaces %s, kept for open readers)", uri, self.name, old.build)
            cache.touch(self.model_id)
            return manifest
        except OverlappingModelError:
            self._unseal()
            raise
        except OSError as e:
            if not swapped:
                self._unseal()
            raise translate_oserror(e, f"publishing {uri}") from e

    def _unseal(self) -> None:
        """A build that could not be made live goes (nothing points at it: it was never visible)."""
        shutil.rmtree(self.final_dir, ignore_errors=True)
        self.discard()


def record_replaced(cache: Cache, model_id: str, build: str, *, when: float | None = None) -> None:
    """Remember when a build stopped being live: its grace is counted from this moment."""
    with contextlib.suppress(CacheError):  # best effort: a lost record only starts the grace later (gc records it)
        # Rounded down to the millisecond: rounded to nearest, a record could lie up to 0.5 ms in the future, and a
        # gc with no grace right after would keep the build.
        stamp = math.floor((when or time.time()) * 1000) / 1000
        atomic_write(cache.state / "replaced" / f"{model_id}.{build}", f"{stamp:.3f}".encode())


def replaced_at(cache: Cache, model_id: str, build: str) -> float | None:
    try:
        return float((cache.state / "replaced" / f"{model_id}.{build}").read_text("ascii"))
    except (OSError, ValueError):
        return None


# ----- chunk digests of blobs, for peers -------------------------------------------------------------------


def record_chunks(cache: Cache, digest: str, chunks: list[bytes]) -> None:
    """Keep a blob's chunk digests (16 bytes each, in order) in ``state/chunks/<digest>``; best effort."""
    if layout.combine_chunk_digests(chunks) != digest:
        raise IntegrityError(f"chunk digests do not make up {digest}")
    path = cache.chunks_path(digest)
    if path.exists():
        return
    with contextlib.suppress(CacheError):  # lost, the blob is only not offered to peers
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, b"".join(chunks))


def read_chunks(cache: Cache, digest: str, size: int) -> list[bytes] | None:
    """A blob's chunk digests, if recorded and consistent with its digest and size; else None."""
    try:
        data = cache.chunks_path(digest).read_bytes()
    except OSError:
        return None
    chunks = [data[i:i + 16] for i in range(0, len(data), 16)]
    if len(chunks) != -(-size // layout.CHUNK_SIZE) or layout.combine_chunk_digests(chunks) != digest:
        return None
    return chunks


def forget_chunks(cache: Cache, digest: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        cache.chunks_path(digest).unlink()


# ----- journal: files of a revision already verified, for resume ------------------------------------------


def journal_append(cache: Cache, model_id: str, revision: str, entry: ManifestFile) -> None:
    line = json.dumps({"boot_id": layout.current_boot_id(), **asdict(entry)}, ensure_ascii=False) + "\n"
    try:
        fd = os.open(cache.journal_path(model_id, revision), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as e:  # a full disk here is DiskFull like anywhere else, not an InternalError
        raise translate_oserror(e, f"recording {entry.path} in the journal") from e


def journal_read(cache: Cache, model_id: str, revision: str) -> dict[str, ManifestFile]:
    """Files already verified for this revision during this boot (a torn last line, older boots: ignored)."""
    out: dict[str, ManifestFile] = {}
    try:
        text = cache.journal_path(model_id, revision).read_text("utf-8", errors="replace")
    except FileNotFoundError:
        return out
    boot = layout.current_boot_id()
    for line in text.splitlines():
        try:
            d = json.loads(line)
            if d.pop("boot_id", None) != boot:
                continue  # its blob may never have reached the disk
            f = ManifestFile(**d)
            out[f.path] = f
        except (ValueError, TypeError):
            continue
    return out


def journal_clear(cache: Cache, model_id: str, revision: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        cache.journal_path(model_id, revision).unlink()


__all__ = ["FAILPOINT_ENV", "Build", "forget_chunks", "journal_append", "journal_clear", "journal_read",
           "read_chunks", "record_chunks", "record_replaced", "replaced_at"]
