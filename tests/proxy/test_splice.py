"""The splice protocols without sockets: fake transports on one side, a real
TLS peer (an SSLObject over memory BIOs) on the other."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import ssl
import sys

import pytest

from agents.proxy import splice
from tests.proxy.support import TestCA


class FakeTransport:
    """Records what the protocol does to its transport."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.eof_written = False
        self.closed = False
        self.aborted = False
        self.paused = False
        self.protocol = None

    def write(self, data) -> None:
        assert not self.eof_written and not self.closed
        self.written.append(bytes(data))

    def writelines(self, chunks) -> None:
        for c in chunks:
            self.write(c)

    def take(self) -> bytes:
        out, self.written = b"".join(self.written), []
        return out

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high, low) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default


class Owner:
    def __init__(self) -> None:
        self.done: list[splice.Conn] = []

    def conn_done(self, conn: splice.Conn) -> None:
        self.done.append(conn)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    ca = TestCA()
    tmp = tmp_path_factory.mktemp("certs")
    cert, key = ca.write_leaf(tmp, "api", "api")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    for ctx in (server, client):
        ctx.load_cert_chain(cert, key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=ca.root_pem)
    return server, client


class Spliced:
    """An outbound connection: Plain (caller) + Tls (client side) linked, and the
    remote sidecar as an SSLObject (`peer`) reading/writing `tls_t`."""

    def __init__(self, contexts) -> None:
        server_ctx, client_ctx = contexts
        self.loop = asyncio.new_event_loop()
        self.owner = Owner()
        self.conn = splice.Conn(self.owner, "outbound")
        self.plain = splice.Plain(self.conn)
        self.plain_t = FakeTransport()
        self.plain.connection_made(self.plain_t)
        self.tls = splice.Tls(
            self.conn,
            client_ctx,
            server_side=False,
            hostname=None,
            timeout=60,
            on_secure=lambda t: None,
            on_fail=lambda *a: None,
        )
        self.tls_t = FakeTransport()
        self.pin, self.pout = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.peer = server_ctx.wrap_bio(self.pin, self.pout, server_side=True)
        self.loop.run_until_complete(self._handshake())
        splice.link(self.plain, self.tls)

    async def _handshake(self) -> None:
        self.tls.connection_made(self.tls_t)
        for _ in range(10):
            self.to_peer()
            with contextlib.suppress(ssl.SSLWantReadError):
                self.peer.do_handshake()
            if self.pout.pending:
                self.tls.data_received(self.pout.read())
            if self.tls.secure:
                self.to_peer()
                self.peer.do_handshake()
                return
        raise AssertionError("no handshake")

    def to_peer(self) -> None:
        data = self.tls_t.take()
        if data:
            self.pin.write(data)

    def peer_reads(self) -> bytes:
        self.to_peer()
        out = b""
        try:
            while chunk := self.peer.read(65536):
                out += chunk
        except ssl.SSLWantReadError:
            pass
        return out

    def peer_sends(self, data: bytes) -> None:
        self.peer.write(data)
        self.tls.data_received(self.pout.read())

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def spliced(contexts):
    s = Spliced(contexts)
    yield s
    s.close()


def test_bytes_cross_both_ways(spliced):
    spliced.plain.data_received(b"GET / HTTP/1.1\r\n\r\n")
    assert spliced.peer_reads() == b"GET / HTTP/1.1\r\n\r\n"
    spliced.peer_sends(b"HTTP/1.1 200 OK\r\n\r\n")
    assert spliced.plain_t.take() == b"HTTP/1.1 200 OK\r\n\r\n"
    assert (spliced.conn.rx, spliced.conn.tx) == (18, 19)


def test_large_reads_cross_intact_in_slices(spliced):
    big = os.urandom(1_000_000)
    spliced.plain.data_received(big)
    assert spliced.peer_reads() == big
    spliced.peer.write(big)
    raw = b""
    while spliced.pout.pending:
        raw += spliced.pout.read()
    spliced.tls.data_received(raw)  # one 1 MB read, fed to OpenSSL 16 KiB at a time
    assert spliced.plain_t.take() == big


def test_a_caller_half_close_becomes_a_close_notify_and_the_answer_still_flows(spliced):
    spliced.plain.data_received(b"request")
    assert spliced.plain.eof_received() is True  # the transport stays open for the answer
    assert spliced.peer_reads() == b"request"
    assert spliced.tls.notify_sent
    spliced.peer_sends(b"answer after the half-close")
    assert spliced.plain_t.take() == b"answer after the half-close"
    assert not spliced.plain_t.closed


def test_a_peer_close_notify_half_closes_the_caller(spliced):
    with contextlib.suppress(ssl.SSLWantReadError):
        spliced.peer.unwrap()
    spliced.tls.data_received(spliced.pout.read())
    assert spliced.plain_t.eof_written
    assert not spliced.plain_t.closed
    spliced.plain.data_received(b"the caller may still send")
    assert spliced.peer_reads() == b"the caller may still send"
    # Both directions ended: both transports close.
    spliced.plain.eof_received()
    assert spliced.plain_t.closed and spliced.tls_t.closed


def test_a_tcp_end_without_close_notify_ends_the_caller_side(spliced):
    async def go():
        return spliced.tls.eof_received()

    assert spliced.loop.run_until_complete(go()) is False
    assert spliced.plain_t.eof_written


def test_a_corrupt_record_aborts_both_sides(spliced):
    spliced.peer.write(b"x" * 100)
    record = bytearray(spliced.pout.read())
    record[-1] ^= 0xFF
    spliced.tls.data_received(bytes(record))
    assert spliced.plain_t.aborted and spliced.tls_t.aborted
    assert spliced.plain_t.take() == b""


def test_flow_control_pauses_the_other_side(spliced):
    spliced.plain.pause_writing()
    assert spliced.tls_t.paused
    spliced.plain.resume_writing()
    assert not spliced.tls_t.paused
    spliced.tls.pause_writing()
    assert spliced.plain_t.paused


def test_bytes_before_the_link_are_held_then_sent(contexts):
    server_ctx, client_ctx = contexts
    conn = splice.Conn(Owner(), "outbound")
    plain = splice.Plain(conn)
    plain_t = FakeTransport()
    plain.connection_made(plain_t)
    plain.data_received(b"early ")
    assert plain_t.paused
    plain.data_received(b"bytes")
    assert plain.eof_received() is True  # held too, until linked
    s = Spliced(contexts)
    try:
        # Re-home the held caller onto a linked TLS half.
        s.conn.plain = plain
        plain.conn = s.conn
        splice.link(plain, s.tls)
        assert s.peer_reads() == b"early bytes"
        assert s.tls.notify_sent
    finally:
        s.close()


async def _end_both(s: Spliced) -> None:
    s.plain.data_received(b"x")
    s.plain.connection_lost(None)
    s.tls.connection_lost(None)


def test_a_finished_connection_is_freed_without_the_garbage_collector(contexts):
    gc.disable()
    try:
        s = Spliced(contexts)
        ours = s.tls.sslobj
        s.loop.run_until_complete(_end_both(s))
        assert s.owner.done == [s.conn]
        s.close()
        del s
        # Only `ours` (and getrefcount's argument) refer to it: no cycle holds it.
        assert sys.getrefcount(ours) == 2
    finally:
        gc.enable()


def test_when_the_caller_goes_the_tls_side_half_closes_and_drops_what_still_comes(spliced):
    async def go():
        spliced.plain.connection_lost(None)

    spliced.loop.run_until_complete(go())
    assert spliced.tls_t.eof_written and not spliced.tls_t.closed
    spliced.peer_sends(b"late answer nobody will read")
    assert spliced.tls.eof_received() is False  # the peer closed too: now it closes


def test_when_the_tls_side_goes_the_caller_gets_its_bytes_then_eof(spliced):
    spliced.peer_sends(b"last words")

    async def go():
        spliced.tls.connection_lost(None)

    spliced.loop.run_until_complete(go())
    assert spliced.plain_t.take() == b"last words"
    assert spliced.plain_t.eof_written and not spliced.plain_t.closed
    spliced.plain.data_received(b"dropped")
    assert spliced.plain.eof_received() is False


def test_records_waiting_before_the_link_survive_the_callers_early_half_close(contexts):
    """The answer arrives (with the peer's close_notify) while the TLS half is
    not linked yet, and the caller has already half-closed: linking sends our
    close_notify, which must not swallow the records waiting in the BIO."""
    server_ctx, client_ctx = contexts
    s = Spliced(contexts)
    try:
        if s.pout.pending:  # the session tickets, read while linked
            s.tls.data_received(s.pout.read())
        # The TLS half as just handshaken, not yet adopted by a caller...
        s.tls.linked = False
        # ... and a caller that sent nothing and half-closed at once.
        plain = splice.Plain(splice.Conn(Owner(), "outbound"))
        plain_t = FakeTransport()
        plain.connection_made(plain_t)
        assert plain.eof_received() is True
        assert not s.tls.notify_sent
        s.peer.write(b"the answer")
        with contextlib.suppress(ssl.SSLWantReadError):
            s.peer.unwrap()
        s.tls.data_received(s.pout.read())  # waits in the BIO
        s.conn.plain = plain  # adopted (as `_connect_upstream` does)
        plain.conn = s.conn
        splice.link(plain, s.tls)
        assert s.tls.notify_sent
        splice.start_pumping(s.tls)
        assert plain_t.take() == b"the answer"
    finally:
        s.close()
