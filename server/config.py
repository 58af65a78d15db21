"""Every setting of the inference server, typed, read from the environment and flags in this one place.

``ServerSettings`` is a frozen dataclass: each field has a default, its environment variable, a CLI flag and a
one-line reason in ``metadata``, so ``--help`` and the README's settings table are generated from the same
source. Nothing else in ``server/`` reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str) -> int:
    """``"2GiB"``, ``"500MiB"``, ``"1G"``, ``"1.5GB"``, ``"1048576"`` → bytes.

    Both ``G`` and ``GiB`` mean 2**30: people who type a model size mean the binary unit (that is what ``ls -h``
    shows); only an explicit ``GB`` is decimal.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"not a size: {text!r} (try 2GiB, 500MiB, 1G or plain bytes)")
    number, unit, binary = match.groups()
    unit = unit.upper()
    decimal = text.strip().upper().endswith("B") and not binary and unit != ""
    base = 1000 if decimal else 1024
    return int(float(number) * base ** _SIZE_POWERS[unit])


def _env(name: str, help_: str, flag: str, choices: tuple[str, ...] = ()) -> dict[str, Any]:
    meta: dict[str, Any] = {"env": name, "help": help_, "flag": flag}
    if choices:
        meta["choices"] = choices
    return meta


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The server's configuration. Build it with :meth:`from_env` or :meth:`parse`, never field by field."""

    model: str = field(
        default="",
        metadata=_env(
            "WEIGHTCACHE_MODEL",
            "model URI (s3://bucket/prefix/ or s3://bucket/key), resolved under the cache root",
            "--model",
        ),
    )
    model_path: str = field(
        default="",
        metadata=_env(
            "WEIGHTCACHE_MODEL_PATH",
            "explicit model directory or file; used instead of WEIGHTCACHE_MODEL (no agent needed)",
            "--model-path",
        ),
    )
    root: Path = field(
        default=Path("/var/lib/weightcache"),
        metadata=_env("WEIGHTCACHE_ROOT", "node cache root, mounted read-only from the host", "--cache-dir"),
    )
    host: str = field(
        default="0.0.0.0",
        metadata=_env("WEIGHTCACHE_HOST", "address to listen on (all interfaces: the kubelet probes the pod IP)", "--host"),
    )
    port: int = field(default=8000, metadata=_env("WEIGHTCACHE_PORT", "HTTP port", "--port"))
    wait_timeout_seconds: float = field(
        default=900.0,
        metadata=_env(
            "WEIGHTCACHE_WAIT_TIMEOUT_SECONDS",
            "give up (exit non-zero, the pod restarts) if the model is not ready by then; 900 s fits a 70 GB "
            "model at ~100 MB/s",
            "--wait-timeout",
        ),
    )
    device: str = field(
        default="auto",
        metadata=_env(
            "WEIGHTCACHE_DEVICE", "where weights live: auto = cuda when available, else cpu", "--device",
            ("auto", "cpu", "cuda"),
        ),
    )
    handler: str = field(
        default="server.handlers.demo:create_handler",
        metadata=_env("WEIGHTCACHE_HANDLER", "model code as module:factory", "--handler"),
    )
    fallback: str = field(
        default="none",
        metadata=_env(
            "WEIGHTCACHE_FALLBACK",
            "fetch = download the model ourselves if the node agent has not published it within the grace",
            "--fallback",
            ("none", "fetch"),
        ),
    )
    fallback_dir: Path = field(
        default=Path("/tmp/weightcache-fallback"),
        metadata=_env(
            "WEIGHTCACHE_FALLBACK_DIR",
            "writable cache dir for the fallback fetch (mount an emptyDir or a volume here)",
            "--fallback-dir",
        ),
    )
    fallback_grace_seconds: float = field(
        default=30.0,
        metadata=_env(
            "WEIGHTCACHE_FALLBACK_GRACE_SECONDS",
            "how long to wait for the node agent before fetching ourselves; the agent usually starts within "
            "seconds of the pod",
            "--fallback-grace",
        ),
    )
    verify: str = field(
        default="size",
        metadata=_env(
            "WEIGHTCACHE_VERIFY",
            "check loaded files against the cache manifest: size (free), digest (xxh3-128, reads every byte "
            "once more), none",
            "--verify",
            ("size", "digest", "none"),
        ),
    )
    load_strategy: str = field(
        default="auto",
        metadata=_env(
            "WEIGHTCACHE_LOAD_STRATEGY",
            "auto = zero-copy mmap on cpu, pinned-buffer pipeline on cuda",
            "--load-strategy",
            ("auto", "mmap", "pipelined"),
        ),
    )
    readahead: str = field(
        default="on",
        metadata=_env(
            "WEIGHTCACHE_READAHEAD",
            "if the model is already cached at start, read it into the page cache while torch imports",
            "--readahead",
            ("on", "off"),
        ),
    )
    max_body_bytes: int = field(
        default=8 * 1024 * 1024,
        metadata=_env("WEIGHTCACHE_MAX_BODY_BYTES", "largest request body accepted (413 above)", "--max-body-bytes"),
    )
    max_batch: int = field(
        default=256,
        metadata=_env("WEIGHTCACHE_MAX_BATCH", "most rows in one /v1/predict request (422 above)", "--max-batch"),
    )
    poll_interval_seconds: float = field(
        default=1.0,
        metadata=_env(
            "WEIGHTCACHE_POLL_INTERVAL_SECONDS",
            "safety re-check while waiting; inotify wakes us sooner (floor 0.1 s: never busy-poll)",
            "--poll-interval",
        ),
    )
    log_format: str = field(
        default="text",
        metadata=_env("WEIGHTCACHE_LOG_FORMAT", "text or json (one object a line)", "--log-format", ("text", "json")),
    )
    log_level: str = field(
        default="INFO",
        metadata=_env(
            "WEIGHTCACHE_LOG_LEVEL", "logging level", "--log-level", ("DEBUG", "INFO", "WARNING", "ERROR"),
        ),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.metadata['env']}={getattr(self, f.name)!r}: expected one of {', '.join(choices)}"
                )
        if not self.model and not self.model_path:
            raise ConfigError("set WEIGHTCACHE_MODEL (an s3:// URI) or WEIGHTCACHE_MODEL_PATH (a directory or file)")
        if self.model and self.model_path:
            raise ConfigError("set only one of WEIGHTCACHE_MODEL and WEIGHTCACHE_MODEL_PATH")
        if self.fallback == "fetch" and not self.model:
            raise ConfigError("WEIGHTCACHE_FALLBACK=fetch needs WEIGHTCACHE_MODEL (a URI to fetch)")
        if not 0 < self.port < 65536:
            raise ConfigError(f"WEIGHTCACHE_PORT={self.port}: not a TCP port")
        if self.wait_timeout_seconds <= 0:
            raise ConfigError("WEIGHTCACHE_WAIT_TIMEOUT_SECONDS must be positive")
        if self.poll_interval_seconds < 0.1:
            raise ConfigError("WEIGHTCACHE_POLL_INTERVAL_SECONDS must be at least 0.1 (no busy polling)")
        if self.max_body_bytes <= 0 or self.max_batch <= 0:
            raise ConfigError("WEIGHTCACHE_MAX_BODY_BYTES and WEIGHTCACHE_MAX_BATCH must be positive")
        if ":" not in self.handler:
            raise ConfigError(f"WEIGHTCACHE_HANDLER={self.handler!r}: expected module:factory")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        """Settings from ``WEIGHTCACHE_*`` variables; ``overrides`` (field names) win."""
        return cls.parse([], environ, **overrides)

    @classmethod
    def parse(
        cls, argv: Sequence[str], environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ServerSettings:
        """Settings from flags, then environment, then defaults (first wins). ``--help`` exits 0."""
        environ = os.environ if environ is None else environ
        args = build_arg_parser().parse_args(list(argv))
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = getattr(args, f.name)
            if raw is None:
                raw = environ.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _convert(f, raw)
        values.update(overrides)
        return cls(**values)


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    env = f.metadata["env"]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return parse_size(raw) if env == "WEIGHTCACHE_MAX_BODY_BYTES" else int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError as e:
        raise ConfigError(f"{env}={raw!r}: not a valid {kind}") from e
    return raw.upper() if env == "WEIGHTCACHE_LOG_LEVEL" else raw


def build_arg_parser() -> argparse.ArgumentParser:
    """The ``weightcache-server`` CLI; every flag mirrors one ``WEIGHTCACHE_*`` variable."""
    parser = argparse.ArgumentParser(
        prog="weightcache-server",
        description="Serve a model from the weightcache node cache: wait for it, load it, then answer "
        "/v1/predict. Every flag can also be set by its environment variable; flags win.",
    )
    for f in dataclasses.fields(ServerSettings):
        meta = f.metadata
        default = f.default
        parser.add_argument(
            meta["flag"],
            dest=f.name,
            default=None,
            choices=meta.get("choices"),
            metavar=None if meta.get("choices") else f.name.upper(),
            help=f"{meta['help']} [env {meta['env']}, default {default!s}]".replace("%", "%%"),
        )
    return parser
