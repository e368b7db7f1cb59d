"""JSON-lines logging on stderr, without the `logging` machinery.

One line per event: `{"ts": ..., "level": ..., "msg": ..., <fields>}`. Callers
pass fields as keyword arguments and the line is only built when the level is
enabled, so a disabled debug call costs one comparison.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class JsonLog:
    """A tiny structured logger; `level` is the lowest level written."""

    __slots__ = ("threshold", "stream", "base")

    def __init__(self, level: str = "info", stream: Any = None, **base: Any) -> None:
        self.threshold = LEVELS[level]
        self.stream = stream if stream is not None else sys.stderr
        self.base = base

    def set_level(self, level: str) -> None:
        self.threshold = LEVELS[level]

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def _write(self, level: str, msg: str, fields: dict[str, Any]) -> None:
        record = {"ts": round(time.time(), 3), "level": level, "msg": msg}
        record.update(self.base)
        record.update(fields)
        try:
            self.stream.write(json.dumps(record, default=str) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone (the agent died): logging must never take traffic down

    def debug(self, msg: str, **fields: Any) -> None:
        if self.threshold <= 10:
            self._write("debug", msg, fields)

    def info(self, msg: str, **fields: Any) -> None:
        if self.threshold <= 20:
            self._write("info", msg, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        if self.threshold <= 30:
            self._write("warning", msg, fields)

    def error(self, msg: str, **fields: Any) -> None:
        if self.threshold <= 40:
            self._write("error", msg, fields)


log = JsonLog()
