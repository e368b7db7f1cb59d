"""Access logs: one JSON line per request, to a local file that rotates by size.

Lines are buffered and written at most `flush_interval_s` after they were
made (and on close), so a busy sidecar writes in large chunks rather than one
system call per request. When the file would pass `max_bytes` it is renamed
`<path>.1` (older ones shift to `.2`, ... and the one past `keep` is deleted)
and a new file is started, as logrotate's `copytruncate`-free scheme does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

from agents.proxy.logs import log
from agents.proxy.observe import RequestRecord

_quote = json.encoder.encode_basestring  # C: a JSON string literal, quotes included
_second = [-1, ""]  # the last whole second formatted, and its text


def _time(started: float) -> str:
    """RFC 3339 UTC with milliseconds; the seconds part formatted once per second."""
    whole = int(started)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((started - whole) * 1000):03d}Z"


def access_line(r: RequestRecord, trace_id: str) -> bytes:
    """One access-log line (fields documented in docs/observability.md), JSON.

    Formatted directly rather than through a dict and `json.dumps`: this runs
    for every request. Every string a caller or app can influence goes
    through the JSON encoder's own string quoting."""
    q = _quote
    return (
        f'{{"time":"{_time(r.started)}","trace_id":"{trace_id}","request_id":{q(r.request_id)},'
        f'"reporter":{q(r.reporter)},"source":{q(r.source_service)},'
        f'"destination":{q(r.destination_service)},"route":{q(r.route)},"method":{q(r.method)},'
        f'"path":{q(r.path)},"authority":{q(r.authority)},"protocol":{q(r.protocol)},'
        f'"status":{int(r.status)},"grpc_status":{q(r.grpc_status)},'
        f'"response_flags":{q(r.response_flags)},"duration_ms":{round(r.duration_s * 1000.0, 3)!r},'
        f'"bytes_received":{int(r.request_bytes)},"bytes_sent":{int(r.response_bytes)},'
        f'"cluster":{q(r.cluster)},"upstream":{q(r.upstream)},"retries":{int(r.retries)}}}\n'
    ).encode()


class AccessLog:
    """A rotating JSON-lines file (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 50 * 1024 * 1024,
        keep: int = 5,
        flush_interval_s: float = 0.5,
    ) -> None:
        if max_bytes < 1024:
            raise ValueError("access log max bytes must be at least 1024")
        if keep < 1:
            raise ValueError("access log keep must be at least 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.flush_interval_s = flush_interval_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._open()
        self._size = self._file.tell()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self.lines = 0
        self.rotations = 0

    def write(self, entry: dict) -> None:
        """Append one line made of `entry` (a dict)."""
        self.write_line(json.dumps(entry, separators=(",", ":")).encode() + b"\n")

    def write_line(self, line: bytes) -> None:
        """Append one line (bytes, newline included)."""
        self._pending.append(line)
        self._pending_bytes += len(line)
        self.lines += 1
        if self._pending_bytes >= 64 * 1024:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.flush_interval_s, self.flush)

    def flush(self) -> None:
        """Write the buffered lines, rotating whenever the file would grow past `max_bytes`."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        try:
            chunk: list[bytes] = []
            size = self._size
            for line in pending:
                if size + len(line) > self.max_bytes and size > 0:
                    self._file.write(b"".join(chunk))
                    chunk = []
                    self._rotate()
                    size = 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self._file.write(b"".join(chunk))
            self._file.flush()
            self._size = size
        except OSError as exc:  # a full disk must not stop the proxy
            log.error("cannot write the access log", path=str(self.path), error=str(exc))

    def _rotate(self) -> None:
        self._file.close()
        oldest = self.path.with_name(f"{self.path.name}.{self.keep}")
        with contextlib.suppress(FileNotFoundError):
            oldest.unlink()
        for i in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = self._open()
        self.rotations += 1

    def _open(self):
        # 0600 whatever the umask the sidecar inherited: paths and ids are the
        # operator's business.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "ab")

    def close(self) -> None:
        self.flush()
        self._file.close()
