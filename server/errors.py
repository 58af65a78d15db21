"""The inference server's exception hierarchy, and the one place that maps it to HTTP status codes.

Startup errors (``StartupError`` and subclasses) are fatal: the process exits non-zero so Kubernetes restarts the
pod. Request errors carry their HTTP status; ``status_for`` is the single mapping used by the app's exception
handlers. Lower-level causes are chained with ``from``.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error the server raises on purpose."""

    reason: str = "ServerError"
    status: int = 500


class ConfigError(ServerError):
    """A setting is missing, malformed or contradicts another one."""

    reason = "BadConfig"


class InvalidModelUriError(ConfigError, ValueError):
    """WEIGHTCACHE_MODEL is not a valid s3:// URI (scheme, bucket, ``..``, empty segments, NUL)."""

    reason = "InvalidURI"


class StartupError(ServerError):
    """The server cannot become ready; the process must exit non-zero."""

    reason = "StartupFailed"


class ModelWaitTimeoutError(StartupError):
    """The model did not appear in the node cache within WEIGHTCACHE_WAIT_TIMEOUT_SECONDS."""

    reason = "WaitTimeout"


class FallbackFetchError(StartupError):
    """The fallback fetch (no agent on the node) failed."""

    reason = "FallbackFetchFailed"


class ModelLoadError(StartupError):
    """The weights could not be loaded (unsupported layout, missing shard, device problem)."""

    reason = "LoadFailed"


class CorruptModelError(ModelLoadError):
    """A weight file is truncated, has a malformed header, or disagrees with the cache manifest."""

    reason = "CorruptModel"


class HandlerError(StartupError):
    """The model handler could not be imported, built, or failed its warm-up."""

    reason = "HandlerFailed"


class RequestError(ServerError):
    """A request the server refuses; ``status`` is the HTTP status."""

    reason = "BadRequest"
    status = 400


class InvalidInputError(RequestError):
    """The request body is well-formed JSON but not something this model can take."""

    reason = "InvalidInput"
    status = 422


class PayloadTooLargeError(RequestError):
    """The request body is larger than WEIGHTCACHE_MAX_BODY_BYTES."""

    reason = "PayloadTooLarge"
    status = 413


class NotReadyError(RequestError):
    """A prediction arrived before the model is ready."""

    reason = "NotReady"
    status = 503


def status_for(error: BaseException) -> int:
    """The HTTP status for an error raised while serving a request (500 for anything unexpected)."""
    return error.status if isinstance(error, ServerError) else 500
