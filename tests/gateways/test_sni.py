"""The ClientHello parser: real hellos, every refusal reason, and a fuzz run."""

from __future__ import annotations

import contextlib
import random
import struct

import pytest

from gateways import sni
from tests.gateways.hellos import client_hello, split_records

SNI = "api.default.dc2.internal.1a2b3c.mesh"


def test_the_server_name_of_a_real_hello_is_read():
    hello = sni.parse_client_hello(client_hello(SNI, alpn=["h2", "http/1.1"]))
    assert hello is not None
    assert hello.sni == SNI
    assert hello.alpn == ("h2", "http/1.1")


def test_names_are_lowered_and_a_hello_without_sni_has_an_empty_name():
    assert sni.parse_client_hello(client_hello("API.Default.DC2.internal.x.mesh")).sni == (
        "api.default.dc2.internal.x.mesh"
    )
    assert sni.parse_client_hello(client_hello(None)).sni == ""


def test_every_prefix_of_a_hello_asks_for_more_and_never_errs():
    raw = client_hello(SNI)
    for cut in range(len(raw)):
        assert sni.parse_client_hello(raw[:cut]) is None, cut
    assert sni.parse_client_hello(raw).sni == SNI


@pytest.mark.parametrize("size", [1, 16, 100, 512])
def test_a_hello_split_across_records_is_reassembled(size):
    raw = split_records(client_hello(SNI), size)
    if size == 1:  # hundreds of one-byte records: refused, never buffered without bound
        with pytest.raises(sni.HelloError) as err:
            sni.parse_client_hello(raw)
        assert err.value.reason == "too_large"
        return
    hello = sni.parse_client_hello(raw)
    assert hello is not None and hello.sni == SNI
    assert hello.length == len(raw)


def _reason(data: bytes) -> str:
    with pytest.raises(sni.HelloError) as err:
        sni.parse_client_hello(data)
    return err.value.reason


def test_refusals_name_their_reason():
    raw = client_hello(SNI)
    assert _reason(b"GET / HTTP/1.1\r\n\r\n") == "not_tls"
    assert _reason(b"G") == "not_tls"
    assert _reason(b"\x16\x02\x00\x00\x10") == "not_tls"  # SSL 2 style version
    assert _reason(b"\x17\x03\x03\x00\x05hello") == "not_tls"  # application data first
    # A ServerHello (type 2) where a ClientHello must be.
    assert _reason(raw[:5] + b"\x02" + raw[6:]) == "not_client_hello"
    # A hello claiming more than 16 KiB, refused from its header alone.
    assert _reason(b"\x16\x03\x01\x00\x04\x01\x00\x50\x00") == "too_large"
    # A record length of zero.
    assert _reason(b"\x16\x03\x01\x00\x00") == "malformed"


def test_a_hello_over_16_kib_is_refused_and_a_big_one_under_it_is_read():
    def hello_with_padding(pad: int) -> bytes:
        name = SNI.encode()
        sni_ext = struct.pack("!HHHBH", 0, len(name) + 5, len(name) + 3, 0, len(name)) + name
        padding = struct.pack("!HH", 21, pad) + b"\0" * pad
        exts = sni_ext + padding
        body = (
            b"\x03\x03"
            + b"\x11" * 32
            + b"\x00"
            + b"\x00\x02\x13\x01"
            + b"\x01\x00"
            + struct.pack("!H", len(exts))
            + exts
        )
        msg = b"\x01" + len(body).to_bytes(3, "big") + body
        return (
            split_records(b"\x16\x03\x01" + len(msg).to_bytes(2, "big") + msg, 1 << 14)
            if len(msg) <= 0xFFFF
            else b""
        )

    assert sni.parse_client_hello(hello_with_padding(15000)).sni == SNI
    assert _reason(hello_with_padding(16400)) == "too_large"


def test_malformed_extensions_are_refused():
    raw = bytearray(client_hello(SNI))
    at = raw.find(SNI.encode())
    # The host name's length field says one byte more than is there.
    bad = bytearray(raw)
    bad[at - 2 : at] = (len(SNI) + 1).to_bytes(2, "big")
    assert _reason(bytes(bad)) == "malformed"
    # A host name with a byte no DNS name has.
    bad = bytearray(raw)
    bad[at] = ord("/")
    assert _reason(bytes(bad)) == "malformed"


def _mutate(rng: random.Random, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        if op == 0 and data:  # flip bits
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:  # random byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 2:  # truncate
            data = data[: rng.randrange(len(data) + 1)]
        elif op == 3:  # insert junk
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randint(1, 40))
        elif op == 4 and len(data) > 2:  # a length field set to an extreme
            i = rng.randrange(len(data) - 1)
            data[i : i + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x00\x01", b"\x40\x00"])
        elif op == 5:  # duplicate a slice
            i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
            data[j:j] = data[i:j]
        elif op == 6 and len(data) > 10:  # re-frame into records of a random size
            with contextlib.suppress(AssertionError, ValueError):
                data = bytearray(split_records(bytes(data), rng.randint(1, 300)))
        else:  # pure noise, sometimes with a plausible record header
            noise = rng.randbytes(rng.randint(0, 300))
            data = bytearray(
                (b"\x16\x03\x01" + len(noise).to_bytes(2, "big") if rng.random() < 0.5 else b"")
                + noise
            )
    return bytes(data)


def test_fuzz_100k_generated_inputs_never_crash_the_parser():
    rng = random.Random(20261203)
    seeds = [
        client_hello(SNI),
        client_hello(None),
        client_hello("a"),
        client_hello("v1.api.default.dc1.internal.abc.mesh", alpn=["h2"]),
        split_records(client_hello(SNI), 64),
    ]
    outcomes = {"sni": 0, "more": 0, **dict.fromkeys(sni.REASONS, 0)}
    for _ in range(100_000):
        data = _mutate(rng, rng.choice(seeds))
        try:
            hello = sni.parse_client_hello(data)
        except sni.HelloError as exc:
            outcomes[exc.reason] += 1
            continue
        # Anything else raised fails the test right here (zero crashes).
        if hello is None:
            outcomes["more"] += 1
            assert len(data) <= sni.MAX_BUFFER
        else:
            outcomes["sni"] += 1
            assert isinstance(hello.sni, str) and len(hello.sni) <= 253
    assert sum(outcomes.values()) == 100_000
    # The generator reached every outcome, so the run explored more than one path.
    assert all(outcomes.values()), outcomes
