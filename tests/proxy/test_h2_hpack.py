"""The sidecar's HPACK encoder (dict look-ups, no Huffman coding) against the
`hpack` package's decoder: every block decodes to the headers sent, with
never-indexed fields kept never-indexed, across table evictions, fields
larger than the table and table size changes from the peer's SETTINGS."""

from __future__ import annotations

import random

import hpack

from agents.proxy.http.h2wire import _Encoder

NAMES = [b":method", b":path", b":status", b"content-type", b"x-request-id", b"user-agent",
         b"x" * 200, b"cookie", b"a", b"b", b"date", b"grpc-status"]  # fmt: skip
VALUES = [b"GET", b"/", b"200", b"text/plain", b"", b"v" * 150, b"y" * 5000, b"z"]


def test_every_block_decodes_to_what_was_sent() -> None:
    rng = random.Random(7)
    blocks = 0
    for _ in range(200):
        enc, dec = _Encoder(), hpack.Decoder()
        for _ in range(rng.randint(1, 60)):
            if rng.random() < 0.1:
                size = rng.choice([0, 50, 256, 4096, 100, 8192])
                enc.header_table_size = size
                dec.max_allowed_table_size = size
            sent: list = []
            for _ in range(rng.randint(0, 12)):
                n = rng.choice(NAMES)
                v = rng.choice(VALUES) if rng.random() < 0.7 else str(rng.random()).encode()
                sent.append(hpack.NeverIndexedHeaderTuple(n, v) if rng.random() < 0.1 else (n, v))
            got = dec.decode(enc.encode(sent), raw=True)
            assert [(n, v) for n, v in got] == [(h[0], h[1]) for h in sent]
            for g, h in zip(got, sent, strict=True):
                if isinstance(h, hpack.NeverIndexedHeaderTuple):
                    assert not g.indexable
            blocks += 1
    assert blocks > 1000


def test_repeated_fields_are_sent_as_one_byte_indexes() -> None:
    enc, dec = _Encoder(), hpack.Decoder()
    headers = [(b":method", b"GET"), (b"user-agent", b"meshweb-test/1"), (b"x-env", b"prod")]
    first = enc.encode(headers)
    second = enc.encode(headers)
    assert dec.decode(first, raw=True) == headers
    assert dec.decode(second, raw=True) == headers
    assert second == b"\x82\xbf\xbe"  # GET is static; the other two now in the table
    assert first.count(b"meshweb-test/1") == 1  # literals are not Huffman-coded


def test_credentials_and_short_cookies_stay_out_of_the_table() -> None:
    enc, dec = _Encoder(), hpack.Decoder()
    headers = [(b"authorization", b"Bearer abc"), (b"cookie", b"sid=1"), (b"cookie", b"x" * 40)]
    for _ in range(2):
        got = dec.decode(enc.encode(headers), raw=True)
        assert [(n, v) for n, v in got] == headers
        assert [g.indexable for g in got] == [False, False, True]
    assert enc._count == 1  # only the long cookie was added
