"""The S3 data plane: blocking ranged GETs of presigned URLs over a lean HTTP/1.1 client, in worker threads.

:class:`agent.transfer.s3.S3Client` hands each GET attempt to a worker thread that runs :meth:`DataPlane.get`; the
bytes are received into the caller's buffer and handed to its ``write`` (``pwrite`` and hash) in that same thread, so
the event loop never touches object data. This module must never log a URL (a presigned URL is a credential),
a signature
or a proxy's password, and never import botocore: it gets URLs from a ``presign`` callable.

Why by hand rather than http.client (measured on 2 cores; see ``bench/datapath.py``):

- A request is one ``sendall`` of bytes built with one f-string, and a response head is parsed from the bytes of
  one ``recv`` (usually with the first body bytes behind it). http.client builds headers call by call and parses
  them with the ``email`` package: with thousands of small objects that was more CPU than the bytes themselves.
- A body is read straight into the caller's buffer: ``recv_into`` with ``MSG_WAITALL`` on a plain socket fills
  the buffer in one call (one GIL release); a TLS socket is read with ``recv_into`` asking for the whole rest of
  the buffer, not through http.client's ``BufferedReader`` and ``SocketIO`` layers.
- A kept-alive connection the server closed while idle is reopened and the request sent again at once, without
  spending a retry (and its back-off) on it.

What it must do itself, because botocore no longer carries these bytes: proxies from the environment
(``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``, urllib's parsing and bypass rules: a CONNECT tunnel for https,
absolute-form requests for http), and checking which bytes came back (a ``200`` is the requested range only if
``Content-Range`` says so, or if the range was the whole object). Presigning: :mod:`agent.transfer.presign`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import mmap
import os
import re
import socket
import ssl
import struct
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.errors import (
    ConfigError,
    DiskFullError,
    ObjectChangedError,
    RangeNotSupportedError,
    WriteError,
)
from agent.transfer.presign import host_header

__all__ = [
    "DataPlane",
    "GetCancelled",
    "HttpStatusError",
    "RangeJob",
    "TruncatedBodyError",
]

#: The longest response head accepted (S3 sends under 2 KiB); also the size of each connection's head buffer.
_HEAD_MAX = 64 * 1024
_WAITALL = getattr(socket, "MSG_WAITALL", 0)


class TruncatedBodyError(Exception):
    """The body ended before the bytes the response promised (retryable)."""


class HttpStatusError(Exception):
    """A non-2xx answer to a ranged GET (or to a proxy's CONNECT), with the S3 error code from its XML body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code = status, code


class GetCancelled(Exception):
    """The GET was cancelled from outside (:meth:`RangeJob.cancel`): it stopped at its next read."""


class _StaleConnection(ConnectionError):
    """A kept-alive connection closed before any byte of the answer: send the request again on a new one."""


# --- one GET --------------------------------------------------------------------------------------------------


@dataclass
class RangeJob:
    """One attempt at bytes ``[first, last]`` of an object: where to put them, and how to stop it from outside."""

    presign: Callable[[], str]
    first: int
    last: int
    etag: str
    buffer: bytearray | mmap.mmap
    write: Callable[[int, memoryview], None]
    progressed: Callable[[int], None]
    what: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    sock: socket.socket | None = None

    def cancel(self) -> None:
        """Stop the GET from another thread: its socket is shut down, so a blocked read returns at once."""
        self.cancelled.set()
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown would drop the TLS state
                # under the reading thread's feet; this only makes its read end.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


@dataclass(frozen=True, slots=True)
class _Proxy:
    """An HTTP proxy from the environment: where it listens, and the Proxy-Authorization its URL carries."""

    host: str
    port: int
    authorization: str | None

    @classmethod
    def parse(cls, url: str, *, variable: str) -> _Proxy:
        # urllib (and botocore) accept a bare host:port and mean http://host:port.
        u = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if u.scheme != "http" or not u.hostname:
            raise ConfigError(f"{variable} must be an http:// proxy URL (host and port), got scheme "
                              f"{u.scheme!r}: the data plane tunnels TLS through the proxy, it does not speak TLS "
                              "to the proxy itself")
        authorization = None
        if u.username is not None:
            pair = f"{urllib.parse.unquote(u.username)}:{urllib.parse.unquote(u.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return cls(host=u.hostname, port=u.port or 80, authorization=authorization)

    def header_lines(self) -> str:
        return f"Proxy-Authorization: {self.authorization}\r\n" if self.authorization else ""


class _Connection:
    """One kept-alive connection, owned by one worker thread, and the bytes read past the last response head."""

    __slots__ = ("end", "extra", "head", "origin", "sock", "start", "tls", "used")

    def __init__(self, sock: socket.socket, *, tls: bool, origin: str = "", extra: str = "") -> None:
        self.sock = sock
        self.tls = tls
        self.head = bytearray(_HEAD_MAX)
        self.start = self.end = 0  # head[start:end]: received, not yet consumed
        self.origin = origin  # "http://host:port" for absolute-form requests through an http proxy
        self.extra = extra  # header lines every request on this connection carries (Proxy-Authorization)
        self.used = False  # has answered a request before (a failure before any byte may be an idle close)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _recv_more(self) -> None:
        """Receive at least one more byte into the head buffer (moving what is unread to its start first)."""
        if self.start:
            n = self.end - self.start
            self.head[:n] = self.head[self.start:self.end]
            self.start, self.end = 0, n
        if self.end == len(self.head):
            raise http.client.HTTPException(f"response head or chunk line longer than {_HEAD_MAX} bytes")
        n = self._recv(memoryview(self.head)[self.end:], 0)
        if not n:
            raise TruncatedBodyError("the connection closed mid-answer")
        self.end += n

    def read_head(self) -> tuple[int, str, dict[str, str], bool]:
        """Status, reason, headers (lower-case names) and whether the connection may be kept alive."""
        while (i := self.head.find(b"\r\n\r\n", self.start, self.end)) < 0:
            try:
                self._recv_more()
            except (TruncatedBodyError, ConnectionResetError, BrokenPipeError) as e:
                if self.used and self.end == self.start:
                    raise _StaleConnection(str(e)) from e
                raise
        lines = bytes(self.head[self.start:i]).decode("latin-1").split("\r\n")
        self.start = i + 4
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise http.client.BadStatusLine(lines[0][:100])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        return int(code), reason, headers, keep

    def readline(self) -> bytes:
        while (i := self.head.find(b"\r\n", self.start, self.end)) < 0:
            self._recv_more()
        line = bytes(self.head[self.start:i])
        self.start = i + 2
        return line

    def readinto(self, view: memoryview) -> int:
        """Bytes into ``view``: those already received first, then straight off the socket (0 at EOF)."""
        pending = self.end - self.start
        if pending:
            n = min(pending, len(view))
            view[:n] = self.head[self.start:self.start + n]
            self.start += n
            return n
        return self._recv(view, 0 if self.tls else _WAITALL)

    def _recv(self, view: memoryview, flags: int) -> int:
        if self.tls:  # TLS sockets take no flags; each call returns at most one TLS record (16 KiB)
            return self.sock.recv_into(view, len(view))
        try:
            return self.sock.recv_into(view, len(view), flags)
        except BlockingIOError as e:  # SO_RCVTIMEO expired
            raise TimeoutError("no bytes within the read timeout") from e


class DataPlane:
    """Blocking ranged GETs, one kept-alive connection per worker thread and origin."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._local = threading.local()
        cafile = os.environ.get("AWS_CA_BUNDLE") or None
        self._ssl = ssl.create_default_context(cafile=cafile if cafile and os.path.exists(cafile) else None)
        # Read once, like every other setting; urllib's rules (lower case wins, HTTP_PROXY ignored under CGI)
        # are the ones botocore applies to the control plane.
        self._proxy_env = urllib.request.getproxies_environment()
        self._proxies = {scheme: _Proxy.parse(self._proxy_env[scheme], variable=f"{scheme.upper()}_PROXY")
                         for scheme in ("http", "https") if self._proxy_env.get(scheme)}
        seconds = int(read_timeout)
        self._timeval = struct.pack("ll", seconds, int((read_timeout - seconds) * 1e6))

    def _proxy_for(self, scheme: str, netloc: str) -> _Proxy | None:
        proxy = self._proxies.get(scheme)
        # proxy_bypass_environment: urllib's NO_PROXY matching (suffixes, ports, "*"), missing from typeshed.
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        if proxy is None or bypass(netloc, self._proxy_env):
            return None
        return proxy

    def _conns(self) -> dict[tuple[str, str, int | None], _Connection]:
        conns: dict[tuple[str, str, int | None], _Connection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _open(self, scheme: str, host: str, port: int | None) -> _Connection:
        netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
        proxy = self._proxy_for(scheme, netloc)
        default = 443 if scheme == "https" else 80
        where = (proxy.host, proxy.port) if proxy is not None else (host, port or default)
        sock = socket.create_connection(where, timeout=self._connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if proxy is not None:  # CONNECT host:port, then TLS with the origin (its SNI, its certificate)
                    self._tunnel(sock, proxy, host, port or default)
                sock = self._ssl.wrap_socket(sock, server_hostname=host)
                sock.settimeout(self._read_timeout)  # TLS reads need Python's timeout mode, not SO_RCVTIMEO
                return _Connection(sock, tls=True)
            # Plain sockets block, with the read timeout as SO_RCVTIMEO: MSG_WAITALL then fills a whole buffer.
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._timeval)
            if proxy is not None:  # absolute-form requests; the Host header stays the origin's
                return _Connection(sock, tls=False, origin=f"http://{netloc}", extra=proxy.header_lines())
            return _Connection(sock, tls=False)
        except BaseException:
            sock.close()
            raise

    def _tunnel(self, sock: socket.socket, proxy: _Proxy, host: str, port: int) -> None:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{proxy.header_lines()}\r\n".encode())
        probe = _Connection(sock, tls=False)
        status, reason, _, _ = probe.read_head()
        if status != 200:
            raise HttpStatusError(status, "ProxyConnectFailed", f"the proxy refused the tunnel: {reason}")
        if probe.end != probe.start:
            raise http.client.HTTPException("the proxy sent bytes after accepting the tunnel")

    def get(self, job: RangeJob) -> None:
        """Run one GET attempt to the end (bytes handed to ``job.write``) or raise; resuming is the caller's."""
        u = urllib.parse.urlsplit(job.presign())
        scheme, host, port = u.scheme, u.hostname or "", u.port
        key = (scheme, host, port)
        conns = self._conns()
        target = f"{u.path}?{u.query}" if u.query else u.path
        for _ in range(2):  # a second time only when a kept-alive connection turned out closed
            conn = conns.pop(key, None) or self._open(scheme, host, port)
            job.sock = conn.sock
            try:
                keep = self._get(conn, job, host_header(scheme, host, port), target)
            except _StaleConnection:
                conn.close()
                continue
            except BaseException:
                conn.close()  # a connection with unread bytes cannot be reused
                raise
            finally:
                job.sock = None
            if keep:
                conn.used = True
                conns[key] = conn
            else:
                conn.close()
            return
        raise ConnectionResetError(f"{job.what}: the connection closed before answering, twice")

    def _get(self, conn: _Connection, job: RangeJob, host: str, target: str) -> bool:
        if job.cancelled.is_set():
            raise GetCancelled(job.what)
        if_match = f'If-Match: "{job.etag}"\r\n' if job.etag else ""
        request = (f"GET {conn.origin}{target} HTTP/1.1\r\nHost: {host}\r\nRange: bytes={job.first}-{job.last}\r\n"
                   f"{if_match}{conn.extra}Accept-Encoding: identity\r\nUser-Agent: weightcache-agent\r\n\r\n")
        try:
            conn.sock.sendall(request.encode())
        except (BrokenPipeError, ConnectionResetError) as e:
            if conn.used:
                raise _StaleConnection(str(e)) from e
            raise
        except BlockingIOError as e:  # SO_SNDTIMEO expired
            raise TimeoutError("the request could not be sent within the read timeout") from e
        status, reason, headers, keep = conn.read_head()
        if status not in (200, 206):
            body = _error_body(conn, headers)
            raise HttpStatusError(status, _xml_field(body, "Code") or str(status),
                                  _xml_field(body, "Message") or reason)
        got_etag = headers.get("etag", "").strip().strip('"')
        if job.etag and got_etag and got_etag != job.etag:
            raise ObjectChangedError(f"{job.what}: ETag changed from {job.etag} to {got_etag}")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = None if chunked else headers.get("content-length")
        check_range(job, status, headers.get("content-range"), length)
        if chunked:
            _receive(job, _ChunkedReader(conn).readinto)
            return False  # the rest of a chunked body (its last chunk, trailers) is not worth reading
        _receive(job, conn.readinto)
        return keep and length is not None


def _receive(job: RangeJob, readinto: Callable[[memoryview], int]) -> None:
    """Fill the job's buffer from ``readinto`` and hand each full buffer (and the last) to ``write``, in order."""
    want = job.last - job.first + 1
    view = memoryview(job.buffer)
    cap = len(job.buffer)
    offset, fill, received = job.first, 0, 0
    try:
        while received < want:
            if job.cancelled.is_set():
                raise GetCancelled(job.what)
            n = readinto(view[fill:min(cap, fill + want - received)])
            if not n:
                raise TruncatedBodyError(f"body ended after {received} of {want} bytes")
            fill += n
            received += n
            if fill == cap or received == want:
                _write(job, offset, view[:fill])
                offset += fill
                fill = 0
    except (http.client.HTTPException, OSError, TruncatedBodyError):
        if fill:  # keep what arrived intact, so the retry resumes after it
            _write(job, offset, view[:fill])
        raise


def _write(job: RangeJob, offset: int, view: memoryview) -> None:
    try:
        job.write(offset, view)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{job.what}: no space left on the cache filesystem") from e
        raise WriteError(f"{job.what}: writing to the cache failed: {e}") from e
    job.progressed(len(view))


class _ChunkedReader:
    """A chunked body (``Transfer-Encoding: chunked``), which S3 does not send but a proxy may."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._left = 0  # bytes left in the current chunk
        self._chunks = 0
        self._done = False

    def readinto(self, view: memoryview) -> int:
        if self._done:
            return 0
        if not self._left:
            if self._chunks:
                self._conn.readline()  # the CRLF after the previous chunk's data
            size = self._conn.readline().split(b";", 1)[0].strip()
            try:
                self._left = int(size, 16)
            except ValueError as e:
                raise http.client.HTTPException(f"bad chunk size line {size[:40]!r}") from e
            self._chunks += 1
            if not self._left:
                self._done = True
                return 0
        n = self._conn.readinto(view[:self._left])
        self._left -= n
        return n


def _error_body(conn: _Connection, headers: dict[str, str]) -> str:
    """Up to 64 KiB of an error answer's body (for its S3 error code); the connection is not reused after it."""
    length = headers.get("content-length", "")
    want = min(int(length), _HEAD_MAX) if length.isdigit() else conn.end - conn.start
    body = bytearray(want)
    view, got = memoryview(body), 0
    with contextlib.suppress(OSError, TruncatedBodyError):
        while got < want and (n := conn.readinto(view[got:])):
            got += n
    return bytes(body[:got]).decode("utf-8", "replace")


_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.ASCII)


def check_range(job: RangeJob, status: int, content_range: str | None, content_length: str | None) -> None:
    """Refuse an answer that is not exactly the bytes asked for, before a byte of it is written.

    Real S3 answers 206 with ``Content-Range``; rclone answers 200 with the right ``Content-Range``; a server
    that ignores ``Range`` answers 200 with the whole object, which is the range asked for only if the range
    starts at byte 0 and the lengths agree.
    """
    want = job.last - job.first + 1
    if content_range is not None:
        m = _CONTENT_RANGE_RE.fullmatch(content_range.strip())
        if m is None or (int(m[1]), int(m[2])) != (job.first, job.last):
            raise RangeNotSupportedError(f"{job.what}: server answered {status} with Content-Range "
                                         f"{content_range!r} for bytes {job.first}-{job.last}")
    elif status == 206:
        raise RangeNotSupportedError(f"{job.what}: server answered 206 without a Content-Range")
    elif job.first != 0 or content_length is None:
        raise RangeNotSupportedError(f"{job.what}: server answered 200 without a Content-Range (it ignored the "
                                     f"Range header) for bytes {job.first}-{job.last}")
    if content_length is not None and int(content_length) != want:
        raise RangeNotSupportedError(f"{job.what}: server answered {content_length} bytes (Content-Range "
                                     f"{content_range!r}) for a {want}-byte range")


def _xml_field(body: str, name: str) -> str:
    m = re.search(rf"<{name}>(.*?)</{name}>", body, re.DOTALL)
    return m.group(1).strip() if m else ""
