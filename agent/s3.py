"""Talking to S3: list a prefix, HEAD an object, ranged GETs with If-Match — and retries for what is transient.

The only module that imports aiobotocore. Endpoint and credentials come from the standard AWS chain
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, IRSA web-identity tokens, instance profiles…); nothing here logs a
credential. botocore's own retries are off: every request is retried here, from an explicit tuple of transient
errors, with exponential backoff and full jitter, and a ranged GET resumes from the last byte it handed over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from agent.config import AgentSettings
from agent.errors import (
    AccessDeniedError,
    ObjectChangedError,
    ObjectNotFoundError,
    RangeNotSupportedError,
    RetriesExhaustedError,
    S3Error,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: S3 error codes worth another try (throttling and server-side trouble), after boto/s3transfer's list.
RETRYABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "503", "500", "502",
    "504", "429", "BadGateway", "GatewayTimeout",
})
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class TruncatedBodyError(Exception):
    """The body ended before the bytes the response promised (retryable)."""


#: Transport-level errors that a retry can fix: resets, timeouts, truncated or broken bodies.
RETRYABLE_EXCEPTIONS: tuple[type[BaseException], ...] = (
    TruncatedBodyError,
    EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError,
    IncompleteReadError, ResponseStreamingError, HTTPClientError,
    aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError,
    asyncio.TimeoutError, ConnectionError,
)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a listing or HEAD says about one object. ``etag`` is unquoted (servers differ in quoting it)."""

    key: str
    size: int
    etag: str


def normalize_etag(raw: object) -> str:
    """``"abc"`` and ``abc`` are the same ETag; keep the bare value."""
    return str(raw or "").strip().strip('"')


def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_retryable(e: BaseException) -> bool:
    """True for errors another attempt may fix; everything else fails at once."""
    if isinstance(e, ClientError):
        return _error_code(e) in RETRYABLE_CODES or _status(e) in RETRYABLE_STATUS
    return isinstance(e, RETRYABLE_EXCEPTIONS)


def _translate(e: ClientError, *, what: str) -> S3Error:
    code, status = _error_code(e), _status(e)
    if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
        return ObjectNotFoundError(f"{what}: not found ({code or status})")
    if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
        return AccessDeniedError(f"{what}: access denied ({code or status})")
    if code in ("PreconditionFailed", "412") or status == 412:
        return ObjectChangedError(f"{what}: changed in S3 during the download (ETag no longer matches)")
    return S3Error(f"{what}: {code or status}: {e}")


class S3Client:
    """An S3 client with the agent's retry policy. Use as ``async with S3Client(settings) as s3``."""

    def __init__(self, settings: AgentSettings) -> None:
        self._settings = settings
        self._stack = AsyncExitStack()
        self._client: Any = None
        #: Bytes of object data received from S3 (for metrics and benchmarks).
        self.bytes_received = 0
        self.retries = 0

    async def __aenter__(self) -> S3Client:
        s = self._settings
        style = s.s3_addressing_style
        if style == "auto":
            style = "path" if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") else "auto"
        config = AioConfig(
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            retries={"max_attempts": 1, "mode": "standard"},  # we retry ourselves, resuming ranged reads
            max_pool_connections=s.concurrency + 8,
            s3={"addressing_style": style},
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
        )
        session = get_session()
        self._client = await self._stack.enter_async_context(session.create_client("s3", config=config))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _retrying(self, what: str, attempt_fn: Callable[[], Awaitable[T]]) -> T:
        s = self._settings
        last: BaseException | None = None
        for attempt in range(1, s.max_attempts + 1):
            try:
                return await attempt_fn()
            except NoCredentialsError as e:
                raise AccessDeniedError(f"{what}: no AWS credentials found in the standard chain") from e
            except ClientError as e:
                if not is_retryable(e):
                    raise _translate(e, what=what) from e
                last = e
            except RETRYABLE_EXCEPTIONS as e:
                last = e
            if attempt < s.max_attempts:
                self.retries += 1
                delay = random.uniform(0, min(s.retry_max_delay, s.retry_base_delay * 2 ** (attempt - 1)))
                log.debug("retrying %s after %s (attempt %d/%d, %.2fs)", what, type(last).__name__, attempt,
                          s.max_attempts, delay)
                await asyncio.sleep(delay)
        assert last is not None
        raise RetriesExhaustedError(
            f"{what}: gave up after {s.max_attempts} attempts; last error: {type(last).__name__}: {last}"
        ) from last

    async def list_objects(self, bucket: str, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix`` (paginated), in key order."""
        out: list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._retrying(f"list s3://{bucket}/{prefix}",
                                        lambda: self._client.list_objects_v2(**kwargs))
            for item in page.get("Contents", []) or []:
                out.append(ObjectInfo(key=item["Key"], size=int(item["Size"]), etag=normalize_etag(item.get("ETag"))))
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
            if not token:
                break
        out.sort(key=lambda o: o.key)
        return out

    async def head_object(self, bucket: str, key: str) -> ObjectInfo:
        """Size and ETag of one object."""
        resp = await self._retrying(f"head s3://{bucket}/{key}",
                                    lambda: self._client.head_object(Bucket=bucket, Key=key))
        return ObjectInfo(key=key, size=int(resp["ContentLength"]), etag=normalize_etag(resp.get("ETag")))

    async def read_range(self, *, bucket: str, key: str, etag: str, start: int, length: int,
                         buffer: bytearray, sink: Callable[[int, memoryview], Awaitable[None]]) -> None:
        """Read ``[start, start+length)`` of an object, handing full buffers to ``sink(offset, view)``.

        ``If-Match`` pins the ETag so a concurrent overwrite fails (412) instead of mixing revisions; the
        response's ETag is checked too, for servers that ignore ``If-Match``. On a transient error the read
        resumes from the last byte given to ``sink`` — nothing is fetched twice within one part.
        """
        done = 0
        what = f"get s3://{bucket}/{key} bytes {start}-{start + length - 1}"

        async def attempt() -> None:
            nonlocal done
            if length - done <= 0:
                return
            first, last = start + done, start + length - 1
            kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={first}-{last}"}
            if etag:
                kwargs["IfMatch"] = f'"{etag}"'
            resp = await self._client.get_object(**kwargs)
            body = resp["Body"]
            try:
                got_etag = normalize_etag(resp.get("ETag"))
                if etag and got_etag and got_etag != etag:
                    raise ObjectChangedError(f"{what}: ETag changed from {etag} to {got_etag}")
                want = last - first + 1
                if int(resp.get("ContentLength", want)) != want:
                    raise RangeNotSupportedError(
                        f"{what}: server answered {resp.get('ContentLength')} bytes "
                        f"(Content-Range {resp.get('ContentRange')!r}) for a {want}-byte range")
                await self._drain(body, want=want, offset=start + done, buffer=buffer, sink=sink,
                                  on_progress=lambda n: _advance(n))
            finally:
                body.close()

        def _advance(n: int) -> None:
            nonlocal done
            done += n
            self.bytes_received += n

        await self._retrying(what, attempt)

    @staticmethod
    async def _drain(body: Any, *, want: int, offset: int, buffer: bytearray,
                     sink: Callable[[int, memoryview], Awaitable[None]], on_progress: Callable[[int], None]) -> None:
        view = memoryview(buffer)
        cap = len(buffer)
        fill = 0
        received = 0
        content = body.__wrapped__.content  # aiohttp StreamReader: read straight from it, no wrapper per chunk
        try:
            while received < want:
                chunk = await content.read(min(cap - fill, want - received))
                if not chunk:
                    raise TruncatedBodyError(f"body ended after {received} of {want} bytes")
                n = len(chunk)
                view[fill:fill + n] = chunk
                fill += n
                received += n
                if fill == cap or received == want:
                    await sink(offset, view[:fill])
                    offset += fill
                    on_progress(fill)
                    fill = 0
        except Exception:
            if fill:  # hand over what arrived intact, so a retry resumes after it
                await sink(offset, view[:fill])
                on_progress(fill)
            raise

