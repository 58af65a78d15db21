"""Where the model will appear, and waiting for it to appear — without busy-polling, bounded by a deadline.

The node agent publishes a model atomically (a relative symlink swapped in with ``os.replace``), so "the path
exists" means "the model is complete and verified". We watch the nearest existing ancestor of that path with
inotify (through ctypes: no extra dependency) and re-check on every event, moving the watch down as directories
appear. A gentle periodic re-check (never under 100 ms) covers filesystems where inotify does not see changes.

This module never writes to the cache root (pods mount it read-only) and never decides that a model is valid:
that is the loader's job.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path

from server.errors import InvalidModelUriError, ModelWaitTimeoutError

log = logging.getLogger(__name__)

_MIN_POLL_SECONDS = 0.1


def resolve_model_path(root: Path, uri: str) -> Path:
    """The path under the cache root at which the agent publishes ``uri`` (validated with the agent's parser,
    through the one agent module the server reads: the cache layout)."""
    from agent.store.layout import pointer_path

    try:
        return pointer_path(root, uri)
    except ValueError as e:
        raise InvalidModelUriError(f"WEIGHTCACHE_MODEL: {e}") from e


def nearest_existing_ancestor(path: Path) -> Path:
    """The deepest existing directory on the way to ``path`` (the thing to watch while ``path`` is missing)."""
    candidate = path.parent
    while not candidate.is_dir():
        if candidate.parent == candidate:
            break
        candidate = candidate.parent
    return candidate


class _Inotify:
    """A minimal non-blocking inotify instance with one watch at a time, readable from the event loop."""

    _IN_ATTRIB = 0x00000004
    _IN_MOVED_TO = 0x00000080
    _IN_CREATE = 0x00000100
    _IN_DELETE_SELF = 0x00000400
    _IN_MOVE_SELF = 0x00000800
    _IN_ONLYDIR = 0x01000000
    _MASK = _IN_ATTRIB | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
    _IN_NONBLOCK = os.O_NONBLOCK
    _IN_CLOEXEC = 0o2000000

    def __init__(self) -> None:
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(libc_name, use_errno=True)
        fd = self._libc.inotify_init1(self._IN_NONBLOCK | self._IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd: int = fd
        self._wd: int | None = None
        self._watched: Path | None = None
        self._event = asyncio.Event()

    def watch(self, directory: Path) -> None:
        """Watch ``directory`` (only); a no-op if it is already the one watched."""
        if directory == self._watched:
            return
        if self._wd is not None:
            self._libc.inotify_rm_watch(self.fd, self._wd)  # may fail if the dir went away: harmless
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), self._MASK)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch({directory}) failed")
        self._wd, self._watched = wd, directory

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        # We do not parse events: any change near the path is a reason to re-check it. Drain and wake.
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass
        self._event.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass
        self._event.clear()

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.fd)
        os.close(self.fd)


def _open_inotify() -> _Inotify | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return _Inotify()
    except (OSError, AttributeError) as e:  # seccomp, exhausted instances, no libc symbol: poll instead
        log.warning("inotify unavailable (%s); re-checking the model path every poll interval instead", e)
        return None


async def wait_for_path(path: Path, *, timeout: float, poll_interval: float = 1.0) -> None:
    """Return once ``path`` exists (following symlinks) and can be trusted; raise ``ModelWaitTimeoutError`` after
    ``timeout`` s. A build the node cache does not trust yet (after a reboot, before the agent re-verified it)
    counts as absent."""
    from agent.store.layout import is_servable

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    poll_interval = max(poll_interval, _MIN_POLL_SECONDS)
    notifier = _open_inotify()
    if notifier is not None:
        notifier.start(loop)
    try:
        logged_missing = False
        while True:
            if is_servable(path):
                return
            if notifier is not None:
                ancestor = nearest_existing_ancestor(path)
                try:
                    notifier.watch(ancestor)
                except OSError as e:  # the ancestor vanished between the check and the watch: look again
                    log.debug("re-watching after %s", e)
                    await asyncio.sleep(_MIN_POLL_SECONDS)
                    continue
                # The path may have appeared between the first check and the watch being in place.
                if is_servable(path):
                    return
            if not logged_missing:
                log.info("waiting up to %.0f s for the model at %s", timeout, path)
                logged_missing = True
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ModelWaitTimeoutError(
                    f"model did not appear at {path} within {timeout:g} s "
                    "(is the weightcache agent running on this node, and does the pod carry the "
                    "weightcache.io/models annotation for this URI?)"
                )
            if notifier is not None:
                await notifier.wait(min(poll_interval, remaining))
            else:
                await asyncio.sleep(min(poll_interval, remaining))
    finally:
        if notifier is not None:
            notifier.close(loop)
