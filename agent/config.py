"""Every agent setting, typed, with its default and the reason for it — read from env and flags in this one place.

Each field's metadata names its environment variable (``env``), its CLI flag (``flag``) and a one-line help.
``dataclasses.fields(AgentSettings)`` is the single source for ``--help``, the README table and the manifests'
tests. Nothing else in the agent reads ``os.environ`` for its own settings (the AWS SDK reads its own chain).
Reading flags and the environment (precedence, types, sizes: ``500G`` = 500×10⁹, ``2GiB`` = 2×2³⁰) is
:mod:`common.settings`, shared with the server; the fields and their validation are here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from common import settings as common_settings
from common.settings import setting as _setting
from common.units import parse_size


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """The agent's configuration. Defaults suit a DaemonSet on a GPU node with local NVMe."""

    # RUF009 is a false positive here: `_setting()` (common.settings.setting) returns a `dataclasses.field()`
    # (a default_factory for mutable defaults), so no instance shares a default object; ruff cannot see through
    # the wrapper. It only reports fields whose annotation it does not know to be immutable (the `Path` ones).
    cache_dir: Path = _setting(Path("/var/lib/weightcache"), "WEIGHTCACHE_ROOT",  # noqa: RUF009
                               "cache root (a hostPath on local NVMe)", "--cache-dir")
    node_name: str = _setting("", "NODE_NAME", "this node's name (downward API spec.nodeName)", "--node-name")
    metrics_host: str = _setting("0.0.0.0", "WEIGHTCACHE_METRICS_HOST",
                                 "address of the read-only HTTP API (health, metrics, status)", "--metrics-host")
    metrics_port: int = _setting(9400, "WEIGHTCACHE_METRICS_PORT",
                                 "port of the read-only HTTP API; 0 disables it", "--metrics-port")
    policy_file: Path | None = _setting(None, "WEIGHTCACHE_POLICY_FILE",  # noqa: RUF009
                                        "policy/warm-set YAML (a mounted ConfigMap), re-read when it changes",
                                        "--policy-file")
    max_bytes: int = _setting(0, "WEIGHTCACHE_MAX_BYTES",
                              "cache budget in bytes (e.g. 500GiB); 0 = no budget, only the free-space floor",
                              "--max-bytes", parse=parse_size)
    min_free_bytes: int = _setting(1024**3, "WEIGHTCACHE_MIN_FREE_BYTES",
                                   "keep at least this much free on the cache filesystem (evict to stay above it)",
                                   "--min-free-bytes", parse=parse_size)
    concurrency: int = _setting(8, "WEIGHTCACHE_CONCURRENCY",
                                "ranged GETs in flight, across all files and models (one global limit)",
                                "--concurrency")
    min_part_size: int = _setting(8 * 1024**2, "WEIGHTCACHE_PART_SIZE",
                                  "smallest ranged-GET part; larger files get larger parts (≤ 64 MiB)",
                                  "--part-size", parse=parse_size)
    fsync: bool = _setting(True, "WEIGHTCACHE_FSYNC",
                           "flush published models to disk in the background and mark them durable "
                           "(unflushed ones are re-verified after a reboot)",
                           "--fsync")
    direct_io: bool = _setting(False, "WEIGHTCACHE_DIRECT_IO",
                               "write downloaded weights with O_DIRECT, past the page cache, where the filesystem "
                               "allows: less CPU per byte, but the loader then reads the model from disk "
                               "(for CPU-starved nodes and speculative warm sets)",
                               "--direct-io")
    connect_timeout: float = _setting(5.0, "WEIGHTCACHE_CONNECT_TIMEOUT",
                                      "seconds to open a connection to S3", "--connect-timeout")
    read_timeout: float = _setting(30.0, "WEIGHTCACHE_READ_TIMEOUT",
                                   "seconds without a byte from S3 before a part is retried", "--read-timeout")
    max_attempts: int = _setting(8, "WEIGHTCACHE_MAX_ATTEMPTS",
                                 "tries per S3 request for transient errors (throttling, 5xx, resets)",
                                 "--max-attempts")
    retry_base_delay: float = _setting(0.2, "WEIGHTCACHE_RETRY_BASE_DELAY",
                                       "first retry backoff in seconds (exponential, full jitter)",
                                       "--retry-base-delay")
    retry_max_delay: float = _setting(10.0, "WEIGHTCACHE_RETRY_MAX_DELAY",
                                      "cap on one retry backoff in seconds", "--retry-max-delay")
    s3_addressing_style: str = _setting("auto", "WEIGHTCACHE_S3_ADDRESSING_STYLE",
                                        "auto|path|virtual; auto = path when AWS_ENDPOINT_URL is set",
                                        "--s3-addressing-style")
    pods_file: Path | None = _setting(None, "WEIGHTCACHE_PODS_FILE",  # noqa: RUF009
                                      "read Pod manifests from this YAML file instead of the Kubernetes API",
                                      "--pods-file")
    node_labels: str = _setting("", "WEIGHTCACHE_NODE_LABELS",
                                "with --pods-file: this node's labels (k=v,k2=v2) for warm-set selectors",
                                "--node-labels")
    model_workers: int = _setting(4, "WEIGHTCACHE_MODEL_WORKERS",
                                  "models fetched at once (their parts share the one concurrency limit)",
                                  "--model-workers")
    watch_timeout_seconds: int = _setting(300, "WEIGHTCACHE_WATCH_TIMEOUT",
                                          "server-side timeout of one watch request (it is then resumed)",
                                          "--watch-timeout")
    inactivity_timeout_seconds: float = _setting(
        90.0, "WEIGHTCACHE_WATCH_INACTIVITY_TIMEOUT",
        "reconnect a watch silent this long (bookmarks come about every 60 s)", "--watch-inactivity-timeout")
    reconnect_max_delay: float = _setting(30.0, "WEIGHTCACHE_RECONNECT_MAX_DELAY",
                                          "cap on the watch reconnect backoff in seconds", "--reconnect-max-delay")
    file_poll_interval: float = _setting(1.0, "WEIGHTCACHE_FILE_POLL_INTERVAL",
                                         "how often the pods file and policy file are checked for changes",
                                         "--file-poll-interval")
    shutdown_grace_seconds: float = _setting(25.0, "WEIGHTCACHE_SHUTDOWN_GRACE_SECONDS",
                                             "on SIGTERM, wait this long for tasks (pod grace period is 30 s)",
                                             "--shutdown-grace")
    orphan_max_age_seconds: float = _setting(24 * 3600.0, "WEIGHTCACHE_ORPHAN_MAX_AGE",
                                             "partial downloads untouched this long are deleted at start-up",
                                             "--orphan-max-age")
    old_revision_grace_seconds: float = _setting(
        600.0, "WEIGHTCACHE_OLD_REVISION_GRACE",
        "keep a replaced revision this long for pods still opening it", "--old-revision-grace")
    control_socket: Path = _setting(Path("/run/weightcache/agent.sock"), "WEIGHTCACHE_CONTROL_SOCKET",  # noqa: RUF009
                                    "Unix socket for prefetch/evict: outside the cache root (pods mount the root; "
                                    "a read-only mount still lets a process connect to a socket in it)",
                                    "--control-socket")
    node_resync_seconds: float = _setting(
        30.0, "WEIGHTCACHE_NODE_RESYNC_SECONDS",
        "re-derive the node's model labels from the cache this often even unprompted (this agent's own fetches "
        "and evictions update them at once; this catches other processes, e.g. `weightcache-agent gc`)",
        "--node-resync-seconds")
    peer_token_file: Path | None = _setting(None, "WEIGHTCACHE_PEER_TOKEN_FILE",  # noqa: RUF009
                                            "the shared peer token (a mounted Secret); without it peer exchange "
                                            "is off", "--peer-token-file")
    peer_host: str = _setting("0.0.0.0", "WEIGHTCACHE_PEER_HOST", "address the peer port binds", "--peer-host")
    peer_port: int = _setting(9401, "WEIGHTCACHE_PEER_PORT", "port this agent serves peers on", "--peer-port")
    peers: str = _setting("", "WEIGHTCACHE_PEERS",
                          "static peers, host:port,host:port (outside Kubernetes); else the agent's own pods",
                          "--peers")
    peer_address: str = _setting("", "WEIGHTCACHE_PEER_ADDRESS",
                                 "this agent's own host:port as peers see it (default POD_IP:peer port): it is "
                                 "dropped from the peer list", "--peer-address")
    peer_selector: str = _setting("app.kubernetes.io/name=weightcache-agent", "WEIGHTCACHE_PEER_SELECTOR",
                                  "label selector of the agent's pods in its namespace (peer discovery)",
                                  "--peer-selector")
    pod_namespace: str = _setting("", "POD_NAMESPACE", "the agent's namespace (downward API)", "--pod-namespace")
    pod_ip: str = _setting("", "POD_IP", "the agent pod's IP (downward API)", "--pod-ip")
    peer_timeout: float = _setting(5.0, "WEIGHTCACHE_PEER_TIMEOUT",
                                   "a peer silent this long (connect or read) is dropped for the file",
                                   "--peer-timeout")
    peer_wait_seconds: float = _setting(
        20.0, "WEIGHTCACHE_PEER_WAIT",
        "wait at most this long for a chunk another agent is fetching from S3, then fetch it from S3",
        "--peer-wait")
    log_format: str = _setting("auto", "WEIGHTCACHE_LOG_FORMAT", "json|text|auto (json unless a terminal)",
                               "--log-format")
    log_level: str = _setting("INFO", "WEIGHTCACHE_LOG_LEVEL", "DEBUG|INFO|WARNING|ERROR", "--log-level")

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be ≥ 1, got {self.concurrency}")
        if self.min_part_size < 1024 * 1024:
            raise ConfigError(f"part size must be ≥ 1 MiB, got {self.min_part_size}")
        if self.max_attempts < 1:
            raise ConfigError(f"max attempts must be ≥ 1, got {self.max_attempts}")
        if self.s3_addressing_style not in ("auto", "path", "virtual"):
            raise ConfigError(f"s3 addressing style must be auto|path|virtual, got {self.s3_addressing_style!r}")
        if self.log_format not in ("auto", "json", "text"):
            raise ConfigError(f"log format must be auto|json|text, got {self.log_format!r}")
        if self.max_bytes < 0 or self.min_free_bytes < 0:
            raise ConfigError("byte budgets must be ≥ 0")
        if not 0 < self.peer_port < 65536:
            raise ConfigError(f"peer port must be 1-65535, got {self.peer_port}")
        if self.peer_timeout <= 0 or self.peer_wait_seconds < 0:
            raise ConfigError("peer timeout must be > 0 s and peer wait ≥ 0 s")
        if self.node_resync_seconds <= 0:
            raise ConfigError(f"node resync interval must be > 0 s, got {self.node_resync_seconds}")
        if Path(os.path.abspath(self.control_socket)).is_relative_to(os.path.abspath(self.cache_dir)):
            raise ConfigError(f"the control socket {self.control_socket} must live outside the cache root "
                              f"{self.cache_dir}: inference pods mount the root, and a read-only mount does not "
                              "stop a process from connecting to a socket")



def add_arguments(parser: argparse.ArgumentParser, *, only: set[str] | None = None) -> None:
    """Add a flag for each setting (or those in ``only``); defaults stay None so the env can fill them."""
    common_settings.add_arguments(parser, AgentSettings, only=only)


def load_settings(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None,
                  **overrides: Any) -> AgentSettings:
    """Build settings: explicit overrides, then flags, then environment, then defaults."""
    try:
        values = common_settings.read_values(AgentSettings, args=args, env=os.environ if env is None else env,
                                             overrides=overrides)
    except common_settings.SettingError as e:
        raise ConfigError(str(e)) from e
    return AgentSettings(**values)
