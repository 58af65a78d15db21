"""Parse and validate model URIs (pure: no I/O).

A URI names either a model directory (``s3://BUCKET/PREFIX/``, every object under the prefix) or one object
(``s3://BUCKET/KEY``). Everything here exists so that nothing a pod writes in an annotation, and no key an S3
listing returns, can make the agent write outside its cache root: ``..``, ``.``, empty or absolute segments, NUL
and control characters, and overlong components are refused with a precise message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import xxhash

from agent.errors import InvalidUriError

SCHEME = "s3://"
#: S3's own limits: keys are at most 1024 bytes; Linux file names at most 255 bytes.
MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255
#: A pod may list at most this many models; more is almost certainly a mistake (or an attack).
MAX_URIS_PER_ANNOTATION = 64
#: Bucket names as S3 allows them (lower case, digits, dots, hyphens; underscores for older/compatible stores).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_SEPARATORS_RE = re.compile(r"[\s,]+")


@dataclass(frozen=True, slots=True)
class ModelUri:
    """A validated model URI. ``key`` has no trailing slash; ``is_prefix`` says whether it names a directory."""

    bucket: str
    key: str
    is_prefix: bool

    @property
    def uri(self) -> str:
        """The canonical text form (what users write, what labels and ids hash)."""
        if self.is_prefix:
            return f"{SCHEME}{self.bucket}/{self.key}/" if self.key else f"{SCHEME}{self.bucket}/"
        return f"{SCHEME}{self.bucket}/{self.key}"

    @property
    def list_prefix(self) -> str:
        """The S3 prefix to list for a directory model ('' for a whole bucket)."""
        return f"{self.key}/" if self.key else ""

    @property
    def mirrored_relpath(self) -> str:
        """Where the ready model appears, relative to the cache root: ``models/s3/<bucket>/<key>``."""
        return f"models/s3/{self.bucket}/{self.key}" if self.key else f"models/s3/{self.bucket}"

    @property
    def model_id(self) -> str:
        """A stable, filesystem-safe id for this URI (names snapshots, manifests and locks)."""
        return xxhash.xxh3_64_hexdigest(self.uri.encode())

    def __str__(self) -> str:
        return self.uri


def label_key_for(uri: str) -> str:
    """The node label key that says a model is ready on a node: ``models.weightcache.io/<16 hex>``."""
    return f"models.weightcache.io/{xxhash.xxh3_64_hexdigest(uri.encode())[:16]}"


def _check_segments(path: str, *, what: str, original: str) -> None:
    if len(path.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidUriError(f"{what} is longer than {MAX_KEY_BYTES} bytes: {original[:80]!r}...")
    if path.startswith("/"):
        raise InvalidUriError(f"{what} must not be absolute (starts with '/'): {original!r}")
    for segment in path.split("/"):
        if segment == "":
            raise InvalidUriError(f"{what} has an empty path segment ('//'): {original!r}")
        if segment in (".", ".."):
            raise InvalidUriError(f"{what} has a {segment!r} path segment: {original!r}")
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise InvalidUriError(f"{what} has a path segment longer than {MAX_SEGMENT_BYTES} bytes: {original!r}")


def _check_text(text: str, *, what: str) -> None:
    if "\x00" in text:
        raise InvalidUriError(f"{what} contains a NUL byte: {text!r}")
    if _CONTROL_RE.search(text):
        raise InvalidUriError(f"{what} contains a control character: {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidUriError(f"{what} is not valid UTF-8: {text!r}") from e


def parse_model_uri(text: str) -> ModelUri:
    """Parse ``s3://BUCKET/PREFIX/`` or ``s3://BUCKET/KEY``; raise :class:`InvalidUriError` with the reason."""
    if not isinstance(text, str):
        raise InvalidUriError(f"model URI must be a string, got {type(text).__name__}")
    _check_text(text, what="model URI")
    if not text.startswith(SCHEME):
        scheme = text.split("://", 1)[0] + "://" if "://" in text else "(none)"
        raise InvalidUriError(f"unsupported scheme {scheme!r} in {text!r}: only s3://BUCKET/KEY or s3://BUCKET/PREFIX/")
    rest = text[len(SCHEME):]
    bucket, sep, key = rest.partition("/")
    if not sep:
        raise InvalidUriError(f"model URI {text!r} has no '/' after the bucket: write s3://{bucket}/ for a whole bucket")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidUriError(f"invalid bucket name {bucket!r} in {text!r}")
    is_prefix = key == "" or key.endswith("/")
    if is_prefix:
        key = key[:-1] if key else ""
        if key.endswith("/"):
            raise InvalidUriError(f"model URI {text!r} has an empty path segment ('//')")
    if key:
        _check_segments(key, what="model URI", original=text)
    elif not is_prefix:
        raise InvalidUriError(f"model URI {text!r} has an empty key")
    return ModelUri(bucket=bucket, key=key, is_prefix=is_prefix)


def validate_relative_key(relpath: str, *, key: str) -> str:
    """Check one object's path relative to its model's prefix; return it or raise :class:`InvalidUriError`."""
    _check_text(relpath, what=f"S3 key {key!r}")
    if not relpath:
        raise InvalidUriError(f"S3 key {key!r} has an empty name under its prefix")
    _check_segments(relpath, what=f"S3 key {key!r}", original=key)
    return relpath


@dataclass(frozen=True, slots=True)
class AnnotationParse:
    """The result of reading a pod's annotation: the valid URIs, in order, and one message per rejected entry."""

    uris: tuple[ModelUri, ...]
    errors: tuple[str, ...]


def parse_annotation(value: str) -> AnnotationParse:
    """Split a ``weightcache.io/models`` value on commas and/or whitespace; validate each entry independently."""
    if not isinstance(value, str):
        return AnnotationParse((), (f"annotation must be a string, got {type(value).__name__}",))
    entries = [e for e in _SEPARATORS_RE.split(value) if e]
    errors: list[str] = []
    if len(entries) > MAX_URIS_PER_ANNOTATION:
        errors.append(f"{len(entries)} URIs listed; at most {MAX_URIS_PER_ANNOTATION} are read, the rest ignored")
        entries = entries[:MAX_URIS_PER_ANNOTATION]
    seen: dict[str, ModelUri] = {}
    for entry in entries:
        try:
            parsed = parse_model_uri(entry)
        except InvalidUriError as e:
            errors.append(str(e)[:300])
            continue
        seen.setdefault(parsed.uri, parsed)
    return AnnotationParse(tuple(seen.values()), tuple(errors))
