"""Talking to S3: list a prefix, HEAD an object, ranged GETs with If-Match — and retries for what is transient.

The only module that imports botocore. Endpoint and credentials come from the standard AWS chain
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, IRSA web-identity tokens, instance profiles…); nothing here logs a
credential. botocore's own retries are off: every request is retried here, from an explicit tuple of transient
errors, with exponential backoff and full jitter, and a ranged GET resumes from the last byte it handed over.

Why botocore's (thread-safe) synchronous client in worker threads rather than aiobotocore: object bytes already
move in worker threads (``recv_into`` then ``pwrite``, off the event loop and without the GIL for the copies), so
botocore only lists, HEADs and presigns; aiobotocore would add an aiohttp session that carries no data and about
half a second of import and client start-up to every ``prefetch`` and every server fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import http.client
import logging
import os
import random
import re
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

import botocore.session
from botocore.config import Config
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
    DiskFullError,
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
    asyncio.TimeoutError, ConnectionError, TimeoutError, http.client.HTTPException,
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
    if isinstance(e, HttpStatusError):
        return e.retryable
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


def _translate_status(e: HttpStatusError, *, what: str) -> S3Error:
    return _translate(ClientError({"Error": {"Code": e.code, "Message": str(e)},
                                   "ResponseMetadata": {"HTTPStatusCode": e.status}}, "GetObject"), what=what)


class S3Client:
    """An S3 client with the agent's retry policy. Use as ``async with S3Client(settings) as s3``."""

    def __init__(self, settings: AgentSettings) -> None:
        self._settings = settings
        self._client: Any = None
        #: Bytes of object data received from S3 (for metrics and benchmarks).
        self.bytes_received = 0
        self.retries = 0
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency + 2, thread_name_prefix="s3-get")
        self._plane = _DataPlane(connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout)

    async def __aenter__(self) -> Self:
        s = self._settings
        style = s.s3_addressing_style
        if style == "auto":
            style = "path" if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") else "auto"
        config = Config(
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},  # one try: we retry ourselves, resuming reads
            max_pool_connections=s.concurrency + 8,
            s3={"addressing_style": style},
            signature_version="s3v4",  # presigned GETs: SigV4 everywhere (SigV2 is long deprecated)
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
        )
        # Loading the service model takes a moment of CPU; keep the event loop free meanwhile.
        self._client = await asyncio.to_thread(botocore.session.get_session().create_client, "s3", config=config)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()

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
            except HttpStatusError as e:
                if not e.retryable:
                    raise _translate_status(e, what=what) from e
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
                                        functools.partial(asyncio.to_thread, self._client.list_objects_v2, **kwargs))
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
                                    lambda: asyncio.to_thread(self._client.head_object, Bucket=bucket, Key=key))
        return ObjectInfo(key=key, size=int(resp["ContentLength"]), etag=normalize_etag(resp.get("ETag")))

    async def read_range(self, *, bucket: str, key: str, etag: str, start: int, length: int,
                         buffer: bytearray, write: Callable[[int, memoryview], None],
                         on_progress: Callable[[int], None] | None = None) -> None:
        """Read ``[start, start+length)`` of an object, handing full buffers to ``write(offset, view)``.

        The bytes move in a worker thread (``recv_into`` the buffer, then ``write`` — typically ``os.pwrite`` —
        in the same thread), so the event loop never copies object data. ``If-Match`` pins the ETag so an
        overwrite fails (412) instead of mixing revisions, and the response's ETag is checked too, for servers
        that ignore ``If-Match``. On a transient error the read resumes from the last byte handed to ``write``.
        """
        loop = asyncio.get_running_loop()
        done = 0
        what = f"get s3://{bucket}/{key} bytes {start}-{start + length - 1}"

        def progressed(n: int) -> None:
            nonlocal done
            done += n
            self.bytes_received += n
            if on_progress is not None:
                loop.call_soon_threadsafe(on_progress, n)

        async def attempt() -> None:
            if length - done <= 0:
                return
            # Signed in the worker thread: refreshing credentials (IRSA's STS call) may block.
            presign = functools.partial(self._client.generate_presigned_url, "get_object",
                                        Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS)
            job = _RangeJob(presign=presign, first=start + done, last=start + length - 1, etag=etag, buffer=buffer,
                            write=write, progressed=progressed, what=what)
            fut = loop.run_in_executor(self._pool, self._plane.get, job)
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                job.cancel()  # the thread stops at its next chunk; wait so no write lands after we return
                await asyncio.wait([fut])
                if not fut.cancelled():
                    fut.exception()  # retrieve it: unretrieved, asyncio logs an ERROR for every cancelled part
                raise

        await self._retrying(what, attempt)


#: Presigned URLs are made per attempt; one attempt is one part (≤ 64 MiB), so minutes are plenty.
PRESIGN_SECONDS = 900


class HttpStatusError(Exception):
    """A non-2xx answer to a ranged GET, with the S3 error code from its XML body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code = status, code

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUS or self.code in RETRYABLE_CODES


class WriteError(Exception):
    """Writing downloaded bytes to disk failed (never retried: the disk will not heal by itself)."""


@dataclass
class _RangeJob:
    presign: Callable[[], str]
    first: int
    last: int
    etag: str
    buffer: bytearray
    write: Callable[[int, memoryview], None]
    progressed: Callable[[int], None]
    what: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    conn: http.client.HTTPConnection | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        conn = self.conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)


class _DataPlane:
    """Blocking ranged GETs, one keep-alive connection per worker thread."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._local = threading.local()
        cafile = os.environ.get("AWS_CA_BUNDLE") or None
        self._ssl = ssl.create_default_context(cafile=cafile if cafile and os.path.exists(cafile) else None)

    def _connection(self, scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
        key = (scheme, host, port)
        conns: dict[tuple[str, str, int | None], http.client.HTTPConnection] = getattr(self._local, "conns", {})
        self._local.conns = conns
        conn = conns.get(key)
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(host, port, timeout=self._connect_timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout)
            conns[key] = conn
        return conn

    def _drop(self, scheme: str, host: str, port: int | None) -> None:
        conn = getattr(self._local, "conns", {}).pop((scheme, host, port), None)
        if conn is not None:
            conn.close()

    def get(self, job: _RangeJob) -> None:
        u = urllib.parse.urlsplit(job.presign())
        scheme, host, port = u.scheme, u.hostname or "", u.port
        conn = self._connection(scheme, host, port)
        job.conn = conn
        ok = False
        try:
            self._get(conn, job, f"{u.path}?{u.query}" if u.query else u.path)
            ok = True
        finally:
            job.conn = None
            if not ok:
                self._drop(scheme, host, port)  # a connection with unread bytes cannot be reused

    def _get(self, conn: http.client.HTTPConnection, job: _RangeJob, target: str) -> None:
        if job.cancelled.is_set():
            raise asyncio.CancelledError()
        headers = {"Range": f"bytes={job.first}-{job.last}"}
        if job.etag:
            headers["If-Match"] = f'"{job.etag}"'
        conn.request("GET", target, headers=headers)
        if conn.sock is not None:
            conn.sock.settimeout(self._read_timeout)
        resp = conn.getresponse()
        if resp.status not in (200, 206):
            body = resp.read(65536).decode("utf-8", "replace")
            raise HttpStatusError(resp.status, _xml_field(body, "Code") or str(resp.status),
                                  _xml_field(body, "Message") or resp.reason)
        want = job.last - job.first + 1
        got_etag = normalize_etag(resp.getheader("ETag"))
        if job.etag and got_etag and got_etag != job.etag:
            raise ObjectChangedError(f"{job.what}: ETag changed from {job.etag} to {got_etag}")
        length = resp.getheader("Content-Length")
        if length is not None and int(length) != want:
            raise RangeNotSupportedError(
                f"{job.what}: server answered {length} bytes (Content-Range {resp.getheader('Content-Range')!r}) "
                f"for a {want}-byte range")
        view = memoryview(job.buffer)
        cap = len(job.buffer)
        offset, fill, received = job.first, 0, 0
        try:
            while received < want:
                if job.cancelled.is_set():
                    raise asyncio.CancelledError()
                n = resp.readinto(view[fill:min(cap, fill + want - received)])
                if not n:
                    raise TruncatedBodyError(f"body ended after {received} of {want} bytes")
                fill += n
                received += n
                if fill == cap or received == want:
                    self._write(job, offset, view[:fill])
                    offset += fill
                    fill = 0
        except (http.client.HTTPException, OSError, TruncatedBodyError):
            if fill:  # keep what arrived intact, so the retry resumes after it
                self._write(job, offset, view[:fill])
            raise

    @staticmethod
    def _write(job: _RangeJob, offset: int, view: memoryview) -> None:
        try:
            job.write(offset, view)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"{job.what}: no space left on the cache filesystem") from e
            raise WriteError(f"{job.what}: writing to the cache failed: {e}") from e
        job.progressed(len(view))


def _xml_field(body: str, name: str) -> str:
    m = re.search(rf"<{name}>(.*?)</{name}>", body, re.DOTALL)
    return m.group(1).strip() if m else ""
