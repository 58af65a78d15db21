"""Byte sizes as people type them, with one meaning everywhere (agent and server settings, CLIs, benchmarks).

- ``K``, ``M``, ``G``, ``T``, ``P`` and ``KB`` … ``PB`` are powers of 10 (``500G`` = 500 × 10⁹ bytes, as S3 and
  disk vendors count);
- ``Ki``, ``Mi``, ``Gi``, ``Ti``, ``Pi`` and ``KiB`` … ``PiB`` are powers of 2 (``2GiB`` = 2 × 2³⁰, what
  ``ls -h`` shows);
- a plain number (or one ending in ``B``) is bytes; decimals are allowed (``1.5GiB``), rounded down to a byte;
- units are case-insensitive (``100gb`` = ``100GB``); blanks around the number and the unit are ignored.

Anything else raises :class:`SizeError` (a ``ValueError``); each side's settings loader turns it into its own
``ConfigError`` naming the setting. Sizes are printed (``format_size``) in binary units.
"""

from __future__ import annotations

import re
from fractions import Fraction

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
#: unit (lower case) → bytes: "" and "b" are bytes, "g"/"gb" decimal, "gi"/"gib" binary, and so on.
_MULTIPLIERS = {"": 1, "b": 1} | {
    unit: base**power
    for prefix, power in _POWERS.items()
    for base, units in ((1000, (prefix, prefix + "b")), (1024, (prefix + "i", prefix + "ib")))
    for unit in units
}
EXAMPLES = "1048576, 500MiB, 2GiB, 1.5GiB, 100GB, 500G; K/M/G/T are powers of 10, Ki/Mi/Gi/Ti powers of 2"


class SizeError(ValueError):
    """A text that is not a byte size."""


def parse_size(text: str | int) -> int:
    """Bytes from ``"2GiB"`` (2147483648), ``"500MB"`` / ``"500M"`` (500000000), ``"1048576"``; ints pass through."""
    if isinstance(text, bool):
        raise SizeError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"not a size: {text!r} (sizes are ≥ 0)")
        return text
    m = _SIZE_RE.match(text)
    unit = (m.group(2) if m else "").lower()
    if not m or unit not in _MULTIPLIERS:
        raise SizeError(f"not a size: {text!r} (examples: {EXAMPLES})")
    return int(Fraction(m.group(1)) * _MULTIPLIERS[unit])  # exact: no float rounding of large sizes


def format_size(n: float) -> str:
    """Human-readable binary size for logs and tables: ``512 B``, ``1.00 MiB``, ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


__all__ = ["EXAMPLES", "SizeError", "format_size", "parse_size"]
