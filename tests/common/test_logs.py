"""common/logs.py: one JSON line format for the agent and the server."""

from __future__ import annotations

import json
import logging

from common.logs import JsonFormatter


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("agent.events", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_a_json_line_has_time_level_logger_message_and_the_extra_fields() -> None:
    line = JsonFormatter().format(_record("pod %s ready", "ns/p", event="WeightsReady", count=2, path=object()))
    entry = json.loads(line)
    assert entry["ts"].endswith("+00:00") and "T" in entry["ts"]
    assert (entry["level"], entry["logger"], entry["msg"]) == ("warning", "agent.events", "pod ns/p ready")
    assert entry["event"] == "WeightsReady" and entry["count"] == 2 and isinstance(entry["path"], str)


def test_uvicorns_coloured_copy_of_the_message_is_left_out() -> None:
    entry = json.loads(JsonFormatter().format(_record("started", color_message="\x1b[1mstarted\x1b[0m")))
    assert "color_message" not in entry


def test_a_traceback_goes_in_exc() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = logging.LogRecord("server", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert "RuntimeError: boom" in entry["exc"]
