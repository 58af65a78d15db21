"""What a cached model is: its manifest (files, sizes, xxh3-128 digests, source keys and ETags, revision, times),
the files a listing plans, and the ids derived from them. Pure data and hashing: no paths of the cache, no I/O
beyond hashing one file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import xxhash

from agent.uris import ModelUri, parse_model_uri

MANIFEST_VERSION = 1
HASH_CHUNK = 8 * 1024 * 1024


def now_iso() -> str:
    # Milliseconds: LRU order compares these strings, and models fetched or used within one second must not tie.
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def hash_file(path: Path | str) -> str:
    """xxh3-128 of a file's bytes, hex."""
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file of a model: where it sits in the snapshot, its size and digest, and where it came from."""

    path: str
    size: int
    xxh3_128: str
    key: str
    etag: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything known about one ready model; written as JSON beside the snapshots."""

    uri: str
    kind: str  # "prefix" | "object"
    model_id: str
    revision: str
    snapshot: str
    path: str
    files: tuple[ManifestFile, ...]
    total_bytes: int
    fetched_at: str
    last_used: str
    fetch_seconds: float = 0.0
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        return json.dumps(d, indent=1, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        files = tuple(ManifestFile(**f) for f in d["files"])
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "files"}
        return cls(files=files, **known)

    @property
    def model_uri(self) -> ModelUri:
        return parse_model_uri(self.uri)


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """A file as a listing describes it, before it is fetched."""

    relpath: str
    key: str
    size: int
    etag: str


def compute_revision(files: Iterable[PlannedFile]) -> str:
    """A revision id that changes whenever any file's name, size or ETag changes."""
    h = xxhash.xxh3_64()
    for f in sorted(files, key=lambda f: f.relpath):
        h.update(f"{f.relpath}\0{f.size}\0{f.etag}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def source_id(bucket: str, key: str, etag: str, size: int) -> str:
    """Names a download's temp file: the same object revision always resumes into the same file."""
    return xxhash.xxh3_128_hexdigest(f"{bucket}\0{key}\0{etag}\0{size}".encode("utf-8", "surrogatepass"))
