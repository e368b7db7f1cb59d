"""Go durations ("10s", "1m30s", "500ms"), as Consul reads and prints them. One home
for the control plane's decoder and the agent's definition files."""

from __future__ import annotations

import math
import re
from typing import Any

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """A Go duration string or integer nanoseconds, in seconds.

    Raises ValueError for anything else, and for negative or infinite durations.
    """
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = value / 1e9
    elif isinstance(value, str):
        s = value.strip()
        if s in ("", "0"):
            return 0.0
        sign = -1.0 if s.startswith("-") else 1.0
        s = s.lstrip("+-")
        pos, total = 0, 0.0
        while pos < len(s):
            m = _PART.match(s, pos)
            if not m:
                raise ValueError(f"invalid duration {value!r}")
            total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        seconds = sign * total
    else:
        raise ValueError(f"invalid duration {value!r}")
    if seconds < 0 or math.isinf(seconds) or math.isnan(seconds):
        raise ValueError(f"duration {value!r} must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as Go prints a `time.Duration` ("10s", "1m30s", "500ms")."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms" if ms >= 1 else f"{seconds * 1e6:g}µs"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = ""
    if h:
        out += f"{int(h)}h"
    if h or m:
        out += f"{int(m)}m"
    return out + f"{s:g}s"
