"""Read the server name (SNI) from a TLS ClientHello without decrypting anything.

A mesh gateway routes a stream by the first bytes a client sends: the TLS
records carrying the ClientHello handshake message. `parse_client_hello`
takes the bytes received so far and answers one of three ways:

- `None`: not enough bytes yet (the hello is split across TCP segments, or
  across several TLS records), read more;
- a `ClientHello` with the server name (lowered, "" when the hello has none);
- `HelloError(reason)`: this stream is refused, `reason` being one of
  `REASONS` (the gateway counts refusals by it).

Bounds: the handshake message may be at most `MAX_HELLO` bytes (16 KiB) and
the bytes buffered before a decision at most `MAX_BUFFER` (the hello plus
the headers of the records it may be split into), so a client can never make
the gateway hold more than that. Everything is checked by length before it
is read; the parser never raises anything but `HelloError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HELLO = 16 * 1024  # the largest ClientHello handshake message accepted
RECORD_HEADER = 5
MAX_RECORD = 1 << 14  # TLSPlaintext.length is at most 2^14
# A hello cut into small records costs 5 header bytes each; at most this much
# is buffered before the gateway decides.
MAX_BUFFER = MAX_HELLO + 4 + 64 * RECORD_HEADER
MAX_RECORDS = 64

HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0x0000
HOST_NAME = 0x00

REASONS = ("not_tls", "not_client_hello", "too_large", "malformed")

# A DNS name as SNI carries it (RFC 6066: ASCII host name, no trailing dot).
_NAME = re.compile(rb"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?$")


class HelloError(ValueError):
    """The stream does not start with an acceptable ClientHello."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ClientHello:
    sni: str  # lowered; "" when the hello names no server
    alpn: tuple[str, ...] = ()
    length: int = 0  # bytes of the records that carried the hello


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of `data`, None if more bytes are needed,
    or HelloError if the stream must be refused (see the module doc)."""
    message, used = _handshake_message(data)
    if message is None:
        if len(data) > MAX_BUFFER:
            raise HelloError("too_large", "the hello did not fit the buffer")
        return None
    sni, alpn = _parse_hello_body(message)
    return ClientHello(sni=sni, alpn=alpn, length=used)


def _handshake_message(data: bytes) -> tuple[bytes | None, int]:
    """The first handshake message reassembled from the handshake records at
    the start of `data` (None when incomplete) and the bytes it took."""
    pos = 0
    body = bytearray()
    need = -1  # the handshake message's total length (header included), once known
    records = 0
    while True:
        if len(data) - pos < RECORD_HEADER:
            _check_partial_header(data[pos:])
            return None, 0
        ctype, major, minor = data[pos], data[pos + 1], data[pos + 2]
        length = (data[pos + 3] << 8) | data[pos + 4]
        if ctype != HANDSHAKE:
            if pos == 0:
                raise HelloError("not_tls", f"first byte 0x{ctype:02x}")
            raise HelloError("malformed", "a non-handshake record inside the hello")
        if major != 3 or minor > 4:
            raise HelloError("not_tls", f"record version {major}.{minor}")
        if length == 0 or length > MAX_RECORD:
            raise HelloError("malformed", f"record length {length}")
        records += 1
        if records > MAX_RECORDS:
            raise HelloError("too_large", "the hello is split into too many records")
        start = pos + RECORD_HEADER
        chunk = data[start : start + length]
        body += chunk
        if len(body) >= 4 and need < 0:
            if body[0] != CLIENT_HELLO:
                raise HelloError("not_client_hello", f"handshake type {body[0]}")
            size = (body[1] << 16) | (body[2] << 8) | body[3]
            if size > MAX_HELLO:
                raise HelloError("too_large", f"a ClientHello of {size} bytes")
            need = 4 + size
        if len(chunk) < length:
            return None, 0  # the record itself is incomplete
        pos = start + length
        if need >= 0 and len(body) >= need:
            return bytes(body[4:need]), pos


def _check_partial_header(head: bytes) -> None:
    """Refuse early what the first bytes already rule out (a plain HTTP request)."""
    if head and head[0] != HANDSHAKE:
        raise HelloError("not_tls", f"first byte 0x{head[0]:02x}")
    if len(head) >= 2 and head[1] != 3:
        raise HelloError("not_tls", f"record version {head[1]}")


class _Reader:
    """Bounds-checked reads from one byte string; overruns are HelloError."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise HelloError("malformed", f"{what} runs past its container")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        b = self.take(2, what)
        return (b[0] << 8) | b[1]

    def vector(self, size_bytes: int, what: str) -> _Reader:
        n = self.u8(what) if size_bytes == 1 else self.u16(what)
        start = self.pos
        self.take(n, what)
        return _Reader(self.data, start, start + n)


def _parse_hello_body(body: bytes) -> tuple[str, tuple[str, ...]]:
    r = _Reader(body)
    r.take(2, "client_version")
    r.take(32, "random")
    session = r.vector(1, "session_id")
    if session.left() > 32:
        raise HelloError("malformed", "session_id longer than 32 bytes")
    suites = r.vector(2, "cipher_suites")
    if suites.left() < 2 or suites.left() % 2:
        raise HelloError("malformed", "cipher_suites length")
    if r.vector(1, "compression_methods").left() < 1:
        raise HelloError("malformed", "no compression method")
    if r.left() == 0:
        return "", ()  # no extensions at all (SSL 3.0 style)
    exts = r.vector(2, "extensions")
    if r.left():
        raise HelloError("malformed", "bytes after the extensions")
    sni = ""
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while exts.left():
        etype = exts.u16("extension type")
        ext = exts.vector(2, "extension")
        if etype in seen:
            raise HelloError("malformed", f"extension {etype} twice")
        seen.add(etype)
        if etype == EXT_SERVER_NAME:
            sni = _server_name(ext)
        elif etype == 0x0010:  # ALPN
            alpn = _alpn(ext)
    return sni, alpn


def _server_name(ext: _Reader) -> str:
    names = ext.vector(2, "server_name_list")
    if ext.left():
        raise HelloError("malformed", "bytes after server_name_list")
    found = ""
    while names.left():
        kind = names.u8("name_type")
        value = names.vector(2, "host_name")
        raw = value.take(value.left(), "host_name")
        if kind != HOST_NAME:
            continue
        if found:
            raise HelloError("malformed", "two host names")
        if not _NAME.match(raw):
            raise HelloError("malformed", "host name is not a DNS name")
        found = raw.decode("ascii").lower()
    if not found:
        raise HelloError("malformed", "server_name extension without a host name")
    return found


def _alpn(ext: _Reader) -> tuple[str, ...]:
    protos = ext.vector(2, "protocol_name_list")
    out = []
    while protos.left():
        p = protos.vector(1, "protocol_name")
        out.append(p.take(p.left(), "protocol_name").decode("latin-1"))
    return tuple(out)
