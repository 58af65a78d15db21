"""The pieces of one download on disk: how a file is cut into parts, its preallocated temp file, and its resume
record — so a crash (even ``kill -9``) loses only the parts in flight.

A record (``tmp/<source>.parts``) starts with a header naming the format, the file and part sizes, the digest
chunk size and the boot id, then one line per finished part: its index and its chunk digests. A record from
another boot, format or part size is discarded: after a reboot the bytes it claims may never have reached the disk.
Parts are whole multiples of the digest chunk, so each part hashes on its own.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

from agent.errors import DiskFullError
from agent.store import layout

MAX_PART_SIZE = 64 * 1024 * 1024
PARTS_FORMAT = "weightcache-parts v2"


def record_header(size: int, part: int) -> str:
    return f"{PARTS_FORMAT} size={size} part={part} chunk={layout.CHUNK_SIZE} boot={layout.current_boot_id()}\n"


def part_size_for(size: int, *, min_part: int, concurrency: int) -> int:
    """Parts big enough to keep request overhead low, small enough that one file fans out over the pool.

    Always a whole number of digest chunks, so every part hashes on its own.
    """
    chunk = layout.CHUNK_SIZE
    target = -(-size // max(concurrency, 1))
    part = max(chunk, -(-min_part // chunk) * chunk)
    while part < target and part < MAX_PART_SIZE:
        part *= 2
    return max(chunk, min(part, MAX_PART_SIZE) // chunk * chunk)


def plan_parts(size: int, part: int) -> list[tuple[int, int]]:
    return [(start, min(part, size - start)) for start in range(0, size, part)]


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


#: O_DIRECT wants file offsets, lengths and buffer addresses aligned to the device's logical block (512 or 4096).
DIRECT_ALIGN = 4096


def aligned_buffer(size: int) -> mmap.mmap:
    """A receive buffer whose start is page-aligned (anonymous mmap), as O_DIRECT writes need."""
    return mmap.mmap(-1, size)


class PartWriter:
    """Writes a download's received bytes: through the page cache, or past it (``O_DIRECT``) where it can.

    Page cache (the default): the loader that follows finds the model in memory. ``O_DIRECT``
    (``WEIGHTCACHE_DIRECT_IO``): the receive buffer goes to the device — no second copy, no contention on the
    file's inode lock among the GET threads — but the bytes are then on disk only. Only whole aligned blocks go
    direct — the file's unaligned tail, a partial buffer kept after a broken connection, a buffer not from
    :func:`aligned_buffer`, or a filesystem that refuses ``O_DIRECT`` (tmpfs on older kernels, some FUSE)
    all take the plain fd. Ranges never share a block (parts start on digest-chunk boundaries), so the two
    paths never write the same block.
    """

    def __init__(self, fd: int, path: Path, *, direct: bool) -> None:
        self.fd = fd
        self._opened: int | None = None
        if direct and hasattr(os, "O_DIRECT"):
            with contextlib.suppress(OSError):
                self._opened = os.open(path, os.O_WRONLY | os.O_DIRECT)
        self.direct_fd = self._opened

    def write(self, offset: int, view: memoryview) -> None:
        dfd = self.direct_fd
        if dfd is not None and offset % DIRECT_ALIGN == 0:
            n = len(view) - len(view) % DIRECT_ALIGN
            if n:
                try:
                    pwrite_all(dfd, view[:n], offset)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.direct_fd = None  # not aligned after all (buffer, device block): plain from now on
                else:
                    view, offset = view[n:], offset + n
        if view:
            pwrite_all(self.fd, view, offset)

    def close(self) -> None:
        """Close the direct fd (the plain one is the caller's); only once no thread writes any more."""
        opened, self._opened, self.direct_fd = self._opened, None, None
        if opened is not None:
            os.close(opened)


def open_record(tmp: Path, record: Path, header: str, size: int) -> dict[int, list[bytes]]:
    """Open (or start) a resumable download: the parts already written this boot, with their chunk digests.

    A record from another boot (or format, or part size) is discarded: after a reboot the bytes it claims may
    never have reached the disk, and hashing them now would bless zeros.
    """
    finished: dict[int, list[bytes]] = {}
    try:
        lines = record.read_text("ascii", errors="replace").splitlines()
        if lines and lines[0] + "\n" == header and tmp.exists() and tmp.stat().st_size == size:
            for line in lines[1:]:
                index, _, hexes = line.partition(" ")
                try:
                    finished[int(index)] = [bytes.fromhex(h) for h in hexes.split(",") if h]
                except ValueError:
                    continue  # a torn last line
            return finished
    except FileNotFoundError:
        pass
    os.close(create_preallocated(tmp, size))
    record.write_text(header, "ascii")
    return finished


def create_preallocated(path: Path, size: int) -> int:
    """Create (truncate) ``path`` with ``size`` bytes reserved; return an O_RDWR fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _preallocate(fd, size, path)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def _preallocate(fd: int, size: int, path: Path) -> None:
    if not size:
        return
    try:
        os.posix_fallocate(fd, 0, size)  # claim the space now: ENOSPC before, not after, the download
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space for a {size}-byte file in {path.parent}") from e
        os.ftruncate(fd, size)  # filesystems without fallocate


def append_record(record: Path, index: int, chunks: list[bytes]) -> None:
    """Record a finished part (one ``write`` of one line: a crash tears at most this line)."""
    fd = os.open(record, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"{index} {','.join(c.hex() for c in chunks)}\n".encode())
    finally:
        os.close(fd)
