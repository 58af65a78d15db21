"""The agent's logging: JSON lines for the daemon (``auto``: JSON unless stderr is a terminal), text on a terminal.

The formatter and the set-up are :mod:`common.logs` (shared with the server); this module only decides the agent's
choices. Never logs a credential: the AWS SDK's own loggers stay at WARNING, and nothing formats request headers.
"""

from __future__ import annotations

import sys

from common import logs

_QUIET = ("botocore", "urllib3", "kubernetes", "asyncio", "aiohttp.access")


def setup_logging(*, fmt: str = "auto", level: str = "INFO") -> None:
    """Configure the root logger once (idempotent)."""
    logs.setup_logging(json_lines=fmt == "json" or (fmt == "auto" and not sys.stderr.isatty()), level=level,
                       text_format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S",
                       quiet=_QUIET)
