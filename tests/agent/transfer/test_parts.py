"""PartWriter: received bytes land where they belong whichever way they are written (direct or through the page
cache), for aligned buffers, unaligned tails, pieces cut short by a broken connection, and misaligned memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.transfer.parts import DIRECT_ALIGN, PartWriter, aligned_buffer, create_preallocated

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")

SIZE = 3 * 1024 * 1024 + 12345  # whole blocks, then a tail no block size divides


def _payload(size: int) -> bytes:
    return (os.urandom(4096) * (size // 4096 + 1))[:size]


def _write_in_pieces(path: Path, data: bytes, cuts: list[int], *, direct: bool) -> PartWriter:
    """Write ``data`` through a PartWriter in pieces ending at ``cuts`` (each from an aligned buffer)."""
    fd = create_preallocated(path, len(data))
    writer = PartWriter(fd, path, direct=direct)
    buffer = aligned_buffer(len(data))
    try:
        start = 0
        for end in [*cuts, len(data)]:
            view = memoryview(buffer)[: end - start]
            view[:] = data[start:end]
            writer.write(start, view)
            start = end
        return writer
    finally:
        writer.close()
        os.close(fd)


@pytest.mark.parametrize("direct", [True, False])
def test_whole_buffers_and_an_unaligned_tail_land_byte_identical(tmp_path: Path, direct: bool) -> None:
    data = _payload(SIZE)
    path = tmp_path / "f"
    _write_in_pieces(path, data, [1024 * 1024, 2 * 1024 * 1024], direct=direct)
    assert path.read_bytes() == data
    assert path.stat().st_size == SIZE


def test_a_piece_cut_short_mid_block_and_the_rest_after_it_land_byte_identical(tmp_path: Path) -> None:
    # A connection broke after 5,000 bytes of a buffer: that piece, and the resumed rest that starts mid-block,
    # cannot go direct; they take the page cache, and the blocks before them stay direct.
    data = _payload(SIZE)
    path = tmp_path / "f"
    _write_in_pieces(path, data, [1024 * 1024, 1024 * 1024 + 5000, 2 * 1024 * 1024 + 777], direct=True)
    assert path.read_bytes() == data


def test_a_buffer_that_is_not_page_aligned_falls_back_to_the_page_cache(tmp_path: Path) -> None:
    data = _payload(4 * DIRECT_ALIGN)
    path = tmp_path / "f"
    fd = create_preallocated(path, len(data))
    writer = PartWriter(fd, path, direct=True)
    try:
        backing = bytearray(len(data) + 1)  # its memory starts wherever malloc put it; one byte in, surely not aligned
        view = memoryview(backing)[1:]
        view[:] = data
        writer.write(0, view)
        assert writer.direct_fd is None  # the kernel refused (EINVAL) and the writer stopped trying
    finally:
        writer.close()
        os.close(fd)
    assert path.read_bytes() == data


def test_with_direct_io_off_nothing_is_opened_o_direct(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = create_preallocated(path, SIZE)
    try:
        assert PartWriter(fd, path, direct=False).direct_fd is None
        direct = PartWriter(fd, path, direct=True)
        assert direct.direct_fd is not None  # ext4 and tmpfs (the test machines' /tmp) take O_DIRECT
        direct.close()
    finally:
        os.close(fd)
