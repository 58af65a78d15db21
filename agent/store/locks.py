"""flock helpers: the one place that names lock files and takes them (across processes, tasks and threads).

``flock`` belongs to the open file description, so every acquisition opens its own descriptor: two tasks of one
process exclude each other exactly like two processes. Closing the descriptor releases the lock, so a killed
process never leaves one behind. Async acquisition polls with ``LOCK_NB`` and sleeps: the event loop never blocks.

The locks:
    model-<id>.lock     one builder / evicter / gc of a model at a time (held for a whole fetch)
    source-<id>.lock    one writer per ``tmp/<source-id>.incomplete`` (two models may contain the same object)
    blobs.lock          short: blob adoption and deletion
    publish.lock        short: pointer swaps and pruning under ``models/`` (overlap checks need one writer)
    activity.lock       shared by every process that works on the cache; exclusive for start-up recovery
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path


def model_lock_name(model_id: str) -> str:
    return f"model-{model_id}.lock"


def source_lock_name(src_id: str) -> str:
    return f"source-{src_id}.lock"


BLOBS_LOCK = "blobs.lock"
PUBLISH_LOCK = "publish.lock"
ACTIVITY_LOCK = "activity.lock"


def open_lock_file(locks_dir: Path, name: str) -> int:
    locks_dir.mkdir(parents=True, exist_ok=True)
    return os.open(locks_dir / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def try_lock_exclusive(fd: int) -> bool:
    """Take (or upgrade to) the exclusive lock on an open lock file if it is free right now; never waits."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_shared(fd: int) -> None:
    """Take the shared lock on an open lock file, waiting while another holds it exclusively (downgrades ours)."""
    fcntl.flock(fd, fcntl.LOCK_SH)


@contextlib.contextmanager
def hold(locks_dir: Path, name: str) -> Iterator[None]:
    """Exclusive, blocking: for short critical sections, called off the event loop."""
    fd = open_lock_file(locks_dir, name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def try_hold(locks_dir: Path, name: str) -> Iterator[bool]:
    """Exclusive if free right now: yields True while held, False (and holds nothing) when another holds it."""
    fd = open_lock_file(locks_dir, name)
    try:
        yield try_lock_exclusive(fd)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def hold_async(locks_dir: Path, name: str, *, poll: float = 0.05) -> AsyncIterator[None]:
    """Exclusive, waiting without blocking the event loop."""
    fd = open_lock_file(locks_dir, name)
    try:
        while not try_lock_exclusive(fd):
            await asyncio.sleep(poll)
        yield
    finally:
        os.close(fd)


def is_held(locks_dir: Path, name: str) -> bool:
    """True if some process or task holds the lock now."""
    path = locks_dir / name
    if not path.exists():
        return False
    with try_hold(locks_dir, name) as got:
        return not got


__all__ = [
    "ACTIVITY_LOCK", "BLOBS_LOCK", "PUBLISH_LOCK", "hold", "hold_async", "is_held", "lock_shared", "model_lock_name",
    "open_lock_file", "source_lock_name", "try_hold", "try_lock_exclusive",
]
