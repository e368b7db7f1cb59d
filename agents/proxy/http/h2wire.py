"""HTTP/2 (and so gRPC) on the wire, over the `h2` state machine: the server
side (callers: an app speaking h2c with prior knowledge, or a peer sidecar
that negotiated ALPN `h2`) and the client side (one multiplexed connection
per upstream endpoint).

Each stream is a request: its body is read whole (gRPC unary and
server-streaming requests are one message), then it goes through the same
engine as HTTP/1.1; the response streams back (headers, data, trailers).

Flood patterns are bounded: at most `MAX_STREAMS` concurrent streams per
connection (excess streams are refused), and a connection whose peer resets
streams (rapid reset, CVE-2023-44487), sends SETTINGS or PINGs faster than
`FLOOD_PER_S` a second is closed with GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
from hpack.table import HeaderTable

from agents.proxy.http.wire import (
    HIGH_WATER,
    LOW_WATER,
    MAX_BODY,
    REASONS,
    Handler,
    Headers,
    Request,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAMS = 128
WINDOW = 1 << 20  # per-stream receive window we announce
FLOOD_PER_S = 200  # resets / settings / pings a second before we call it a flood
# Connection-specific headers are forbidden in HTTP/2 (RFC 9113 §8.2.2).
H2_FORBIDDEN = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
     b"host", b"content-length", b"expect"}
)  # fmt: skip
# Request headers whose value is new on every request: sent without adding
# them to the HPACK table, where each would evict the fields that repeat
# (and lengthen every table search) for no later gain.
UNIQUE = frozenset({b"x-request-id", b"traceparent", b"tracestate"})


def _config(client: bool) -> h2.config.H2Configuration:
    # Outbound header blocks are built here from headers h2 or the HTTP/1.1
    # parser already validated on the way in (names lower-case, no
    # connection-specific fields: H2_FORBIDDEN is dropped, pseudo-headers
    # first), so h2's second pass over them is skipped; `_Encoder` keeps
    # credentials out of the HPACK table as h2's normalising did. Inbound
    # validation stays in full.
    return h2.config.H2Configuration(
        client_side=client,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


_STATIC_EXACT: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_EXACT.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)


_SECRET = frozenset({b"authorization", b"proxy-authorization"})


def _int(i: int, bits: int, flags: int) -> bytes:
    top = (1 << bits) - 1
    if i < top:
        return bytes((flags | i,))
    out = [flags | top]
    i -= top
    while i >= 128:
        out.append((i & 0x7F) | 0x80)
        i >>= 7
    out.append(i)
    return bytes(out)


def _str(s: bytes) -> bytes:
    n = len(s)
    return (bytes((n,)) if n < 127 else _int(n, 7, 0)) + s


class _Encoder(hpack.Encoder):
    """HPACK encoder: dict look-ups instead of hpack's table scans, literals
    without Huffman coding (pure-Python Huffman coding and decoding was about
    a tenth of a sidecar's CPU per request, for blocks a quarter larger)."""

    def __init__(self) -> None:
        super().__init__()
        self._max = 4096
        self._size = 0
        self._entries: deque[tuple[bytes, bytes, int, int]] = deque()
        self._count = 0  # insertions so far; entry k has index 62 + count - k
        self._exact: dict[tuple[bytes, bytes], int] = {}
        self._names: dict[bytes, int] = {}
        self._updates: list[int] = []

    @property  # type: ignore[override]
    def header_table_size(self) -> int:
        return self._max

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        if value != self._max:
            self._max = value
            self._shrink(0)
            self._updates.append(value)

    def _shrink(self, room: int) -> None:
        while self._entries and self._size + room > self._max:
            n, v, k, size = self._entries.popleft()
            self._size -= size
            if self._exact.get((n, v)) == k:
                del self._exact[(n, v)]
            if self._names.get(n) == k:
                del self._names[n]

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        out: list[bytes] = []
        if self._updates:
            out.extend(_int(v, 5, 0x20) for v in self._updates)
            self._updates = []
        for h in headers:
            n, v = h[0], h[1]
            if isinstance(n, str):
                n = n.encode("utf-8")
            if isinstance(v, str):
                v = v.encode("utf-8")
            never = (not h.indexable) if isinstance(h, hpack.HeaderTuple) else len(h) > 2 and h[2]
            if n in _SECRET or (n == b"cookie" and len(v) < 20):
                never = True  # as h2 does: a short cookie is guessable from the table
            if not never:
                idx = _STATIC_EXACT.get((n, v))
                if idx is None:
                    k = self._exact.get((n, v))
                    if k is not None:
                        idx = 62 + self._count - k
                if idx is not None:
                    out.append(_int(idx, 7, 0x80))
                    continue
            nidx = _STATIC_NAME.get(n)
            if nidx is None:
                k = self._names.get(n)
                if k is not None:
                    nidx = 62 + self._count - k
            bits, flags = (4, 0x10) if never else (6, 0x40)
            out.append(_int(nidx, bits, flags) if nidx is not None else bytes((flags,)) + _str(n))
            out.append(_str(v))
            if not never:
                size = len(n) + len(v) + 32
                if size > self._max:
                    self._shrink(self._max + 1)  # empties the table
                    continue
                self._shrink(size)
                self._count += 1
                self._entries.append((n, v, self._count, size))
                self._size += size
                self._exact[(n, v)] = self._count
                self._names[n] = self._count
        return b"".join(out)


def _connection(client: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(_config(client))
    conn.encoder = _Encoder()
    return conn


class _Flood:
    __slots__ = ("count", "second")

    def __init__(self) -> None:
        self.count = 0
        self.second = 0

    def hit(self) -> bool:
        now = int(time.monotonic())
        if now != self.second:
            self.second, self.count = now, 0
        self.count += 1
        return self.count > FLOOD_PER_S


class _Out:
    """What waits to be sent on one stream (flow control)."""

    __slots__ = ("chunks", "size", "end", "trailers")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.end = False
        self.trailers: Headers | None = None


class H2Base(asyncio.Protocol):
    def __init__(self, client: bool) -> None:
        self.h2 = _connection(client)
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._out: dict[int, _Out] = {}
        self._flood = _Flood()
        self._flush_due = False
        self._dirty: dict[int, None] = {}  # streams with body queued since the last flush

    def flush(self) -> None:
        """Send what h2 has queued, once per event-loop tick: every stream
        served or started in this tick shares one write (one TLS record, one
        syscall) instead of one per HEADERS / DATA frame, and a body whose end
        arrives in the same tick goes out as DATA with END_STREAM rather than
        DATA then an empty DATA (one frame less to encode, send and parse)."""
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_due = False
        if self._dirty:
            dirty, self._dirty = self._dirty, {}
            for sid in dirty:
                self._pump(sid)
        data = self.h2.data_to_send()
        t = self.transport
        if data and t is not None and not self.lost and not t.is_closing():
            t.write(data)

    def send_data(self, sid: int, data: bytes, end: bool = False,
                  trailers: Headers | None = None) -> None:  # fmt: skip
        out = self._out.get(sid)
        if out is None:
            out = self._out[sid] = _Out()
        if data:
            out.chunks.append(data)
            out.size += len(data)
        out.end = out.end or end
        if trailers is not None:
            out.trailers = trailers
            out.end = True
        self._dirty[sid] = None
        self.flush()

    def _pump(self, sid: int) -> None:
        out = self._out.get(sid)
        if out is None:
            return
        try:
            while out.chunks:
                window = min(
                    self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size
                )
                if window <= 0:
                    break
                chunk = out.chunks[0]
                if len(chunk) > window:
                    out.chunks[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    out.chunks.pop(0)
                out.size -= len(chunk)
                last = out.end and not out.chunks and out.trailers is None
                self.h2.send_data(sid, chunk, end_stream=last)
            if not out.chunks and out.end:
                if out.trailers is not None:
                    self.h2.send_headers(sid, out.trailers, end_stream=True)
                elif not self._ended(sid):
                    self.h2.send_data(sid, b"", end_stream=True)
                del self._out[sid]
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self._out.pop(sid, None)
        self._written(sid, out)

    def _ended(self, sid: int) -> bool:
        try:
            return self.h2._get_stream_by_id(sid).state_machine.state.name in (
                "HALF_CLOSED_LOCAL", "CLOSED")  # fmt: skip
        except Exception:
            return True

    def _written(self, sid: int, out: _Out) -> None:
        """Hook: bytes of `sid` left the queue."""

    def _window_updated(self, sid: int) -> None:
        if sid == 0:
            for s in list(self._out):
                self._pump(s)
        else:
            self._pump(sid)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]

    def calm_down(self) -> None:
        """A flood: GOAWAY ENHANCE_YOUR_CALM and close."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.flush_now()
        if self.transport is not None:
            self.transport.close()


class H2Stream:
    """One request stream of an `H2Server`, as the engine sees a caller."""

    __slots__ = ("conn", "sid", "headers", "body", "blen", "lost", "paused_writing",
                 "on_writable", "task", "answered")  # fmt: skip

    def __init__(self, conn: H2Server, sid: int, headers: Headers) -> None:
        self.conn = conn
        self.sid = sid
        self.headers = headers
        self.body: list[bytes] = []
        self.blen = 0
        self.lost = False
        self.paused_writing = False
        self.on_writable: Callable[[bool], None] | None = None
        self.task: asyncio.Task | None = None
        self.answered = False

    # The engine's view of a caller connection.
    @property
    def direction(self) -> str:
        return self.conn.direction

    @property
    def peer(self) -> tuple[str, int] | None:
        return self.conn.peer

    @property
    def tag(self) -> Any:
        return self.conn.tag

    @tag.setter
    def tag(self, value: Any) -> None:
        self.conn.tag = value

    def answer(self, status: int, body: bytes = b"", headers: Headers = (), *,
               close: bool = False) -> int:  # fmt: skip
        grpc = any(n == b"content-type" and v.startswith(b"application/grpc")
                   for n, v in self.headers)  # fmt: skip
        if grpc:
            # gRPC callers read the status from grpc-status (trailers-only response).
            code = {403: b"7", 429: b"8", 503: b"14", 504: b"4", 404: b"12"}.get(status, b"13")
            hdrs = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                    (b"grpc-status", code), (b"grpc-message", body.strip()),
                    (b"x-mesh-http-status", b"%d" % status), *headers]  # fmt: skip
            self.start(hdrs, end=True)
            return 0
        hdrs = [(b":status", b"%d" % status), (b"content-type", b"text/plain"),
                (b"content-length", b"%d" % len(body)), *headers]  # fmt: skip
        self.start(hdrs, end=not body)
        if body:
            self.conn.send_data(self.sid, body, end=True)
        return len(body)

    def start(self, headers: Headers, end: bool = False) -> None:
        if self.lost:
            return
        self.answered = True
        try:
            self.conn.h2.send_headers(self.sid, headers, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.lost = True
        self.conn.flush()

    def start_response(self, status: int, reason: bytes, headers: Headers, framing: str,
                       req: Request) -> H2Sink:  # fmt: skip
        hdrs = [(b":status", b"%d" % status)]
        hdrs.extend(
            (n, v) for n, v in headers if n not in H2_FORBIDDEN and n != b"te" and n[:1] != b":"
        )
        if framing == "length":
            for n, v in headers:
                if n == b"content-length":
                    hdrs.append((n, v))
        self.start(hdrs, end=framing == "none")
        return H2Sink(self, framing == "none")

    def abort(self) -> None:
        if not self.lost:
            self.lost = True
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.conn.h2.reset_stream(self.sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.conn.flush()


class H2Sink:
    """A streamed response body (and trailers) to an `H2Stream`."""

    __slots__ = ("stream", "ended")

    def __init__(self, stream: H2Stream, ended: bool) -> None:
        self.stream = stream
        self.ended = ended

    def chunk(self, data: bytes) -> None:
        s = self.stream
        if data and not s.lost:
            s.conn.send_data(s.sid, data)

    def end(self, trailers: Headers | None = None) -> None:
        s = self.stream
        if self.ended or s.lost:
            return
        self.ended = True
        if trailers:
            trailers = [(n, v) for n, v in trailers if n not in H2_FORBIDDEN]
        s.conn.send_data(s.sid, b"", end=True, trailers=trailers or None)


class H2Server(H2Base):
    """The caller's side over HTTP/2; each stream is served by `handler.serve`."""

    def __init__(self, handler: Handler, direction: str, tag: Any = None, *,
                 on_lost: Callable[[H2Server], None] | None = None) -> None:  # fmt: skip
        super().__init__(client=False)
        self.handler = handler
        self.direction = direction
        self.tag = tag
        self.peer: tuple[str, int] | None = None
        self.streams: dict[int, H2Stream] = {}
        self.draining = False
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else None
        if not self.handler.accept(self):  # type: ignore[arg-type]
            transport.close()
            return
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(WINDOW * 4)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.TooManyStreamsError:
            # More streams than the MAX_CONCURRENT_STREAMS we announced: a
            # client that ignores the limit is a flood.
            self.calm_down()
            return
        except h2.exceptions.ProtocolError:
            self.flush_now()  # h2 queued a GOAWAY
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                if len(self.streams) >= MAX_STREAMS:
                    self.h2.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    continue
                self.streams[ev.stream_id] = H2Stream(self, ev.stream_id, list(ev.headers))
                if ev.stream_ended:
                    self._start(ev.stream_id)
            elif isinstance(ev, h2.events.DataReceived):
                s = self.streams.get(ev.stream_id)
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if s is not None:
                    s.blen += len(ev.data)
                    if s.blen > MAX_BODY:
                        s.answer(413, b"request body over 16 MiB\n")
                        self.h2.reset_stream(ev.stream_id, h2.errors.ErrorCodes.CANCEL)
                        self.streams.pop(ev.stream_id, None)
                        continue
                    s.body.append(ev.data)
                    if ev.stream_ended:
                        self._start(ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                s = self.streams.get(ev.stream_id)
                if s is not None and s.task is None:
                    self._start(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                s = self.streams.pop(ev.stream_id, None)
                self._out.pop(ev.stream_id, None)
                if s is not None:
                    s.lost = True
                    if s.task is not None:
                        s.task.cancel()
                if self._flood.hit():
                    self.calm_down()
                    return
            elif isinstance(ev, h2.events.RemoteSettingsChanged | h2.events.PingReceived):
                if self._flood.hit():
                    self.calm_down()
                    return
            elif isinstance(ev, h2.events.WindowUpdated):
                self._window_updated(ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated) and self.transport is not None:
                self.transport.close()
        self.flush()

    def _start(self, sid: int) -> None:
        s = self.streams[sid]
        fields: dict[bytes, bytes] = {}
        headers: Headers = []
        for n, v in s.headers:
            if n[:1] == b":":
                fields[n] = v
            else:
                headers.append((n, v))
        if b":authority" in fields:
            headers.append((b"host", fields[b":authority"]))
        req = Request(
            fields.get(b":method", b"GET").decode("latin-1"),
            fields.get(b":path", b"/").decode("latin-1"),
            headers,
            b"".join(s.body),
            True,
            "2",
            asyncio.get_running_loop().time(),
        )
        s.body = []
        s.task = asyncio.get_running_loop().create_task(self._serve(s, req))

    async def _serve(self, s: H2Stream, req: Request) -> None:
        try:
            await self.handler.serve(s, req)  # type: ignore[arg-type]
        finally:
            self.streams.pop(s.sid, None)
            if self.draining and not self.streams:
                self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for s in self.streams.values():
            s.lost = True
            if s.task is not None:
                s.task.cancel()
        self.streams.clear()
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        for s in self.streams.values():
            s.paused_writing = True
            if s.on_writable is not None:
                s.on_writable(False)

    def resume_writing(self) -> None:
        for s in self.streams.values():
            s.paused_writing = False
            if s.on_writable is not None:
                s.on_writable(True)

    def drain(self) -> None:
        self.draining = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        self.flush_now()
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.flush_now()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()


class H2Client(H2Base):
    """One multiplexed upstream connection; `open()` starts a request stream."""

    def __init__(self) -> None:
        super().__init__(client=True)
        self.exchanges: dict[int, Any] = {}  # stream id → Exchange
        self.key: Any = None
        self.cluster: Any = None
        self.endpoint: tuple[str, int] | None = None
        self.goaway = False
        self.on_lost: Callable[[H2Client], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(WINDOW * 4)
        self.flush()

    @property
    def usable(self) -> bool:
        if self.lost or self.goaway:
            return False
        # h2's `open_outbound_streams` walks every stream of the connection.
        # Every open stream has an exchange or a body still queued, so their
        # sum bounds the count: h2 is asked only when the sum reaches the limit.
        limit = self.h2.remote_settings.max_concurrent_streams
        return len(self.exchanges) + len(self._out) < limit or (
            self.h2.open_outbound_streams < limit
        )

    def open(
        self, method: str, target: str, headers: Headers, body: bytes, exchange: Any
    ) -> H2Call:
        sid = self.h2.get_next_available_stream_id()
        authority = b""
        hdrs: Headers = []
        for n, v in headers:
            if n == b"host":
                authority = v
            elif n in UNIQUE:
                hdrs.append(hpack.NeverIndexedHeaderTuple(n, v))
            elif n == b"te":
                if v.strip().lower() == b"trailers":
                    hdrs.append((n, b"trailers"))
            elif n not in H2_FORBIDDEN:
                hdrs.append((n, v))
        pseudo = [(b":method", method.encode()), (b":scheme", b"http"),
                  (b":path", target.encode("latin-1")), (b":authority", authority or b"upstream")]  # fmt: skip
        self.exchanges[sid] = exchange
        self.h2.send_headers(sid, pseudo + hdrs, end_stream=not body)
        self.flush()
        if body:
            self.send_data(sid, body, end=True)
        return H2Call(self, sid)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush_now()
            self._fail_all("protocol")
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                ex = self.exchanges.get(ev.stream_id)
                if ex is not None:
                    status = 0
                    hdrs: Headers = []
                    for n, v in ev.headers:
                        if n == b":status":
                            status = int(v)
                        elif n[:1] != b":":
                            hdrs.append((n, v))
                    if ev.stream_ended:
                        framing = "none"
                    elif any(n == b"content-length" for n, _ in hdrs):
                        framing = "length"  # kept for an HTTP/1.1 caller
                    else:
                        framing = "stream"
                    ex.head(status, REASONS.get(status, b""), hdrs, framing)
                    if ev.stream_ended:
                        self._done(ev.stream_id)
            elif isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                ex = self.exchanges.get(ev.stream_id)
                if ex is not None:
                    ex.body(ev.data)
            elif isinstance(ev, h2.events.TrailersReceived):
                ex = self.exchanges.get(ev.stream_id)
                if ex is not None:
                    ex.trailers(list(ev.headers))
            elif isinstance(ev, h2.events.StreamEnded):
                self._done(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                ex = self.exchanges.pop(ev.stream_id, None)
                self._out.pop(ev.stream_id, None)
                if ex is not None:
                    refused = ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    ex.failed("refused" if refused else "reset")
            elif isinstance(ev, h2.events.WindowUpdated):
                self._window_updated(ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = True
                last = ev.last_stream_id or 0
                for sid in [s for s in self.exchanges if s > last]:
                    self.exchanges.pop(sid).failed("refused")
            elif (
                isinstance(ev, h2.events.PingReceived | h2.events.RemoteSettingsChanged)
                and self._flood.hit()
            ):
                self.calm_down()
                return
        self.flush()

    def _done(self, sid: int) -> None:
        ex = self.exchanges.pop(sid, None)
        if ex is not None:
            ex.done()

    def _fail_all(self, kind: str) -> None:
        exchanges, self.exchanges = self.exchanges, {}
        for ex in exchanges.values():
            ex.failed(kind)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_all("reset")
        if self.on_lost is not None:
            self.on_lost(self)

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.flush_now()
            self.transport.close()


class H2Call:
    """One request on an `H2Client` (what an `Attempt` holds as its `conn`)."""

    __slots__ = ("client", "sid")

    def __init__(self, client: H2Client, sid: int) -> None:
        self.client = client
        self.sid = sid

    @property
    def transport(self) -> asyncio.Transport | None:
        return None  # flow control is per stream (windows), not per socket

    @property
    def lost(self) -> bool:
        return self.client.lost

    def detach(self) -> None:
        c = self.client
        c.exchanges.pop(self.sid, None)
        c._out.pop(self.sid, None)
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            c.h2.reset_stream(self.sid, h2.errors.ErrorCodes.CANCEL)
        c.flush()
