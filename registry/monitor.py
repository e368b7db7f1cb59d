"""`/v1/agent/monitor`: the server's log lines, streamed to whoever asks.

A logging handler on the root logger hands every record to the streams that
are open, each with its own minimum level (`?loglevel=`, Consul's names:
trace, debug, info, warn, error). A stream's queue is bounded: a reader too
slow to keep up loses lines (counted, and said in the stream) rather than
holding the server's memory. The handler is installed with the first stream;
records below the server's own level (`MESH_LOG_LEVEL`) are never made, so
`?loglevel=debug` shows debug lines only when the server logs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time

LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "err": logging.ERROR,
    "error": logging.ERROR,
}
QUEUE_LINES = 1000


class Stream:
    """One open monitor: lines at or above `level`, as text or JSON."""

    def __init__(self, level: int, as_json: bool) -> None:
        self.level = level
        self.as_json = as_json
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_LINES)
        self.dropped = 0

    def offer(self, line: str) -> None:  # on the loop's thread
        try:
            self.queue.put_nowait(line)
        except asyncio.QueueFull:
            self.dropped += 1


class _Fanout(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.streams: set[Stream] = set()
        self._lock = threading.Lock()
        self.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            streams = [s for s in self.streams if record.levelno >= s.level]
        if not streams:
            return
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad record must not break logging
            return
        as_json = json.dumps(
            {
                "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                "@level": record.levelname.lower(),
                "@module": record.name,
                "@message": record.getMessage(),
            }
        )
        for s in streams:
            line = as_json if s.as_json else text
            with contextlib.suppress(RuntimeError):  # its loop has closed
                s.loop.call_soon_threadsafe(s.offer, line)

    def add(self, stream: Stream) -> None:
        with self._lock:
            self.streams.add(stream)

    def remove(self, stream: Stream) -> None:
        with self._lock:
            self.streams.discard(stream)


_fanout: _Fanout | None = None
_install = threading.Lock()


def open_stream(level_name: str, as_json: bool) -> Stream:
    """A new stream; `ValueError` for an unknown level name."""
    global _fanout
    level = LEVELS.get(level_name.strip().lower() or "info")
    if level is None:
        raise ValueError(f"Unknown log level: {level_name}")
    with _install:
        if _fanout is None:
            _fanout = _Fanout()
            logging.getLogger().addHandler(_fanout)
    stream = Stream(level, as_json)
    _fanout.add(stream)
    return stream


def close_stream(stream: Stream) -> None:
    if _fanout is not None:
        _fanout.remove(stream)
