"""Log set-up shared by the agent and the server: JSON lines (one object per line, for log pipelines) or text.

A JSON line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level`` (lower case), ``logger``, ``msg``, every
``extra={...}`` field the call passed (scalars as they are, anything else as its ``str``), and ``exc`` with the
traceback when there is one. Never logs a credential: nothing here formats request headers, and each side keeps
chatty libraries (the AWS SDK, the Kubernetes client) at WARNING.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

#: Attributes every LogRecord has: not "extra" fields. uvicorn's ``color_message`` repeats ``msg`` with ANSI codes.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, str | int | float | bool | None] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(*, json_lines: bool, level: str, text_format: str, datefmt: str | None = None,
                  quiet: Iterable[str] = ()) -> None:
    """Send the root logger to stderr, as JSON lines or as ``text_format``; loggers in ``quiet`` at WARNING.

    Idempotent: the root logger's handlers are replaced, never added to.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(text_format, datefmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


__all__ = ["JsonFormatter", "setup_logging"]
