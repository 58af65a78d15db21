"""Start reading the model's files into the page cache while the interpreter is still importing torch.

Importing torch costs seconds of CPU; reading weights costs seconds of disk. They do not compete, so when the
model is already in the node cache at process start, a background thread asks the kernel to read the weight
files ahead (``POSIX_FADV_WILLNEED``, chunk by chunk) and the loader later finds them in memory. Purely an
optimisation: it never fails the start, never reads more than half of the available memory, never writes.
It must stay free of torch (it runs before torch is imported).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 32 * 1024 * 1024
_SUFFIXES = (".safetensors",)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def weight_files(model_path: Path) -> list[Path]:
    """The files worth reading ahead, in name order (shards are numbered in load order)."""
    if model_path.is_file():
        return [model_path]
    if model_path.is_dir():
        return sorted(p for p in model_path.iterdir() if p.suffix in _SUFFIXES and p.is_file())
    return []


def _read_ahead(files: list[Path]) -> None:
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            for offset in range(0, size, _CHUNK):
                os.posix_fadvise(fd, offset, min(_CHUNK, size - offset), os.POSIX_FADV_WILLNEED)
        except OSError as e:
            log.debug("read-ahead of %s stopped: %s", path, e)
        finally:
            os.close(fd)


def start_readahead(model_path: Path) -> threading.Thread | None:
    """Begin reading ``model_path``'s weights in a daemon thread; None if there is nothing (sensible) to do."""
    if not hasattr(os, "posix_fadvise"):
        return None
    files = weight_files(model_path)
    total = sum(p.stat().st_size for p in files)
    available = _available_memory()
    if not files or (available is not None and total > available // 2):
        return None  # reading more than fits would only evict what we read first
    thread = threading.Thread(target=_read_ahead, args=(files,), name="weightcache-readahead", daemon=True)
    thread.start()
    return thread
