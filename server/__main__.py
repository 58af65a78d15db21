"""``weightcache-server`` / ``python -m server``: read the settings, start HTTP at once, cold-start behind it.

Exit codes: 0 after a clean shutdown (SIGTERM), 1 when the model can never be served (wait timeout, corrupt
weights, handler failure: Kubernetes restarts the pod), 2 for invalid settings. The fatal reason goes to stderr
as one plain line as well as to the log. Heavy imports (torch) happen after the settings are checked, and their
cost is reported as the ``import`` cold-start phase.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from common.logs import setup_logging
from server.config import ServerSettings
from server.errors import ConfigError, ServerError


def configure_logging(settings: ServerSettings) -> None:
    """Text, or JSON lines in the agent's format (:mod:`common.logs`), on stderr."""
    setup_logging(json_lines=settings.log_format == "json", level=settings.log_level,
                  text_format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def process_age_seconds() -> float | None:
    """Seconds since this process was created (so the import phase counts the interpreter's own start)."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            # Field 22 (starttime, clock ticks since boot) comes after the parenthesised command name.
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    try:
        settings = ServerSettings.parse(sys.argv[1:] if argv is None else argv)
        if settings.model:
            from server.waiting import resolve_model_path

            # Rejects a bad URI before anything starts.
            model_path = resolve_model_path(settings.root, settings.model)
        else:
            model_path = Path(settings.model_path)
    except ConfigError as e:
        print(f"weightcache-server: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings)
    log = logging.getLogger("server")
    if settings.readahead == "on":
        from server.readahead import start_readahead

        start_readahead(model_path)  # overlaps the disk with the imports below; see server/readahead.py

    import uvicorn

    from server.app import create_app  # imports torch: the expensive part of the import phase

    fatal: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(error: BaseException) -> None:
        fatal.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, import_seconds=process_age_seconds(), on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our logging setup (text or json) for uvicorn's loggers too
        access_log=False,  # probes every few seconds would drown the log; latency is in /metrics
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler that was installed before it
    # started; with the default handler the process would die "by signal" after a clean shutdown. A no-op handler
    # makes a requested stop exit 0.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    log.info("weightcache-server listening on %s:%d", settings.host, settings.port)
    server.run()
    if fatal:
        error = fatal[0]
        reason = error.reason if isinstance(error, ServerError) else type(error).__name__
        print(f"weightcache-server: fatal: {reason}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
