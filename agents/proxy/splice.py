"""The hot path: bytes between a cleartext TCP connection and an mTLS one.

A proxied connection (`Conn`) is two `asyncio.Protocol`s on two plain TCP
transports of the (uv)loop: `Plain` — the local app, or the local caller — and
`Tls` — the other sidecar. TLS is done here with `ssl.MemoryBIO` and an
`SSLObject` rather than with the loop's TLS transport, for three reasons:

- memory: the loop's TLS transports (asyncio's and uvloop's) keep a 256 KiB
  read buffer per connection; here the only per-connection buffers are
  OpenSSL's (released when idle: CPython sets SSL_MODE_RELEASE_BUFFERS) and
  the two BIOs, which hold only what is in flight;
- half-close: a caller's EOF travels as a TLS close_notify while the other
  direction keeps flowing (the loop's TLS transports close on close_notify);
- fewer layers: one Python call per chunk and direction (`Plain.data_received`
  encrypts straight into the peer transport; `Tls.data_received` decrypts
  straight into the plain transport), nothing allocated that can be avoided.

Flow control: each side's `pause_writing`/`resume_writing` (its transport's
write buffer crossing the high/low water marks) pauses/resumes reading on the
other side, so a slow reader never makes the sidecar buffer more than about
one high-water mark per direction.

Ending: an EOF on one side becomes an EOF on the other (close_notify one way,
`write_eof` the other); when both directions have ended, or either transport
is lost, both are closed after their buffered bytes are flushed. TLS or
socket errors abort both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from ssl import MemoryBIO, SSLContext, SSLError, SSLWantReadError, SSLZeroReturnError
from typing import Any

HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
# One TLS record carries at most 16 KiB of plaintext; reading asks for one record.
RECORD = 16 * 1024
# Larger reads are fed to OpenSSL in slices: a MemoryBIO keeps its high-water
# capacity for life, so feeding it 256 KiB once would pin 256 KiB to the
# connection; in slices, a BIO never holds more than about two records.
SLICE = 16 * 1024
# When one side is gone, the other is closed by a half-close: our last bytes,
# then FIN, then whatever the peer still sends is read and dropped until it
# closes too, for at most LINGER seconds. Closing a socket with unread bytes
# would send a reset instead, which can destroy our last bytes in flight.
LINGER = 5.0


class Conn:
    """One proxied connection: its two halves and what its owner tracks about it.

    `owner.conn_done(conn)` is called exactly once, when both halves are gone
    (or the one that ever existed is)."""

    __slots__ = ("owner", "direction", "plain", "tls", "endpoint", "done", "tag", "istio")

    def __init__(self, owner: Any, direction: str) -> None:
        self.owner = owner
        self.direction = direction  # "inbound" | "outbound"
        self.plain: Plain | None = None
        self.tls: Tls | None = None
        self.endpoint: tuple[str, int] | None = None
        self.done = False
        self.tag: Any = None  # the owner's per-connection data (state snapshot, task)
        self.istio: Any = None  # the observer's handle once the connection is allowed

    @property
    def rx(self) -> int:
        """Bytes received from the caller's side (plaintext)."""
        side = self.plain if self.direction == "outbound" else self.tls
        return side.nin if side is not None else 0

    @property
    def tx(self) -> int:
        """Bytes sent back to the caller's side (plaintext)."""
        side = self.tls if self.direction == "outbound" else self.plain
        return side.nin if side is not None else 0

    def side_lost(self) -> None:
        plain, tls = self.plain, self.tls
        if (plain is None or plain.lost) and (tls is None or tls.lost) and not self.done:
            self.done = True
            self.owner.conn_done(self)
            self._release()

    def _release(self) -> None:
        """Break the reference cycles of a finished connection (conn ↔ halves ↔
        transports, callbacks), so that its memory — 20-odd KiB of OpenSSL state
        — goes back at once, not at the next full garbage collection, which for
        connections old enough to have reached the oldest generation can be
        very late."""
        plain, tls = self.plain, self.tls
        if plain is not None:
            plain.transport = plain._sslobj = plain._tout = plain._ttransport = None
            plain._early = plain._on_made = None
        if tls is not None:
            tls.transport = tls.sslobj = tls._in = tls._out = tls._peer = None
            tls._on_secure = tls._on_fail = _no_callback
            tls._ctx = None
        self.plain = self.tls = None
        self.tag = None

    def close(self) -> None:
        """Close both halves after flushing what is buffered (a graceful end)."""
        if self.tls is not None:
            self.tls.close()
        if self.plain is not None:
            self.plain.close()

    def abort(self) -> None:
        """Drop both halves now (errors, or the end of a drain's grace)."""
        for side in (self.tls, self.plain):
            if side is not None and side.transport is not None and not side.lost:
                side.transport.abort()


class Plain(asyncio.Protocol):
    """The cleartext half: what it reads is encrypted into the TLS half."""

    __slots__ = (
        "conn",
        "transport",
        "lost",
        "eof",
        "nin",
        "_sslobj",
        "_tout",
        "_ttransport",
        "_on_made",
        "_early",
        "_dropping",
        "_timer",
    )

    def __init__(self, conn: Conn, on_made: Callable[[Plain], None] | None = None) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.eof = False  # the plain peer sent EOF (and it was forwarded)
        self.nin = 0
        # The linked TLS half's SSLObject, outgoing BIO and transport (set by
        # `link`); until then what arrives is held (see `_hold`).
        self._sslobj: Any = None
        self._tout: MemoryBIO | None = None
        self._ttransport: asyncio.Transport | None = None
        self._on_made = on_made
        self._early: list[bytes] | None = None
        self._dropping = False  # finishing: what arrives is dropped (see `finish`)
        self._timer: asyncio.TimerHandle | None = None
        conn.plain = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # TCP_NODELAY: uvloop and asyncio both set it on every TCP transport.
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]
        tls = self.conn.tls
        if tls is not None and tls.secure:
            link(self, tls)
        if self._on_made is not None:
            self._on_made(self)

    def _hold(self, data: bytes) -> None:
        # Bytes before the TLS half is ready (uvloop starts reading right after
        # connection_made, whatever it did): keep them and stop reading.
        if self._dropping:
            return
        if self._early is None:
            self._early = []
        self._early.append(data)
        if self.transport is not None:
            self.transport.pause_reading()

    # -- hot path ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self.nin += n
        if n > SLICE:
            self._send_large(data)
            return
        try:
            self._sslobj.write(data)
            self._ttransport.write(self._tout.read())  # type: ignore[union-attr]
        except AttributeError:
            if self._sslobj is not None:
                raise
            self._hold(data)  # not linked yet
        except (SSLError, RuntimeError):
            self.conn.abort()

    def _send_large(self, data: bytes) -> None:
        if self._sslobj is None:  # not linked yet, or finishing
            self._hold(data)
            return
        view = memoryview(data)
        write, take = self._sslobj.write, self._tout.read  # type: ignore[union-attr]
        out = []
        try:
            for off in range(0, len(view), SLICE):
                write(view[off : off + SLICE])
                out.append(take())
            self._ttransport.writelines(out)  # type: ignore[union-attr]
        except (SSLError, RuntimeError):
            self.conn.abort()

    # -- flow control ------------------------------------------------------------

    def pause_writing(self) -> None:
        tls = self.conn.tls
        if tls is not None and tls.transport is not None:
            tls.transport.pause_reading()

    def resume_writing(self) -> None:
        tls = self.conn.tls
        if tls is not None and tls.transport is not None and not tls.lost:
            tls.transport.resume_reading()

    # -- ending ----------------------------------------------------------------

    def eof_received(self) -> bool:
        self.eof = True
        if self._dropping:
            return False  # the peer has closed too: done
        tls = self.conn.tls
        if tls is None or not tls.linked:
            return True  # not connected yet: the EOF is forwarded once linked
        if tls.lost:
            return False
        tls.send_close_notify()
        if tls.eof:
            self.conn.close()
            return False
        return True  # half-closed: keep writing the other direction

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tls = self.conn.tls
        if tls is not None and not tls.lost:
            if exc is not None:
                tls.transport.abort()  # type: ignore[union-attr]
            else:
                tls.finish()
        self.conn.side_lost()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    def finish(self) -> None:
        """The TLS side is gone: send what is buffered, then FIN, and drop what the
        app or caller still sends until it closes (or LINGER passes)."""
        transport = self.transport
        if transport is None or self.lost or self._dropping:
            return
        self._dropping = True
        self._sslobj = None
        self._early = None
        try:
            transport.write_eof()
        except RuntimeError:
            transport.close()
            return
        transport.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(LINGER, self.close)


class Tls(asyncio.Protocol):
    """The mTLS half: handshake, then what it decrypts goes to the plain half.

    `on_secure(tls)` is called once the handshake is done (the peer's chain
    verified); it checks the peer's identity and links a plain half, or closes.
    `on_fail(tls, reason)` is called when the handshake fails or times out."""

    __slots__ = (
        "conn",
        "transport",
        "sslobj",
        "lost",
        "eof",
        "secure",
        "linked",
        "nin",
        "notify_sent",
        "failed",
        "tcp_eof",
        "dropping",
        "_ctx",
        "_server_side",
        "_hostname",
        "_in",
        "_out",
        "_peer",
        "_timer",
        "_timeout",
        "_on_secure",
        "_on_fail",
    )

    def __init__(
        self,
        conn: Conn,
        ctx: SSLContext,
        *,
        server_side: bool,
        hostname: str | None,
        timeout: float,
        on_secure: Callable[[Tls], None],
        on_fail: Callable[[Tls, str, str], None],
    ) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.sslobj: Any = None
        self.lost = False
        self.eof = False  # close_notify received (and forwarded)
        self.secure = False
        self.linked = False
        self.nin = 0
        self.notify_sent = False
        self.failed = False  # on_fail was called (once)
        self.tcp_eof = False
        self.dropping = False  # finishing: what arrives is dropped (see `finish`)
        self._ctx = ctx
        self._server_side = server_side
        self._hostname = hostname
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._on_secure = on_secure
        self._on_fail = on_fail
        self._peer: asyncio.Transport | None = None  # the plain half's transport, once linked
        conn.tls = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # TCP_NODELAY: uvloop and asyncio both set it on every TCP transport.
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]
        self._in = MemoryBIO()
        self._out = MemoryBIO()
        self.sslobj = _wrap_bio(self._ctx, self._in, self._out, self._server_side, self._hostname)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._handshake_timeout)
        if not self._server_side:
            self._handshake()

    # -- handshake -----------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except SSLWantReadError:
            self._flush()
            return
        except SSLError as exc:
            self._flush()  # the alert, so the peer learns why
            self._fail("tls", _reason(exc))
            return
        self._flush()
        self.secure = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        on_secure = self._on_secure
        # Handshake state is done with: drop what it held (closures, context).
        self._on_secure = self._on_fail = _no_callback
        self._ctx = None
        on_secure(self)

    def _handshake_timeout(self) -> None:
        self._timer = None
        if not self.secure and not self.lost:
            self._fail("timeout", "handshake_timeout")

    def _fail(self, kind: str, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.failed:
            self.failed = True
            self._on_fail(self, kind, reason)
        if self.transport is not None and not self.lost:
            self.transport.close()

    def _flush(self) -> None:
        if self._out.pending:
            self.transport.write(self._out.read())  # type: ignore[union-attr]

    def peer_certificate(self) -> dict | None:
        try:
            return self.sslobj.getpeercert()
        except (SSLError, ValueError):
            return None

    # -- hot path --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.linked:
            if len(data) > SLICE:
                self._pump_large(data)
                return
            self._in.write(data)
            self._pump()
            return
        if self.dropping:
            return
        self._in.write(data)
        if not self.secure:
            self._handshake()
        # Secure but not linked yet (the inbound side is still connecting to the
        # app): the records wait in the BIO and reading is paused meanwhile.

    def _pump(self) -> None:
        """Decrypt everything complete in the BIO and write it to the plain half."""
        sslobj = self.sslobj
        inbio = self._in
        chunks = None
        notify = False
        try:
            # Ask for no more than the ciphertext at hand: a record's plaintext is
            # smaller, and read(n) allocates n bytes before shrinking them to what
            # was read (16 KiB for every small record otherwise).
            data = sslobj.read(min(inbio.pending, RECORD) or RECORD)
            if not data:
                notify = True
            elif not inbio.pending and not sslobj.pending():
                # The common case: one record in, one write out, no exception raised.
                self.nin += len(data)
                self._peer.write(data)  # type: ignore[union-attr]
                if self._out.pending:  # post-handshake messages (key updates) to answer
                    self.transport.write(self._out.read())  # type: ignore[union-attr]
                return
            else:
                chunks = [data]
                while True:
                    data = sslobj.read(min(inbio.pending, RECORD) or RECORD)
                    if not data:
                        notify = True
                        break
                    chunks.append(data)
                    if not inbio.pending and not sslobj.pending():
                        break
        except SSLWantReadError:
            pass
        except SSLZeroReturnError:
            notify = True
        except (SSLError, RuntimeError):
            self.conn.abort()
            return
        if chunks:
            self.nin += sum(map(len, chunks))
            try:
                self._peer.writelines(chunks)  # type: ignore[union-attr]
            except RuntimeError:
                self.conn.abort()
                return
        if self._out.pending:
            self.transport.write(self._out.read())  # type: ignore[union-attr]
        if notify and not self.eof:
            self._close_notify_received()

    def _pump_large(self, data: bytes) -> None:
        """`_pump` for a large read: feed it in slices, write the plaintext at once."""
        view = memoryview(data)
        inwrite, read, inbio = self._in.write, self.sslobj.read, self._in
        chunks: list[bytes] = []
        notify = False
        try:
            for off in range(0, len(view), SLICE):
                inwrite(view[off : off + SLICE])
                try:
                    while chunk := read(min(inbio.pending, RECORD) or RECORD):
                        chunks.append(chunk)
                    notify = True
                except SSLWantReadError:
                    pass  # the slice ended mid-record: feed the next one
                if notify:
                    break
        except SSLZeroReturnError:
            notify = True
        except SSLError:
            self.conn.abort()
            return
        if chunks:
            self.nin += sum(map(len, chunks))
            try:
                self._peer.writelines(chunks)  # type: ignore[union-attr]
            except RuntimeError:
                self.conn.abort()
                return
        if self._out.pending:
            self.transport.write(self._out.read())  # type: ignore[union-attr]
        if notify and not self.eof:
            self._close_notify_received()

    def _close_notify_received(self) -> None:
        self.eof = True
        plain = self.conn.plain
        if plain is None or plain.lost or plain.transport is None:
            self.close()
            return
        if plain.eof:
            self.conn.close()
            return
        if plain.transport.can_write_eof():
            plain.transport.write_eof()
        else:
            plain.close()

    # -- flow control ------------------------------------------------------------------

    def pause_writing(self) -> None:
        plain = self.conn.plain
        if plain is not None and plain.transport is not None:
            plain.transport.pause_reading()

    def resume_writing(self) -> None:
        plain = self.conn.plain
        if plain is not None and plain.transport is not None and not plain.lost:
            plain.transport.resume_reading()

    # -- ending ----------------------------------------------------------------------

    def send_close_notify(self) -> None:
        """End our sending direction with a TLS close_notify (reads go on)."""
        if self.notify_sent or not self.secure or self.lost:
            return
        self.notify_sent = True
        # CPython's shutdown() calls SSL_shutdown twice: the first sends our
        # close_notify, the second reads the incoming BIO looking for the
        # peer's — and OpenSSL *discards* every application-data record it
        # meets on the way. Records that wait in the BIO (a TLS half not yet
        # linked, or paused) would be lost: the caller would get an empty
        # answer. So the BIO is emptied around the call and refilled after,
        # and those records are read by the normal path.
        held = self._in.read() if self._in is not None and self._in.pending else b""
        try:
            if _C_LEVEL:
                self.sslobj.shutdown()
            else:
                self.sslobj.unwrap()
        except SSLWantReadError:
            pass  # sent; the peer's close_notify comes later (or never: fine)
        except SSLError:
            pass
        if held:
            self._in.write(held)
        self._flush()

    def eof_received(self) -> bool:
        # The TCP stream ended. After a close_notify that is the normal end of the
        # peer's direction; without one the stream was cut (or truncated): stop.
        self.tcp_eof = True
        if self.dropping:
            return False  # the peer has closed too: done
        if self.eof:
            return True
        if self.secure and not self.linked:
            return True  # records may wait in the BIO: decided once linked
        plain = self.conn.plain
        if plain is not None and not plain.lost:
            plain.finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.secure and not self.failed:
            # The peer went away mid-handshake (a port scan, a plaintext client
            # that gave up, a refused certificate on the peer's side).
            self.failed = True
            self._on_fail(self, "tls", "eof_during_handshake" if exc is None else "reset")
        plain = self.conn.plain
        if plain is not None and not plain.lost and plain.transport is not None:
            if exc is not None:
                plain.transport.abort()
            else:
                plain.finish()
        self.conn.side_lost()

    def close(self) -> None:
        if self.transport is None or self.lost:
            return
        self.send_close_notify()
        self.transport.close()

    def finish(self) -> None:
        """The plain side is gone: close_notify and FIN after what is buffered, then
        drop what the peer still sends until it closes (or LINGER passes)."""
        transport = self.transport
        if transport is None or self.lost or self.dropping:
            return
        if not self.secure:
            transport.close()
            return
        self.send_close_notify()
        self.dropping = True
        self.linked = False  # data_received takes the slow path, which drops
        try:
            transport.write_eof()
        except RuntimeError:
            transport.close()
            return
        transport.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(LINGER, self.close)


def _no_callback(*args: Any) -> None:
    pass


# The C-level SSL object (`_ssl._SSLSocket`) has the read/write/pending/
# do_handshake/getpeercert/shutdown of `ssl.SSLObject`, whose methods only
# forward to it: using it directly saves a Python frame on every record read
# and written, and the wrapper's instance dict and weakref per connection.
# `SSLContext._wrap_bio` is what `SSLObject._create` itself calls (CPython
# 3.7+); without it, the public wrapper is used.
_C_LEVEL = hasattr(SSLContext, "_wrap_bio")


def _wrap_bio(
    ctx: SSLContext,
    incoming: MemoryBIO,
    outgoing: MemoryBIO,
    server_side: bool,
    hostname: str | None,
) -> Any:
    if _C_LEVEL:
        return ctx._wrap_bio(  # type: ignore[attr-defined]
            incoming, outgoing, server_side=server_side, server_hostname=hostname
        )
    return ctx.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=hostname)


def link(plain: Plain, tls: Tls) -> None:
    """Join the two halves, and send on what the plain side held meanwhile."""
    plain._sslobj = tls.sslobj
    plain._tout = tls._out
    plain._ttransport = tls.transport
    tls._peer = plain.transport
    tls.linked = True
    early, plain._early = plain._early, None
    for data in early or ():
        if len(data) > SLICE:
            plain._send_large(data)
        else:
            try:
                tls.sslobj.write(data)
                tls.transport.write(tls._out.read())  # type: ignore[union-attr]
            except (SSLError, RuntimeError):
                plain.conn.abort()
        if plain.lost or tls.lost:
            return
    if plain.eof:
        tls.send_close_notify()


def start_pumping(tls: Tls) -> None:
    """After linking a TLS half that was held (inbound, while the app connected):
    forward what arrived meanwhile and read again."""
    if tls.lost:
        return
    tls._pump()
    if tls.lost or tls.transport is None:
        return
    if tls.tcp_eof and not tls.eof:
        tls.conn.close()  # the stream was cut before a close_notify
        return
    tls.transport.resume_reading()


def _reason(exc: SSLError) -> str:
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower()
    name = type(exc).__name__
    return {"SSLEOFError": "eof_during_handshake", "SSLZeroReturnError": "closed"}.get(
        name, "ssl_error"
    )
