"""What a model is in S3 right now: its files (relative paths validated), sizes and ETags, and the revision they
make up. Every miss lists the model first; nothing but this listing decides what is fetched (peers included)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import InvalidUriError, ObjectNotFoundError
from agent.store.manifest import PlannedFile, compute_revision
from agent.transfer.s3 import S3Client
from agent.uris import ModelUri, validate_relative_key


@dataclass(frozen=True, slots=True)
class Listing:
    uri: ModelUri
    files: tuple[PlannedFile, ...]
    revision: str

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


async def list_model(s3: S3Client, model: ModelUri) -> Listing:
    """What the model is in S3 right now: files with relative paths (validated), sizes, ETags."""
    if model.is_prefix:
        objects = await s3.list_objects(model.bucket, model.list_prefix)
        files: list[PlannedFile] = []
        for o in objects:
            rel = o.key[len(model.list_prefix):]
            if rel.endswith("/") and o.size == 0:
                continue  # a "directory marker" made by consoles and sync tools
            validate_relative_key(rel, key=o.key)
            files.append(PlannedFile(relpath=rel, key=o.key, size=o.size, etag=o.etag))
        if not files:
            raise ObjectNotFoundError(f"{model}: no objects under s3://{model.bucket}/{model.list_prefix}")
        names = {f.relpath for f in files}
        for f in files:
            parts = f.relpath.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in names:
                    raise InvalidUriError(
                        f"{model}: key {f.key!r} needs {'/'.join(parts[:i])!r} to be a directory, "
                        "but it is also an object")
    else:
        o = await s3.head_object(model.bucket, model.key)
        files = [PlannedFile(relpath=model.key.rsplit("/", 1)[-1], key=o.key, size=o.size, etag=o.etag)]
    return Listing(uri=model, files=tuple(files), revision=compute_revision(files))
