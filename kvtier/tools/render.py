"""Plain-text rendering for the tools: byte sizes, times, durations and aligned tables."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def human_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``; negative sizes keep their sign."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{sign}{int(value)} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_time(t: float) -> str:
    """A Unix time as ``YYYY-MM-DD HH:MM:SSZ`` (UTC); ``-`` for 0 (never)."""
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def parse_duration(text: str) -> float:
    """Seconds from ``"90s"``, ``"15m"``, ``"12h"``, ``"30d"`` or ``"2w"`` (bare numbers are
    seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise ValueError(f"expected a duration such as 30d, 12h or 90s, got {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "-"


def percent(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[int] = ()
          ) -> str:
    """An aligned text table; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json(data: Any, out: TextIO | None = None) -> None:
    """``data`` as indented JSON (bytes, e.g. in engine-owned session data, as hex)."""
    out = out or sys.stdout
    json.dump(data, out, indent=2, default=_json_default)
    out.write("\n")
