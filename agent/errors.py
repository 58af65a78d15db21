"""The agent's exception hierarchy.

Every failure the agent reports to a user (log line, Kubernetes Event, CLI exit) is one of these, with a
``reason`` short enough for a metric label and an Event reason. Lower-level errors are chained with ``from``.
"""

from __future__ import annotations


class WeightcacheError(Exception):
    """Base of every error the agent raises on purpose."""

    reason: str = "Error"


class ConfigError(WeightcacheError):
    """A setting or the policy file is invalid."""

    reason = "BadConfig"


class InvalidUriError(WeightcacheError, ValueError):
    """A model URI (or an S3 key under it) is malformed or would escape the cache root."""

    reason = "InvalidURI"


class PolicyDeniedError(WeightcacheError):
    """A pod asked for a URI outside its namespace's allowance."""

    reason = "PolicyDenied"


class S3Error(WeightcacheError):
    """Talking to S3 failed for good (after retries where retrying made sense)."""

    reason = "S3Error"


class ObjectNotFoundError(S3Error):
    """The object or prefix does not exist (or is empty)."""

    reason = "NotFound"


class AccessDeniedError(S3Error):
    """The agent's credentials may not read the object."""

    reason = "AccessDenied"


class ObjectChangedError(S3Error):
    """The object changed (ETag mismatch / 412) while it was being downloaded."""

    reason = "ObjectChanged"


class RetriesExhaustedError(S3Error):
    """A transient error kept happening until the retry budget ran out."""

    reason = "RetriesExhausted"


class RangeNotSupportedError(S3Error):
    """The server ignored a Range request (answered with the wrong bytes)."""

    reason = "RangeNotSupported"


class CacheError(WeightcacheError):
    """The on-disk cache cannot do what was asked."""

    reason = "CacheError"


class OverlappingModelError(CacheError):
    """The URI overlaps another cached model's mirrored path and cannot be served from it."""

    reason = "OverlappingModel"


class BudgetExceededError(CacheError):
    """The model does not fit in the cache budget even after evicting everything evictable."""

    reason = "BudgetExceeded"


class DiskFullError(CacheError):
    """The filesystem ran out of space (ENOSPC) or would go below the free-space floor."""

    reason = "DiskFull"


class WriteError(CacheError):
    """Writing downloaded bytes into the cache failed for a reason other than a full disk (EIO, EROFS, EBADF…).

    Never retried: the disk will not heal by itself, and another GET would only fail the same way.
    """

    reason = "WriteError"


class IntegrityError(CacheError):
    """A file's bytes do not match what was recorded (size or xxh3-128 digest)."""

    reason = "IntegrityError"
