"""HTTP/1.1 on the wire: the server side (callers) and the client side
(upstream connections), both `asyncio.Protocol`s over httptools (llhttp).

llhttp is strict where it matters: a bad request line, both Content-Length and
Transfer-Encoding, duplicate Content-Length, invalid chunk sizes, obs-fold and
NUL or control bytes in header values are parse errors; the server side adds a
64 KiB limit on the request head and answers every parse error with `400` and
closes the connection, so nothing malformed is ever forwarded. A request head
or body that trickles in slower than `read_timeout` (slowloris) gets `408`.

Request bodies are read whole before the request is forwarded (up to
`MAX_BODY`): a retry must be able to send it again. Responses stream: the
head, then the body as it arrives, re-framed for the caller.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

# Hop-by-hop: never forwarded (RFC 9110 §7.6.1), plus what the proxy re-frames.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"content-length",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

Headers = list[tuple[bytes, bytes]]


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Headers without the hop-by-hop ones (and those the Connection header names)."""
    named: set[bytes] = set()
    for n, v in headers:
        if n == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
    return [(n, v) for n, v in headers if n not in drop]


class Request:
    """One parsed request (head and whole body)."""

    __slots__ = ("method", "target", "headers", "body", "keep_alive", "version", "started")

    def __init__(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes,
        keep_alive: bool,
        version: str,
        started: float,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.version = version
        self.started = started

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class Handler:
    """What a `ServerConn` calls: `accept` once connected (False: close), and
    `serve` once per request, in order (one at a time per connection)."""

    def accept(self, conn: ServerConn) -> bool:
        raise NotImplementedError

    async def serve(self, conn: ServerConn, request: Request) -> None:
        raise NotImplementedError

    def bad_request(self, conn: ServerConn, status: int, reason: str) -> None:
        """A request that was refused before it was parsed whole."""


class ServerConn(asyncio.Protocol):
    """The caller's side of the HTTP proxy (an app on loopback, or a peer
    sidecar over mTLS)."""

    def __init__(
        self,
        handler: Handler,
        direction: str,
        *,
        read_timeout: float = 10.0,
        idle_timeout: float = 300.0,
    ) -> None:
        self.handler = handler
        self.direction = direction
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.peer: tuple[str, int] | None = None
        self.tag: Any = None  # the handler's per-connection data
        self.lost = False
        self.paused_writing = False
        self.on_writable: Callable[[bool], None] | None = None  # upstream flow control
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request] = deque()
        self._busy = False
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._due_fn: Callable[[], None] | None = None
        self._url = b""
        self._headers: Headers = []
        self._expect: bytes | None = None  # an Expect header's value
        self._head = 0
        self._body: list[bytes] = []
        self._blen = 0
        self._error = (0, "")
        self._started = 0.0
        self._reading = False
        self._task: asyncio.Task | None = None
        self.requests = 0
        self.draining = False

    # -- connection ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Kept: asyncio.get_running_loop() costs a getpid() system call per use.
        self.loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else None
        if not self.handler.accept(self):
            self._closing = True
            transport.close()
            return
        self._arm(self.idle_timeout, self._idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        if self._task is not None and not self._task.done() and self._busy:
            pass  # the request's task notices (writes become no-ops) and finishes
        self._queue.clear()

    def pause_writing(self) -> None:
        self.paused_writing = True
        if self.on_writable is not None:
            self.on_writable(False)

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.on_writable is not None:
            self.on_writable(True)

    # One lazy timer per connection: arming sets a deadline and a callback;
    # the loop's timer is created only when none is pending at or before the
    # deadline, and when it fires early (the deadline moved on) it re-arms.
    # A keep-alive connection thus costs no timer handle per request.

    def _arm(self, delay: float, fn: Callable[[], None]) -> None:
        if delay <= 0:
            self._disarm()
            return
        loop = self.loop
        at = loop.time() + delay
        self._due, self._due_fn = at, fn
        if self._timer is None or self._timer.when() > at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(at, self._fire)

    def _disarm(self) -> None:
        self._due_fn = None

    def _fire(self) -> None:
        self._timer = None
        fn = self._due_fn
        if fn is None or self.lost:
            return
        loop = self.loop
        if loop.time() < self._due:
            self._timer = loop.call_at(self._due, self._fire)
            return
        self._due_fn = None
        fn()

    def _cancel_timer(self) -> None:
        self._due_fn = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle(self) -> None:
        if not self._busy and not self._queue:
            self.close()

    def _slow(self) -> None:
        self.handler.bad_request(self, 408, "request not received in time")
        self.answer_and_close(408, b"request not received in time\n")

    # -- parsing -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(501, "protocol upgrades (CONNECT, Upgrade) are not proxied")
        except Exception as exc:  # httptools' errors, and ours raised from callbacks
            status, reason = self._error
            if not status:
                status, reason = 400, f"malformed request: {exc}"
            self._refuse(status, reason)

    def _refuse(self, status: int, reason: str) -> None:
        self.handler.bad_request(self, status, reason)
        self.answer_and_close(status, reason.encode("latin-1", "replace") + b"\n")

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._expect = None
        self._head = 0
        self._body = []
        self._blen = 0
        self._started = self.loop.time()  # type: ignore[union-attr]
        self._reading = True
        if not self._busy:
            self._arm(self.read_timeout, self._slow)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head += len(url)
        if self._head > MAX_HEAD:
            self._error = (431, "request head over 64 KiB")
            raise ValueError("head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head += len(name) + len(value) + 4
        if self._head > MAX_HEAD:
            self._error = (431, "request head over 64 KiB")
            raise ValueError("head too large")
        name = name.lower()
        if name == b"expect" and (self._expect is None or self._expect.lower() == b"100-continue"):
            self._expect = value  # the first that is not 100-continue stays
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._expect is not None:
            if self._expect.lower() == b"100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
            else:
                self._error = (417, "unsupported Expect")
                raise ValueError("expect")

    def on_body(self, body: bytes) -> None:
        self._blen += len(body)
        if self._blen > MAX_BODY:
            self._error = (413, "request body over 16 MiB")
            raise ValueError("body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        p = self._parser
        self._reading = False
        req = Request(
            p.get_method().decode("latin-1"),
            self._url.decode("latin-1"),
            self._headers,
            b"".join(self._body) if self._body else b"",
            p.should_keep_alive(),
            p.get_http_version(),
            self._started,
        )
        self._queue.append(req)
        if self._busy:
            if len(self._queue) > 1 and self.transport is not None:
                self.transport.pause_reading()  # pipelined: hold the rest
        else:
            self._next()

    def _next(self) -> None:
        self._disarm()
        req = self._queue.popleft()
        self._busy = True
        self.requests += 1
        self._task = self.loop.create_task(self._serve(req))  # type: ignore[union-attr]

    async def _serve(self, req: Request) -> None:
        try:
            await self.handler.serve(self, req)
        finally:
            self._done(req)

    def _done(self, req: Request) -> None:
        self._busy = False
        self._task = None
        if self.lost or self._closing:
            return
        if not req.keep_alive or self.draining:
            self.close()
            return
        if self._queue:
            if self.transport is not None:
                self.transport.resume_reading()
            self._next()
        elif self._reading:
            self._arm(self.read_timeout, self._slow)
        else:
            self._arm(self.idle_timeout, self._idle)

    # -- answering ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        # Joined first: over TLS each piece would be its own record (its own
        # encryption, MAC and 22-odd bytes), and its own decryption on the other side.
        if not self.lost and self.transport is not None:
            self.transport.write(b"".join(data))

    def answer(
        self, status: int, body: bytes = b"", headers: Headers = (), *, close: bool = False
    ) -> int:
        """A complete local answer; returns the body size."""
        out = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown"))]
        for n, v in headers:
            out.append(n + b": " + v + b"\r\n")
        out.append(b"content-type: text/plain\r\ncontent-length: %d\r\n" % len(body))
        if close:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        out.append(body)
        self.writelines(out)
        if close:
            self.close()
        return len(body)

    def answer_and_close(self, status: int, body: bytes) -> None:
        if self._closing or self.lost:
            return
        self._closing = True
        self._cancel_timer()
        self.answer(status, body, close=False)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self.transport is not None and not self.lost:
            self.transport.close()

    def drain(self) -> None:
        """Shutting down: close now if idle, else after the current response."""
        self.draining = True
        if not self._busy and not self._queue:
            self.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None and not self.lost:
            self.transport.abort()


class Exchange:
    """What a `ClientConn` reports one response to (implemented by the proxy)."""

    def head(self, status: int, reason: bytes, headers: Headers, framing: str) -> None: ...
    def body(self, data: bytes) -> None: ...
    def done(self) -> None: ...
    def failed(self, kind: str) -> None: ...


class ClientConn(asyncio.Protocol):
    """One upstream connection (to a peer sidecar over mTLS, or to the local
    app): one request at a time, kept alive and pooled between requests."""

    def __init__(self, on_idle: Callable[[ClientConn, bool], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reused = 0  # requests sent before the current one
        self.key: Any = None  # the pool's key
        self.cluster: Any = None  # the circuit it counts against
        self.endpoint: tuple[str, int] | None = None
        self.idle_timer: asyncio.TimerHandle | None = None  # the pool's, armed lazily
        self.idle_since: float | None = None  # loop time it went back to the pool
        self._on_idle = on_idle
        self._exchange: Exchange | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Headers = []
        self._reason = b""
        self._framing = ""
        self._head_only = False
        self._got_head = False
        self._got_bytes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]

    def send(self, data: list[bytes], exchange: Exchange, head_only: bool) -> None:
        self.idle_since = None
        self._exchange = exchange
        self._head_only = head_only
        self._got_head = self._got_bytes = False
        self._headers = []
        self._reason = b""
        self.transport.write(b"".join(data))  # type: ignore[union-attr]  # one TLS record

    def reading(self, ok: bool) -> None:
        """Flow control from the caller's side: read the response on or not."""
        if self.transport is not None and not self.lost:
            (self.transport.resume_reading if ok else self.transport.pause_reading)()

    def detach(self) -> None:
        """The exchange gives up on this response: the connection cannot be reused."""
        self._exchange = None
        self.close()

    def data_received(self, data: bytes) -> None:
        if self._exchange is None:
            self.close()  # bytes nobody asked for
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except Exception:
            ex, self._exchange = self._exchange, None
            self.close()
            if ex is not None:
                ex.failed("protocol")

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._headers = []
            self._reason = b""
            return  # an interim response: wait for the real one
        self._got_head = True
        if self._head_only or status in (204, 304):
            framing = "none"
        else:
            framing = "close"
            for n, v in self._headers:
                if n == b"content-length":
                    framing = "length"
                elif n == b"transfer-encoding" and b"chunked" in v.lower():
                    framing = "chunked"
                    break
        self._framing = framing
        ex = self._exchange
        if ex is not None:
            ex.head(status, self._reason, self._headers, framing)
        if framing == "none":
            self._complete(self._parser.should_keep_alive())
            self._parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        ex = self._exchange
        if ex is not None:
            ex.body(body)

    def on_message_complete(self) -> None:
        if self._framing == "none":
            return
        self._complete(self._parser.should_keep_alive())

    def _complete(self, keep_alive: bool) -> None:
        ex, self._exchange = self._exchange, None
        self.reused += 1
        if ex is not None:
            ex.done()
        if self.lost:
            return
        self._on_idle(self, keep_alive)

    def eof_received(self) -> bool:
        if self._exchange is not None and self._got_head and self._framing == "close":
            self._complete(False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        ex, self._exchange = self._exchange, None
        if ex is not None:
            # Nothing at all came back on a reused connection: the peer closed
            # it while idle (a race every keep-alive pool has), not an answer.
            ex.failed("stale" if not self._got_bytes and self.reused else "reset")
        self._on_idle(self, False)

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()
