"""Keeping the cache tidy and honest: evict a model, remove replaced builds after their grace, sweep orphan blobs,
flush builds to disk (then mark them durable), and recover at start-up — including after a reboot.

Rules every function here keeps:
- a pointer is removed before what it names; a build is removed only when no pointer names it, under the model's
  lock, and (for a replaced build) only once ``grace`` has passed since it was *replaced*;
- half-built state (staging trees, temp files) is deleted only under the exclusive activity lock, which no other
  process holds while it works (:meth:`agent.store.cache.Cache.join_activity`); anything unexpected is skipped or
  removed, never fatal;
- after a reboot, a live build that was not known to be on disk is hidden, re-verified, and published again only
  if every byte matches its manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.store import layout
from agent.store.cache import Cache, atomic_write, fsync_dir
from agent.store.manifest import Manifest, ManifestFile
from agent.store.publish import forget_chunks, record_replaced, replaced_at

log = logging.getLogger(__name__)

#: fsyncs in flight at once when flushing: concurrent fsyncs share journal commits (ext4, xfs).
FSYNC_PARALLELISM = 16


# ----- removal ---------------------------------------------------------------------------------------------


def _build_digests(cache: Cache, build: Path) -> set[str]:
    m = cache.read_build_manifest(build)
    return {f.xxh3_128 for f in m.files} if m else set()


def _drop_unused_blobs(cache: Cache, digests: set[str]) -> int:
    freed = 0
    with cache.blob_lock():
        for d in digests:
            blob = cache.blob_path(d)
            try:
                st = blob.stat()
            except FileNotFoundError:
                continue
            if st.st_nlink <= 1:
                blob.unlink()
                forget_chunks(cache, d)
                freed += st.st_size
    return freed


def _remove_build(cache: Cache, model_id: str, build: Path) -> set[str]:
    """Delete one build that no pointer names (and its bookkeeping); returns its digests."""
    digests = _build_digests(cache, build)
    shutil.rmtree(build, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        layout.durable_marker(build).unlink()
    with contextlib.suppress(FileNotFoundError):
        (cache.state / "replaced" / f"{model_id}.{build.name}").unlink()
    return digests


def _prune_empty_parents(cache: Cache, directory: Path) -> None:
    models_s3 = cache.models / "s3"
    while directory != models_s3 and models_s3 in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def unpublish(cache: Cache, model_id: str) -> Manifest | None:
    """Remove the model's pointer if it names one of its builds; returns that build's manifest."""
    live = cache.live_build(model_id)
    if live is None:
        return None
    _build, m = live
    pointer = cache.root / m.path
    with cache.publish_lock():
        resolved = cache.pointer_target(pointer)
        if resolved is not None and resolved.model_id == model_id:
            pointer.unlink()
            if cache.fsync:
                fsync_dir(pointer.parent)
            _prune_empty_parents(cache, pointer.parent)
    return m


def remove_model(cache: Cache, model_id: str) -> int:
    """Evict one model: pointer first, then every build, then the blobs nothing else uses. Returns bytes freed.

    The caller holds the model's lock, so no build of it runs meanwhile.
    """
    unpublish(cache, model_id)
    digests: set[str] = set()
    for build in cache.builds(model_id):
        digests |= _remove_build(cache, model_id, build)
    with contextlib.suppress(FileNotFoundError):
        (cache.state / "used" / model_id).unlink()
    with contextlib.suppress(OSError):
        cache.model_dir(model_id).rmdir()
    return _drop_unused_blobs(cache, digests)


def remove_old_revisions(cache: Cache, *, grace_seconds: float, now: float | None = None) -> int:
    """Delete builds no pointer names once ``grace_seconds`` have passed since they were replaced.

    A build not yet recorded as replaced (a crash right after a swap, or a build sealed but never swapped in) is
    recorded now: its grace starts when we first see it unnamed. Each model is handled under its lock, skipped if
    busy. Returns how many builds were removed.
    """
    removed = 0
    now = now if now is not None else time.time()
    for model_id in cache.model_ids():
        with cache.try_model_lock(model_id) as got:
            if not got:
                continue
            live = cache.live_build(model_id)
            live_dir = live[0] if live else None
            digests: set[str] = set()
            for build in cache.builds(model_id):
                if build == live_dir:
                    continue
                when = replaced_at(cache, model_id, build.name)
                if when is None:
                    record_replaced(cache, model_id, build.name, when=now)
                    continue
                if now - when < grace_seconds:
                    continue
                digests |= _remove_build(cache, model_id, build)
                removed += 1
            _drop_unused_blobs(cache, digests)
            with contextlib.suppress(OSError):
                cache.model_dir(model_id).rmdir()  # only if empty; we hold the lock, so no build is starting
    return removed


def sweep_orphan_blobs(cache: Cache, *, min_age_seconds: float) -> int:
    """Delete blobs no build links to (nlink == 1) that have not changed recently. Returns bytes freed."""
    freed = 0
    now = time.time()
    with cache.blob_lock(), contextlib.suppress(FileNotFoundError):
        for e in os.scandir(cache.blobs):
            with contextlib.suppress(FileNotFoundError):
                st = e.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if st.st_nlink <= 1 and now - st.st_ctime >= min_age_seconds:
                    os.unlink(e.path)
                    freed += st.st_size
        for e in os.scandir(cache.state / "chunks"):  # chunk digests of blobs gone
            if not cache.blob_path(e.name).exists():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
    return freed


# ----- durability ------------------------------------------------------------------------------------------


def _fdatasync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def flush_build(cache: Cache, build: Path) -> bool:
    """Flush a build's files and directories to disk, then mark it durable. False if it vanished meanwhile."""
    files: list[Path] = []
    dirs: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(build):
        dirs.append(Path(dirpath))
        files.extend(Path(dirpath) / f for f in filenames)
    if not files:
        return False
    try:
        with ThreadPoolExecutor(max_workers=min(FSYNC_PARALLELISM, len(files)), thread_name_prefix="flush") as pool:
            for future in [pool.submit(_fdatasync_path, p) for p in files]:
                future.result()
        for d in dirs:
            fsync_dir(d)
        atomic_write(layout.durable_marker(build), layout.current_boot_id().encode(), durable=True)
    except FileNotFoundError:
        return False  # removed (evicted, or its grace ended) while we flushed
    return True


def flush_pending(cache: Cache) -> int:
    """Flush every live build of this boot not yet known durable (builds a one-shot ``prefetch`` left)."""
    n = 0
    boot = layout.current_boot_id()
    for build, m in list(cache.live_builds()):
        if m.boot_id == boot and not layout.durable_marker(build).exists() and flush_build(cache, build):
            n += 1
    return n


# ----- verification ------------------------------------------------------------------------------------------


def check_build(cache: Cache, build: Path, m: Manifest) -> list[tuple[ManifestFile, str]]:
    """The files of one build whose bytes are missing, of the wrong size, or of the wrong digest."""
    bad: list[tuple[ManifestFile, str]] = []
    data = cache.root / m.data_relpath
    for f in m.files:
        p = data / f.path
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            bad.append((f, "missing"))
            continue
        if size != f.size:
            bad.append((f, f"size {size} != {f.size}"))
            continue
        digest = layout.hash_file(p, scheme=m.digest_scheme, chunk_size=m.chunk_size)
        if digest != f.xxh3_128:
            bad.append((f, f"digest {digest} != {f.xxh3_128}"))
    return bad


def forget_blobs(cache: Cache, digests: set[str]) -> None:
    """Unlink blob names whose bytes are bad, so no new build reuses them (builds keep their own links)."""
    with cache.blob_lock():
        for d in digests:
            with contextlib.suppress(FileNotFoundError):
                cache.blob_path(d).unlink()
            forget_chunks(cache, d)


def _swap_pointer(cache: Cache, m: Manifest, build: Path) -> None:
    pointer = cache.root / m.path
    data = build / layout.DATA_DIR
    target = data if m.kind == "prefix" else data / m.files[0].path
    with cache.publish_lock():
        pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp_link = pointer.parent / f".{pointer.name}.{uuid.uuid4().hex}.link"
        os.symlink(os.path.relpath(target, pointer.parent), tmp_link)
        os.replace(tmp_link, pointer)
        fsync_dir(pointer.parent)


def _reverify_after_reboot(cache: Cache, stats: dict[str, int]) -> None:
    """Hide every live build not known durable, check its bytes, and publish it again only if all match."""
    boot = layout.current_boot_id()
    for build, m in list(cache.live_builds()):
        model_id = m.model_id
        if layout.is_trusted(build, m.boot_id, boot_id=boot):
            continue
        unpublish(cache, model_id)  # first: no pod may open it while we check
        bad = check_build(cache, build, m)
        if bad:
            log.warning("after a reboot, %s holds bytes that never reached the disk (%s: %s); it will be fetched "
                        "again", m.uri, bad[0][0].path, bad[0][1])
            forget_blobs(cache, {f.xxh3_128 for f, _ in bad})
            _remove_build(cache, model_id, build)
            stats["unverified_dropped"] += 1
            continue
        atomic_write(layout.durable_marker(build), boot.encode(), durable=True)  # read back from disk: on disk
        _swap_pointer(cache, m, build)
        stats["reverified"] += 1


# ----- migration of version-1 manifests ---------------------------------------------------------------------


def _migrate_legacy(cache: Cache, stats: dict[str, int]) -> None:
    """Re-hash every version-1 model under the chunked scheme into a version-2 build, and swap it in."""
    from agent.store.publish import Build
    from agent.uris import parse_model_uri

    if not cache.legacy_manifests.is_dir():
        return
    for path in sorted(cache.legacy_manifests.glob("*.json")):
        try:
            old = Manifest.from_dict(json.loads(path.read_text("utf-8")))
            uri = parse_model_uri(old.uri)
            snapshot = cache.root / old.snapshot
            pointer = cache.root / old.path
            live = pointer.is_symlink() and Path(os.path.realpath(pointer)).is_relative_to(
                Path(os.path.realpath(snapshot)))
            if live and not check_build(cache, snapshot, old):
                build = Build(cache, old.model_id, old.revision)
                build.create()
                files = []
                for f in old.files:
                    digest = layout.hash_file(snapshot / f.path)
                    tmp = cache.tmp / f"migrate-{uuid.uuid4().hex}"
                    os.link(snapshot / f.path, tmp)
                    build.adopt_file(tmp, digest=digest, size=f.size, relpath=f.path)
                    files.append(ManifestFile(path=f.path, size=f.size, xxh3_128=digest, key=f.key, etag=f.etag))
                pointer.unlink()  # the legacy pointer is a different model's place only to the new layout
                build.publish(uri=uri, files=files, fetch_seconds=old.fetch_seconds)
                flush_build(cache, build.final_dir)
                stats["migrated"] += 1
            elif pointer.is_symlink():
                pointer.unlink()
            shutil.rmtree(snapshot, ignore_errors=True)
            path.unlink()
            log.info("migrated %s to the version-2 layout (%s)", old.uri, "kept" if live else "dropped")
        except Exception as e:  # noqa: BLE001 - a model we cannot migrate is fetched again, never fatal
            log.warning("could not migrate %s: %s; it will be fetched again", path.name, e)
            with contextlib.suppress(OSError):
                path.unlink()


# ----- recovery --------------------------------------------------------------------------------------------


def _clean_tmp(cache: Cache, *, orphan_max_age_seconds: float, stats: dict[str, int]) -> None:
    """Under the exclusive lock: nothing in ``tmp/`` is being written. Keep what a fetch may resume."""
    now = time.time()
    boot = layout.current_boot_id()
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(cache.tmp):
            try:
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(e.path, ignore_errors=True)
                elif not stat.S_ISREG(st.st_mode) or now - st.st_mtime > orphan_max_age_seconds:
                    os.unlink(e.path)
                elif st.st_nlink > 1:  # already adopted into blobs/ (killed before its temp name went): no resume
                    os.unlink(e.path)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(str(Path(e.path).with_suffix(".parts")))
                elif e.name.endswith(".parts") and f"boot={boot}" not in _first_line(Path(e.path)):
                    os.unlink(e.path)  # resume records of an earlier boot: their bytes may never have hit the disk
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(e.path[: -len(".parts")] + ".incomplete")
                else:
                    continue
                stats["stale_tmp"] += 1
            except OSError as err:
                log.warning("cache recovery: cannot remove %s: %s", e.path, err)


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.readline()
    except OSError:
        return ""


def _clean_models_tree(cache: Cache, stats: dict[str, int]) -> None:
    """Stray temp links of an interrupted swap, pointers that name nothing, and directories a killed first publish
    created for a pointer it never swapped in (empty, they would block an outer model's name)."""
    for dirpath, dirnames, filenames in os.walk(cache.models):
        for name in list(dirnames) + filenames:
            p = Path(dirpath) / name
            if name.startswith(".") and name.endswith(".link"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    stats["stray_links"] += 1
                continue
            if p.is_symlink():
                if name in dirnames:
                    dirnames.remove(name)
                if cache.pointer_target(p) is None:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        stats["dangling_pointers"] += 1
    for dirpath, _dirnames, _filenames in os.walk(cache.models, topdown=False):
        d = Path(dirpath)
        if d != cache.models and d != cache.models / "s3" and not d.is_symlink():
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty


def recover(cache: Cache, *, orphan_max_age_seconds: float) -> dict[str, int]:
    """Start-up cleanup, only when no other process works on the cache; otherwise just join them.

    Takes the activity lock exclusively if it is free (else shares it and cleans nothing: another process may be
    building). Then: half-built builds, stray temp links, dangling pointers, unexpected entries in ``tmp/``, resume
    records of an earlier boot; after a reboot also orphan blobs and every live build not known to be on disk.
    """
    cache.ensure_layout()
    stats = {"dangling_pointers": 0, "staging_dirs": 0, "stale_tmp": 0, "stray_links": 0, "reverified": 0,
             "unverified_dropped": 0, "migrated": 0, "orphan_blob_bytes": 0}
    if cache.joined_activity:
        # This Cache already works (flock belongs to its descriptor: it would "win" the exclusive lock over its
        # own builds and delete them). Recovery is a start-up step only.
        log.info("cache recovery skipped: this process already works on %s", cache.root)
        return stats
    if not cache.join_activity(exclusive=True):
        log.info("cache recovery skipped: another weightcache process is working on %s", cache.root)
        return stats
    try:
        boot = layout.current_boot_id()
        boot_file = cache.state / "boot_id"
        try:
            last_boot = boot_file.read_text("ascii").strip()
        except OSError:
            last_boot = ""
        for model_id in cache.model_ids():
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(cache.model_dir(model_id)):
                    if e.name.endswith(layout.INCOMPLETE_SUFFIX):
                        shutil.rmtree(e.path, ignore_errors=True)
                        stats["staging_dirs"] += 1
        _migrate_legacy(cache, stats)
        _clean_models_tree(cache, stats)
        _clean_tmp(cache, orphan_max_age_seconds=orphan_max_age_seconds, stats=stats)
        for p in [*cache.state.glob(".*.tmp"), *(cache.state / "used").glob(".*.tmp"),
                  *(cache.state / "replaced").glob(".*.tmp")]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if last_boot != boot:
            _reverify_after_reboot(cache, stats)
            # Nobody builds now, and a blob nothing links may hold bytes that never reached the disk.
            stats["orphan_blob_bytes"] = sweep_orphan_blobs(cache, min_age_seconds=0)
            atomic_write(boot_file, boot.encode(), durable=True)
        if any(stats.values()):
            log.info("cache recovery: %s", stats)
        return stats
    finally:
        cache.share_activity()


__all__ = ["check_build", "flush_build", "flush_pending", "forget_blobs", "recover", "remove_model",
           "remove_old_revisions", "sweep_orphan_blobs", "unpublish"]
