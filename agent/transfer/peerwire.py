"""The peer protocol on the wire, shared by the serving and the fetching side: paths, headers, the shared token,
chunk bitmaps and the static peer list. No I/O beyond reading the token file.

A source is one revision of one S3 object, named by :func:`agent.store.manifest.source_id` (bucket, key, ETag, size), so
two agents that listed the same revision ask for the same thing, and nothing else can be asked for. Bytes move in
whole digest chunks (:data:`agent.store.layout.CHUNK_SIZE`); every ranged answer carries the xxh3-128 digests of the
chunks it covers, recorded when the serving agent received them from S3 (or from a verified peer), so the fetching
agent checks every chunk before it writes it.

    POST /v1/peer/state  {"sources": [<id>, …]}  → {"sources": {<id>: null | {size, chunk_size, complete,
                                                   digest (when complete), have, busy (base64 bitmaps)}}}
    GET /v1/peer/sources/<source-id>             → 206 with ``Range: bytes=a-b`` (chunk-aligned), header
                                                   ``X-Weightcache-Chunks: <hex>,<hex>,…``

Every request presents ``Authorization: Bearer <token>``: none is 401, a wrong one 403, for any path.
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError

log = logging.getLogger(__name__)

STATE_PATH = "/v1/peer/state"
DATA_PATH = "/v1/peer/sources/{source}"
CHUNKS_HEADER = "X-Weightcache-Chunks"
#: Sources asked of one peer in one state request.
MAX_STATE_BATCH = 1024
#: A source id is the hex of an xxh3-128: anything else is refused before it reaches a path.
SOURCE_RE = re.compile(r"[0-9a-f]{32}")
#: The token file is read again at most this often, so a rotated Secret takes effect without a restart.
TOKEN_RELOAD_SECONDS = 5.0
MIN_TOKEN_CHARS = 16


class PeerToken:
    """The shared secret that peers present; read from a mounted file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._value = ""
        self._mtime = -1.0
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        try:
            st = os.stat(self.path)
            if st.st_mtime == self._mtime:
                return
            value = self.path.read_text("utf-8").strip()
        except OSError as e:
            raise ConfigError(f"peer token file {self.path}: {e.strerror or e}") from e
        if len(value) < MIN_TOKEN_CHARS:
            raise ConfigError(f"peer token file {self.path}: the token must be at least {MIN_TOKEN_CHARS} characters")
        self._value, self._mtime = value, st.st_mtime

    @property
    def value(self) -> str:
        now = time.monotonic()
        if now - self._checked >= TOKEN_RELOAD_SECONDS:
            self._checked = now
            try:
                self._load()
            except ConfigError as e:  # a Secret being rotated: keep the last good token
                log.warning("%s; keeping the previous peer token", e)
        return self._value

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}

    def check(self, authorization: str | None) -> int:
        """200 if ``authorization`` presents the token, 401 if it presents none, 403 if a wrong one."""
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return 401
        return 200 if hmac.compare_digest(presented.strip().encode(), self.value.encode()) else 403


@dataclass(frozen=True, slots=True)
class PeerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_peer(text: str, *, default_port: int) -> PeerAddress:
    """``host``, ``host:port`` or ``[v6]:port``."""
    text = text.strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", text)
    if not m:
        raise ConfigError(f"peer address {text!r}: expected host:port")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4) or default_port)
    if not 0 < port < 65536:
        raise ConfigError(f"peer address {text!r}: port out of range")
    return PeerAddress(host, port)


def parse_peer_list(text: str, *, default_port: int) -> list[PeerAddress]:
    return [parse_peer(p, default_port=default_port) for p in text.split(",") if p.strip()]


def encode_bits(bits: bytearray | bytes) -> str:
    """One byte per chunk (0/1) in memory; a packed bitmap, base64, on the wire."""
    packed = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            packed[i >> 3] |= 1 << (i & 7)
    return base64.b64encode(bytes(packed)).decode("ascii")


def decode_bits(text: str, count: int) -> bytearray:
    packed = base64.b64decode(text.encode("ascii"), validate=True) if text else b""
    if len(packed) < (count + 7) // 8:
        raise ValueError("bitmap shorter than the chunk count")
    return bytearray((packed[i >> 3] >> (i & 7)) & 1 for i in range(count))


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)
