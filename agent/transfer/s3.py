"""Talking to S3: list a prefix, HEAD an object, ranged GETs with If-Match — and retries for what is transient.

The only module that imports botocore. Endpoint and credentials come from the standard AWS chain
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, IRSA web-identity tokens, instance profiles…); nothing here logs a
credential. botocore's own retries are off: every request is retried here, from an explicit tuple of transient
errors, with exponential backoff and full jitter, and a ranged GET resumes from the last byte it handed over.

Why botocore's (thread-safe) synchronous client in worker threads rather than aiobotocore: object bytes already
move in worker threads (``recv_into`` then ``pwrite``, off the event loop and without the GIL for the copies), so
botocore only lists, HEADs and presigns; aiobotocore would add an aiohttp session that carries no data and about
half a second of import and client start-up to every ``prefetch`` and every server fallback.

The data plane (ranged GETs of presigned URLs over a lean HTTP/1.1 client, proxies, the ``Content-Range`` check)
is :mod:`agent.transfer.s3data`. What stays here, because it needs botocore: signing for the bucket's region. botocore
follows a wrong-region redirect for the requests it sends, but signs a presigned URL for the client's own region
whatever it learned, so a bucket outside ``AWS_REGION`` would list fine and then fail every GET. The bucket's
region is learned once per bucket (``x-amz-bucket-region`` from a response we already had, else HeadBucket, as
botocore's redirector does), and GETs are presigned for that region: by
:func:`agent.transfer.presign.presign_get` (hmac, ~20 µs) once it has been shown to produce botocore's own URL for
that bucket, else by botocore (~300 µs each).

This module never logs a credential, a presigned URL (it is one) nor a proxy URL's password.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import logging
import mmap
import os
import random
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import botocore.loaders
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
from botocore.exceptions import SSLError as BotocoreSSLError

from agent.config import AgentSettings
from agent.errors import (
    AccessDeniedError,
    ObjectChangedError,
    ObjectNotFoundError,
    RetriesExhaustedError,
    S3Error,
    WriteError,
)
from agent.transfer.presign import PRESIGN_SECONDS, PROBE_KEY, fast_presigner
from agent.transfer.s3data import DataPlane, HttpStatusError, RangeJob, TruncatedBodyError

__all__ = [
    "PRESIGN_SECONDS",
    "RETRYABLE_CODES",
    "RETRYABLE_EXCEPTIONS",
    "RETRYABLE_STATUS",
    "HttpStatusError",
    "ObjectInfo",
    "S3Client",
    "TruncatedBodyError",
    "WriteError",  # re-exported from agent.errors: callers catch it where they call read_range
    "is_retryable",
    "normalize_etag",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: S3 error codes worth another try (throttling and server-side trouble), after boto/s3transfer's list.
RETRYABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "503", "500", "502",
    "504", "429", "BadGateway", "GatewayTimeout",
})
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})

#: Transport-level errors that a retry can fix: resets, timeouts, truncated or broken bodies.
RETRYABLE_EXCEPTIONS: tuple[type[BaseException], ...] = (
    TruncatedBodyError,
    EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError,
    IncompleteReadError, ResponseStreamingError, HTTPClientError,
    asyncio.TimeoutError, ConnectionError, TimeoutError, http.client.HTTPException,
    ssl.SSLError,  # a TLS record cut short (SSLEOFError) is a reset by another name; untrusted certificates aside
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
    if _untrusted_certificate(e):
        return False
    if isinstance(e, HttpStatusError):
        return e.status in RETRYABLE_STATUS or e.code in RETRYABLE_CODES
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
        self._session: Any = None
        self._config: Config | None = None
        self._client: Any = None
        #: Presigning clients by region (the main client under its own region among them).
        self._signers: dict[str, Any] = {}
        #: Each bucket's region, once known (from a response header or HeadBucket).
        self._bucket_regions: dict[str, str] = {}
        #: How each bucket's GETs are presigned: key → URL (hmac once proven equal to botocore, else botocore).
        self._presigners: dict[str, Callable[[str], str]] = {}
        self._signer_lock = asyncio.Lock()
        #: Bytes of object data received from S3 (for metrics and benchmarks).
        self.bytes_received = 0
        self.retries = 0
        self._plane = DataPlane(connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout)
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency + 2, thread_name_prefix="s3-get")

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
        self._config = config
        # One session for every client: the regional presigners share its credentials (one IRSA refresh, not one
        # per region). Loading the service model takes a moment of CPU; keep the event loop free meanwhile.
        self._session = botocore.session.get_session()
        self._session.register_component("data_loader", ServiceDataLoader.for_session(self._session))
        # Listings carry every object's LastModified, which botocore parses with dateutil (half the CPU of listing
        # 2,000 objects); nothing here reads it, so it stays the string it came as.
        self._session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
        self._client = await asyncio.to_thread(self._session.create_client, "s3", config=config)
        self._signers[str(self._client.meta.region_name)] = self._client
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in {id(c): c for c in [self._client, *self._signers.values()] if c is not None}.values():
            client.close()

    async def _retrying(self, what: str, attempt_fn: Callable[[], Awaitable[T]]) -> T:
        s = self._settings
        last: BaseException | None = None
        for attempt in range(1, s.max_attempts + 1):
            try:
                return await attempt_fn()
            except NoCredentialsError as e:
                raise AccessDeniedError(f"{what}: no AWS credentials found in the standard chain") from e
            except (ssl.SSLError, BotocoreSSLError) as e:
                # A certificate we do not trust stays untrusted: fail now, not after the whole retry budget.
                if _untrusted_certificate(e):
                    raise S3Error(f"{what}: the endpoint's TLS certificate is not trusted ({e}); "
                                  "AWS_CA_BUNDLE names the CA bundle to trust") from e
                last = e
            except ClientError as e:
                if not is_retryable(e):
                    raise _translate(e, what=what) from e
                last = e
            except HttpStatusError as e:
                if not is_retryable(e):
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
            self._note_region(bucket, page)
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
        self._note_region(bucket, resp)
        return ObjectInfo(key=key, size=int(resp["ContentLength"]), etag=normalize_etag(resp.get("ETag")))

    async def read_range(self, *, bucket: str, key: str, etag: str, start: int, length: int,
                         buffer: bytearray | mmap.mmap, write: Callable[[int, memoryview], None],
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
        presigner = await self._presigner_for(bucket)

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
            job = RangeJob(presign=functools.partial(presigner, key), first=start + done,
                           last=start + length - 1, etag=etag, buffer=buffer,
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

    # -- the bucket's region, for presigning ----------------------------------------------------------------

    def _note_region(self, bucket: str, response: dict[str, Any]) -> None:
        """Remember the region a response says the bucket lives in (AWS sends it with most answers)."""
        region = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if region and _REGION_RE.fullmatch(region):
            self._bucket_regions.setdefault(bucket, region)

    async def _signer_for(self, bucket: str) -> Any:
        """The client that presigns GETs for ``bucket``: one configured for the bucket's own region."""
        region = self._bucket_regions.get(bucket)
        signer = self._signers.get(region) if region else None
        if signer is not None:
            return signer
        async with self._signer_lock:  # one HeadBucket per bucket, one client per region, however many parts wait
            region = self._bucket_regions.get(bucket)
            if region is None:
                region = await self._discover_region(bucket)
                self._bucket_regions[bucket] = region
            signer = self._signers.get(region)
            if signer is None:
                log.info("bucket %s is in region %s: presigning its GETs for that region", bucket, region)
                signer = await asyncio.to_thread(self._session.create_client, "s3", region_name=region,
                                                 config=self._config)
                self._signers[region] = signer
            return signer

    async def _presigner_for(self, bucket: str) -> Callable[[str], str]:
        """key → presigned GET URL for ``bucket``, signed for its region."""
        presigner = self._presigners.get(bucket)
        if presigner is None:
            client = await self._signer_for(bucket)
            async with self._signer_lock:
                presigner = self._presigners.get(bucket)
                if presigner is None:
                    presigner = await asyncio.to_thread(self._make_presigner, client, bucket)
                    self._presigners[bucket] = presigner
        return presigner

    def _make_presigner(self, client: Any, bucket: str) -> Callable[[str], str]:
        def by_botocore(key: str) -> str:
            return str(client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                     ExpiresIn=PRESIGN_SECONDS))

        try:
            reference = by_botocore(PROBE_KEY)
        except Exception:  # noqa: BLE001 - e.g. no credentials: each GET then fails (and reports) as it always did
            return by_botocore
        fast = fast_presigner(reference, self._session.get_credentials())
        if fast is None:
            log.info("bucket %s: presigned URLs differ from the usual SigV4 form; presigning each GET with botocore",
                     bucket)
            return by_botocore
        return fast

    async def _discover_region(self, bucket: str) -> str:
        """HeadBucket's ``x-amz-bucket-region`` (sent with errors too: a 403 still names the region).

        botocore's redirector follows a wrong-region answer to HeadBucket itself. A server that names no region
        (most S3-compatible stores) gets URLs signed for the configured region, as before.
        """
        configured = str(self._client.meta.region_name)

        def head_bucket() -> str | None:
            try:
                resp = self._client.head_bucket(Bucket=bucket)
            except ClientError as e:
                if is_retryable(e):
                    raise
                resp = e.response
            region = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
            return str(region) if region and _REGION_RE.fullmatch(str(region)) else None

        try:
            found = await self._retrying(f"locate bucket {bucket}", lambda: asyncio.to_thread(head_bucket))
        except S3Error as e:
            log.warning("could not learn the region of bucket %s (%s); presigning for %s", bucket, e, configured)
            return configured
        return found or configured


class ServiceDataLoader(botocore.loaders.Loader):  # type: ignore[misc]
    """botocore's data loader, minus one scan: making a client lists *every* AWS service's models (≈ 870 directory
    reads, twice) to check that one exists — ≈ 0.1 s of a CLI start with a cold page cache (``create_client``:
    0.15–0.19 s → 0.08 s). Here ``in`` looks at that service's directory only; iterating still lists them all."""

    @classmethod
    def for_session(cls, session: Any) -> ServiceDataLoader:
        """A loader with the search paths botocore would give ``session`` (``AWS_DATA_PATH`` etc.)."""
        data_path = session.get_config_variable("data_path")
        paths = [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)] if data_path else []
        return cls(extra_search_paths=paths)

    def list_available_services(self, type_name: str) -> _KnownServices:
        return _KnownServices(self, type_name)

    def has_service(self, name: str, type_name: str) -> bool:
        """What botocore's list asks of each service, asked of one: some API version of it has ``type_name``."""
        dirs = [os.path.join(root, name) for root in self.search_paths if os.sep not in name]
        return any(self.file_loader.exists(os.path.join(d, version, type_name))
                   for d in dirs if os.path.isdir(d) for version in os.listdir(d))


class _KnownServices(Sequence[str]):
    def __init__(self, loader: ServiceDataLoader, type_name: str) -> None:
        self._loader, self._type_name = loader, type_name
        self._names: list[str] | None = None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._loader.has_service(name, self._type_name)

    def _all(self) -> list[str]:
        if self._names is None:
            self._names = list(botocore.loaders.Loader.list_available_services(self._loader, self._type_name))
        return self._names

    def __getitem__(self, index: Any) -> Any:
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())


#: What botocore accepts as a region name (``validate_region_name``): a header must not become a hostname.
_REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _untrusted_certificate(e: BaseException) -> bool:
    """True when a TLS error (ours or botocore's wrapping of urllib3's) is a failed certificate verification."""
    seen: BaseException | None = e
    for _ in range(8):  # the cause chain: botocore SSLError → urllib3 SSLError → ssl.SSLCertVerificationError
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
