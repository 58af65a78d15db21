"""Progress for the one-shot CLI: a redrawn bar on a terminal, a plain log line every few seconds otherwise."""

from __future__ import annotations

import logging
import sys
import time

from common.units import format_size

log = logging.getLogger("agent.transfer.progress")


class Progress:
    """Counts bytes for a set of models and shows rate and percent; ``total`` may grow as listings arrive."""

    def __init__(self, *, total: int = 0, interval: float = 5.0, tty: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0
        self._interval = interval
        self._tty = sys.stderr.isatty() if tty is None else tty

    def add_total(self, n: int) -> None:
        self.total += n

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= (0.1 if self._tty else self._interval):
            self._last = now
            self._show(final=False)

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        pct = f"{100 * self.done / self.total:5.1f}%" if self.total else "     "
        return f"{pct} {format_size(self.done)} / {format_size(self.total)}  {format_size(rate)}/s  {elapsed:.1f}s"

    def _show(self, *, final: bool) -> None:
        if self._tty:
            width = 30
            frac = min(self.done / self.total, 1.0) if self.total else 0.0
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            sys.stderr.write(f"\r[{bar}] {self._line()}" + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            log.info("progress: %s", self._line())

    def finish(self) -> None:
        self._show(final=True)
