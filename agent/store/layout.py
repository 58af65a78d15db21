"""The node cache's layout on disk, the digest scheme, and how a reader resolves a published model — shared by the
agent and the inference server (the one agent module the server imports; stdlib and xxhash only).

Layout under the root::

    blobs/<digest>                                 every distinct file once, read-only, content-addressed
    tmp/                                           downloads in progress (+ .parts and .journal resume records)
    snapshots/<model-id>/<build>/manifest.json     an immutable revision: its manifest ...
    snapshots/<model-id>/<build>/data/...          ... and its files (hardlinks of blobs)
    snapshots/<model-id>/<build>.incomplete/       a revision being built (never pointed at)
    snapshots/<model-id>/<build>.durable           marker: the build's bytes are known to be on disk
    models/s3/<bucket>/<key-or-prefix>             the published pointer: a relative symlink into a build's data
    locks/  state/                                 flock files; mutable bookkeeping (last use, pins, replacements,
                                                   state/chunks/<digest>: a blob's chunk digests, for peers)

A build (``<revision>.<random>``) never changes once its directory lost the ``.incomplete`` suffix; swapping the
pointer is the only step that makes it live. A reader therefore resolves the pointer *once* (``resolve``) and reads
every file from the build directory it got, so a publish during a load can never mix two revisions.

Durability is not on the publish path: a build is trusted if it was published during the current boot (its bytes
are in the page cache whatever happened to the process) or if its ``.durable`` marker exists (flushed). After a
reboot anything else is re-verified before it is served (``is_trusted``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

#: The digest scheme of manifest version 2: xxh3-128 of each CHUNK_SIZE chunk, then xxh3-128 over the chunk digests
#: (16 bytes each, in order). Parts are hashed in the thread that received them; no read-back in order is needed.
DIGEST_SCHEME = "xxh3-128-chunked"
#: The digest of manifest version 1: xxh3-128 of the whole file.
LEGACY_DIGEST_SCHEME = "xxh3-128"
#: 1 MiB: every part size (a power-of-two multiple of the ≥ 1 MiB minimum part) is a whole number of chunks.
CHUNK_SIZE = 1024 * 1024

MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
INCOMPLETE_SUFFIX = ".incomplete"
DURABLE_SUFFIX = ".durable"

#: For tests that simulate a reboot; on a real node the kernel's boot id is the truth.
BOOT_ID_ENV = "WEIGHTCACHE_BOOT_ID"
_BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def pointer_path(root: Path, uri: str) -> Path:
    """Where the agent publishes model ``uri`` under ``root`` (``ValueError`` — an ``InvalidUriError`` — if it is
    not a model URI)."""
    from agent.uris import parse_model_uri

    return root / parse_model_uri(uri).mirrored_relpath


def current_boot_id() -> str:
    """The kernel's boot id (it changes on every boot; not namespaced, so a container sees the host's)."""
    override = os.environ.get(BOOT_ID_ENV)
    if override:
        return override
    return _kernel_boot_id()


@functools.cache
def _kernel_boot_id() -> str:
    """Read once per process: a process never outlives its boot (every part record and journal line asks)."""
    try:
        return _BOOT_ID_FILE.read_text("ascii").strip()
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------------------ digests


class ChunkedHasher:
    """Hashes bytes handed over in order from ``start`` (a chunk boundary) into per-chunk xxh3-128 digests."""

    __slots__ = ("_chunk", "_fill", "_h", "chunk_size", "digests")

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size
        self.digests: list[bytes] = []
        self._h = xxhash.xxh3_128()
        self._fill = 0

    def update(self, view: memoryview | bytes) -> None:
        mv = memoryview(view)
        while len(mv):
            take = min(len(mv), self.chunk_size - self._fill)
            self._h.update(mv[:take])
            self._fill += take
            mv = mv[take:]
            if self._fill == self.chunk_size:
                self.digests.append(self._h.digest())
                self._h.reset()
                self._fill = 0

    def finish(self) -> list[bytes]:
        """The chunk digests, the last (short) chunk included; call once all bytes are in."""
        if self._fill:
            self.digests.append(self._h.digest())
            self._h.reset()
            self._fill = 0
        return self.digests


def combine_chunk_digests(digests: Iterable[bytes]) -> str:
    """The file digest from its chunk digests (an empty file has no chunks: the xxh3-128 of nothing)."""
    h = xxhash.xxh3_128()
    for d in digests:
        h.update(d)
    return h.hexdigest()


def hash_file(path: Path | str, *, scheme: str = DIGEST_SCHEME, chunk_size: int = CHUNK_SIZE) -> str:
    """A file's digest under ``scheme`` (the chunked scheme, or the whole-file one of version-1 manifests)."""
    buf = bytearray(max(chunk_size, 8 * 1024 * 1024))
    view = memoryview(buf)
    if scheme == LEGACY_DIGEST_SCHEME:
        whole = xxhash.xxh3_128()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                whole.update(view[:n])
        return whole.hexdigest()
    if scheme != DIGEST_SCHEME:
        raise ValueError(f"unknown digest scheme {scheme!r}")
    hasher = ChunkedHasher(chunk_size)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
    return combine_chunk_digests(hasher.finish())


# ------------------------------------------------------------------------------------------------------ builds


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A published pointer resolved once: the immutable build it names, and the path to read inside it."""

    build_dir: Path  # snapshots/<model-id>/<build>
    target: Path  # the data directory (a prefix model) or the one file (an object model)
    model_id: str
    build: str

    @property
    def data_dir(self) -> Path:
        return self.build_dir / DATA_DIR

    @property
    def manifest_path(self) -> Path:
        return self.build_dir / MANIFEST_NAME


def resolve(root: Path, model_path: Path) -> ResolvedModel | None:
    """Resolve a model path (a pointer, or a path inside an outer model) to its build; None outside the cache."""
    try:
        real_root = Path(os.path.realpath(root))
        real = Path(os.path.realpath(model_path))  # may raise if the pointer goes between lstat and readlink
        parts = real.relative_to(real_root).parts
    except (OSError, ValueError):
        return None
    if len(parts) < 4 or parts[0] != "snapshots" or parts[3] != DATA_DIR or parts[2].endswith(INCOMPLETE_SUFFIX):
        return None
    return ResolvedModel(build_dir=real_root / "snapshots" / parts[1] / parts[2], target=real,
                         model_id=parts[1], build=parts[2])


def read_manifest_data(build_dir: Path) -> dict[str, Any]:
    """The raw manifest of a build (raises OSError / ValueError when it cannot be read)."""
    data = json.loads((build_dir / MANIFEST_NAME).read_text("utf-8"))
    if not isinstance(data, dict):
        raise TypeError(f"{build_dir / MANIFEST_NAME}: not a JSON object")
    return data


def durable_marker(build_dir: Path) -> Path:
    return build_dir.with_name(build_dir.name + DURABLE_SUFFIX)


def is_trusted(build_dir: Path, manifest_boot_id: str, *, boot_id: str | None = None) -> bool:
    """True if the build's bytes can be served: published this boot, or known to have reached the disk."""
    if manifest_boot_id and manifest_boot_id == (boot_id or current_boot_id()):
        return True
    return durable_marker(build_dir).exists()


def build_of(path: Path) -> Path | None:
    """The build directory a path resolves into (``.../snapshots/<id>/<build>``), or None outside any build."""
    try:
        real = Path(os.path.realpath(path))
    except OSError:
        return None
    for d in (real, *real.parents):
        if d.name == DATA_DIR and d.parent.parent.parent.name == "snapshots":
            return d.parent
    return None


def is_servable(path: Path) -> bool:
    """True once ``path`` exists and, if it lies in a build, that build can be trusted (see ``is_trusted``).

    After a reboot the agent hides and re-verifies builds that never reached the disk; a reader that got there
    first must not load them meanwhile.
    """
    if not path.exists():
        return False
    build = build_of(path)
    if build is None:
        return True
    try:
        boot = str(read_manifest_data(build).get("boot_id", ""))
    except (OSError, ValueError, TypeError):
        return False
    return is_trusted(build, boot)


__all__ = [
    "CHUNK_SIZE",
    "DATA_DIR",
    "DIGEST_SCHEME",
    "LEGACY_DIGEST_SCHEME",
    "MANIFEST_NAME",
    "ChunkedHasher",
    "ResolvedModel",
    "build_of",
    "combine_chunk_digests",
    "current_boot_id",
    "durable_marker",
    "hash_file",
    "is_servable",
    "is_trusted",
    "read_manifest_data",
    "resolve",
]
