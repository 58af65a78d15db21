"""Every setting of the inference server, typed, read from the environment and flags in this one place.

``ServerSettings`` is a frozen dataclass: each field has a default, its environment variable, a CLI flag and a
one-line reason in ``metadata``, so ``--help`` and the README's settings table are generated from the same
source. Nothing else in ``server/`` reads ``os.environ``. Reading flags and the environment (precedence, types,
sizes: ``8M`` = 8×10⁶, ``8MiB`` = 8×2²⁰) is :mod:`common.settings`, shared with the agent.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import settings as common_settings
from common.settings import setting
from common.units import parse_size
from server.errors import ConfigError

#: ``--help`` suffix of each flag (the server's wording, unchanged).
_HELP_SUFFIX = "[env {env}, default {default!s}]"


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The server's configuration. Build it with :meth:`from_env` or :meth:`parse`, never field by field."""

    # RUF009 is a false positive for the `Path` fields: `setting()` returns a `dataclasses.field()`.
    model: str = setting("", "WEIGHTCACHE_MODEL",
                         "model URI (s3://bucket/prefix/ or s3://bucket/key), resolved under the cache root",
                         "--model")
    model_path: str = setting("", "WEIGHTCACHE_MODEL_PATH",
                              "explicit model directory or file; used instead of WEIGHTCACHE_MODEL (no agent needed)",
                              "--model-path")
    root: Path = setting(Path("/var/lib/weightcache"), "WEIGHTCACHE_ROOT",  # noqa: RUF009
                         "node cache root, mounted read-only from the host", "--cache-dir")
    host: str = setting("0.0.0.0", "WEIGHTCACHE_HOST",
                        "address to listen on (all interfaces: the kubelet probes the pod IP)", "--host")
    port: int = setting(8000, "WEIGHTCACHE_PORT", "HTTP port", "--port")
    wait_timeout_seconds: float = setting(
        900.0, "WEIGHTCACHE_WAIT_TIMEOUT_SECONDS",
        "give up (exit non-zero, the pod restarts) if the model is not ready by then; 900 s fits a 70 GB "
        "model at ~100 MB/s",
        "--wait-timeout")
    device: str = setting("auto", "WEIGHTCACHE_DEVICE", "where weights live: auto = cuda when available, else cpu",
                          "--device", choices=("auto", "cpu", "cuda"))
    handler: str = setting("server.handlers.demo:create_handler", "WEIGHTCACHE_HANDLER",
                           "model code as module:factory", "--handler")
    fallback: str = setting(
        "none", "WEIGHTCACHE_FALLBACK",
        "fetch = download the model ourselves if the node agent has not published it within the grace",
        "--fallback", choices=("none", "fetch"))
    fallback_dir: Path = setting(Path("/tmp/weightcache-fallback"), "WEIGHTCACHE_FALLBACK_DIR",  # noqa: RUF009
                                 "writable cache dir for the fallback fetch (mount an emptyDir or a volume here)",
                                 "--fallback-dir")
    fallback_grace_seconds: float = setting(
        30.0, "WEIGHTCACHE_FALLBACK_GRACE_SECONDS",
        "how long to wait for the node agent before fetching ourselves; the agent usually starts within "
        "seconds of the pod",
        "--fallback-grace")
    verify: str = setting(
        "size", "WEIGHTCACHE_VERIFY",
        "check loaded files against the cache manifest: size (free), digest (xxh3-128, reads every byte "
        "once more), none",
        "--verify", choices=("size", "digest", "none"))
    load_strategy: str = setting("auto", "WEIGHTCACHE_LOAD_STRATEGY",
                                 "auto = zero-copy mmap on cpu, pinned-buffer pipeline on cuda",
                                 "--load-strategy", choices=("auto", "mmap", "pipelined"))
    readahead: str = setting(
        "on", "WEIGHTCACHE_READAHEAD",
        "if the model is already cached at start, read it into the page cache while torch imports",
        "--readahead", choices=("on", "off"))
    max_body_bytes: int = setting(8 * 1024 * 1024, "WEIGHTCACHE_MAX_BODY_BYTES",
                                  "largest request body accepted (413 above)", "--max-body-bytes", parse=parse_size)
    max_batch: int = setting(256, "WEIGHTCACHE_MAX_BATCH", "most rows in one /v1/predict request (422 above)",
                             "--max-batch")
    poll_interval_seconds: float = setting(
        1.0, "WEIGHTCACHE_POLL_INTERVAL_SECONDS",
        "safety re-check while waiting; inotify wakes us sooner (floor 0.1 s: never busy-poll)",
        "--poll-interval")
    log_format: str = setting("text", "WEIGHTCACHE_LOG_FORMAT", "text or json (one object a line)", "--log-format",
                              choices=("text", "json"))
    log_level: str = setting("INFO", "WEIGHTCACHE_LOG_LEVEL", "logging level", "--log-level",
                             choices=("DEBUG", "INFO", "WARNING", "ERROR"), parse=str.upper)

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
        args = build_arg_parser().parse_args(list(argv))
        try:
            values = common_settings.read_values(cls, args=args, env=os.environ if environ is None else environ,
                                                 overrides=overrides)
        except common_settings.SettingError as e:
            raise ConfigError(str(e)) from e
        return cls(**values)


def build_arg_parser() -> argparse.ArgumentParser:
    """The ``weightcache-server`` CLI; every flag mirrors one ``WEIGHTCACHE_*`` variable."""
    parser = argparse.ArgumentParser(
        prog="weightcache-server",
        description="Serve a model from the weightcache node cache: wait for it, load it, then answer "
        "/v1/predict. Every flag can also be set by its environment variable; flags win.",
    )
    common_settings.add_arguments(parser, ServerSettings, help_suffix=_HELP_SUFFIX)
    return parser
