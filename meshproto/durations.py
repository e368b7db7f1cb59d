"""Go durations ("10s", "1m30s", "500ms"), as Consul reads and prints them.

The one duration parser of the code base: the registration decoder, the
agent's definition files and flags, config entries, sessions, ACL tokens and
the CA all call it. A duration is held exactly as integer nanoseconds and is
bounded as Go's `time.Duration` is (a signed 64-bit count of nanoseconds, about
292 years), so "1000000000h" or 1e30 is refused instead of overflowing later.
"""

from __future__ import annotations

import math
import re
from typing import Any

MAX_NS = 2**63 - 1  # Go's time.Duration is an int64 of nanoseconds
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


class DurationError(ValueError):
    """Not a Go duration, or one Go could not hold; the message says which."""


def parse_ns(value: Any, *, allow_negative: bool = False) -> int:
    """A Go duration string or a number of nanoseconds, as integer nanoseconds.

    "" and None are 0. Raises DurationError for anything else, for a value
    outside Go's int64 range, for NaN/Infinity and (unless allowed) for a
    negative duration.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise DurationError(f"invalid duration {value!r}")
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise DurationError(f"invalid duration {value!r}")
        exact: float | int = value
    elif isinstance(value, int):
        exact = value
    elif isinstance(value, str):
        exact = _parse_text(value)
    else:
        raise DurationError(f"invalid duration {value!r}")
    if abs(exact) > MAX_NS:
        raise DurationError(f"duration {value!r} is out of range (at most {format_ns(MAX_NS)})")
    ns = int(round(exact))
    if ns < 0 and not allow_negative:
        raise DurationError(f"duration {value!r} must not be negative")
    return ns


def _parse_text(text: str) -> float | int:
    s = text.strip()
    if s in ("", "0", "+0", "-0"):
        return 0
    sign = -1 if s.startswith("-") else 1
    s = s[1:] if s[:1] in "+-" else s
    if not s:
        raise DurationError(f"invalid duration {text!r}")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m:
            raise DurationError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    return sign * total


def parse_duration(value: Any) -> float:
    """A Go duration string or integer nanoseconds, in seconds (never negative)."""
    return parse_ns(value) / 1e9


def seconds(value: Any) -> float:
    """A stored duration in seconds: a Go string as `parse_duration` reads it, or a
    plain number, which rows written before durations were kept as Go strings hold
    in seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return parse_duration(value) if value else 0.0


def format_ns(ns: int) -> str:
    """Nanoseconds as Go prints a `time.Duration` ("15s", "1m30s", "1h0m0s", "250ms")."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 10**9:
        for unit, size in (("ms", 10**6), ("µs", 10**3), ("ns", 1)):
            if ns >= size:
                return f"{sign}{_trim(ns / size)}{unit}"
    h, rest = divmod(ns, 3600 * 10**9)
    m, rest = divmod(rest, 60 * 10**9)
    out = sign
    if h:
        out += f"{h}h"
    if h or m:
        out += f"{m}m"
    return out + f"{_trim(rest / 10**9)}s"


def _trim(x: float) -> str:
    text = f"{x:.9f}".rstrip("0").rstrip(".")
    return text or "0"


def format_duration(secs: float) -> str:
    """Seconds as Go prints a `time.Duration` ("10s", "1m30s", "500ms")."""
    return format_ns(int(round(secs * 1e9)))


def canonical(value: Any) -> str:
    """Any accepted spelling of a duration as the Go string it stands for ("10s")."""
    return format_ns(parse_ns(value))
