"""What a cached model is: its manifest (files, sizes, digests, source keys and ETags, revision, build, boot id),
the files a listing plans, and the ids derived from them. Pure data: no paths of the cache, no I/O.

Version 2 manifests live inside their build (``snapshots/<id>/<build>/manifest.json``) and never change; the last
use of a model is bookkeeping kept elsewhere (``Manifest.last_used`` is filled in when read, never written).
Version 1 manifests (``manifests/<id>.json``, whole-file xxh3-128) are still read, to migrate them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import xxhash

from agent.store.layout import CHUNK_SIZE, DIGEST_SCHEME, LEGACY_DIGEST_SCHEME
from agent.uris import ModelUri, parse_model_uri

MANIFEST_VERSION = 2


def now_iso() -> str:
    # Milliseconds: LRU order compares these strings, and models fetched or used within one second must not tie.
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file of a model: where it sits in the build, its size and digest, and where it came from.

    ``xxh3_128`` is the digest under the manifest's ``digest_scheme`` (chunked xxh3-128 since version 2).
    """

    path: str
    size: int
    xxh3_128: str
    key: str
    etag: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything known about one built revision of a model; written once, inside the build."""

    uri: str
    kind: str  # "prefix" | "object"
    model_id: str
    revision: str  # of the S3 listing (names, sizes, ETags)
    snapshot: str  # the build directory, relative to the root: snapshots/<model-id>/<build>
    path: str  # where the pointer lives, relative to the root: models/s3/<bucket>/<key>
    files: tuple[ManifestFile, ...]
    total_bytes: int
    fetched_at: str
    last_used: str = ""  # bookkeeping, filled in when read; never part of the file
    fetch_seconds: float = 0.0
    build: str = ""
    boot_id: str = ""  # the boot during which the build was published (see agent.store.layout.is_trusted)
    digest_scheme: str = DIGEST_SCHEME
    chunk_size: int = CHUNK_SIZE
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("last_used")
        d["files"] = [asdict(f) for f in self.files]
        return json.dumps(d, indent=1, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        files = tuple(ManifestFile(**f) for f in d["files"])
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "files"}
        if int(d.get("version", 1)) < 2:
            known["digest_scheme"] = LEGACY_DIGEST_SCHEME
            known["version"] = 1
        return cls(files=files, **known)

    @property
    def data_relpath(self) -> str:
        """The build's data directory relative to the root (version 1: the snapshot itself)."""
        return f"{self.snapshot}/data" if self.version >= 2 else self.snapshot

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
