"""Keep the agent's memory flat while it streams gigabytes: large buffers go back to the OS when freed.

glibc raises its mmap threshold after the first large free, after which multi-MiB buffers come from per-thread
arenas and are kept; with a worker thread per write that alone grows RSS by hundreds of MiB. Pinning the
threshold (``mallopt(M_MMAP_THRESHOLD)``) keeps buffers ≥ 1 MiB mmapped. Harmless elsewhere: a no-op without glibc.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc() -> bool:
    """Apply the settings; True if glibc accepted them."""
    try:
        # The process's own symbols (libc among them): find_library("c") would run `ldconfig -p` in a child
        # process, tens of ms of every CLI start.
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1024 * 1024) == 1
        libc.mallopt(_M_TRIM_THRESHOLD, 8 * 1024 * 1024)
        libc.mallopt(_M_ARENA_MAX, 2)
        return bool(ok)
    except (OSError, AttributeError):
        return False
