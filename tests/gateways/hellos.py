"""Real ClientHello bytes, made by Python's own TLS stack (no socket needed)."""

from __future__ import annotations

import contextlib
import ssl


def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight a TLS client sends for `server_name` (None: no SNI)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def split_records(hello: bytes, size: int) -> bytes:
    """The same handshake message re-framed as several records of at most `size` bytes."""
    assert hello[0] == 0x16
    length = int.from_bytes(hello[3:5], "big")
    version = hello[1:3]
    body = hello[5 : 5 + length]
    out = bytearray()
    for i in range(0, len(body), size):
        chunk = body[i : i + size]
        out += bytes([0x16]) + version + len(chunk).to_bytes(2, "big") + chunk
    return bytes(out) + hello[5 + length :]
