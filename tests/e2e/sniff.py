"""Capture the TCP payloads on one interface (AF_PACKET, root), and read them back.

Run inside a namespace:

    ip netns exec NS python -m tests.e2e.sniff IFACE OUT.jsonl SECONDS

writes `ready` on stdout once the socket is bound, then one JSON line per
TCP segment with a payload (`src`, `sport`, `dst`, `dport`, `seq`, `data`
hex) until SIGTERM or SECONDS pass (at most `MAX_BYTES` of payload kept).

`streams(path)` reassembles them per direction (by sequence number, so
retransmissions count once); `tls_records(data)` walks a stream as TLS
records and says whether every byte is framed as TLS.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time
from collections import defaultdict

ETH_P_ALL = 0x0003
MAX_BYTES = 32 * 1024 * 1024


def capture(iface: str, out: str, seconds: float) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
    sock.bind((iface, 0))
    sock.settimeout(0.2)
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    kept = 0
    deadline = time.monotonic() + seconds
    with open(out, "w") as f:
        while not stop and time.monotonic() < deadline:
            try:
                frame = sock.recv(65535)  # both directions: sent and received frames
            except TimeoutError:
                continue
            seg = _tcp_payload(frame)
            if seg is None or kept > MAX_BYTES:
                continue
            kept += len(seg["data"])
            seg["data"] = seg["data"].hex()
            f.write(json.dumps(seg) + "\n")
            f.flush()


def _tcp_payload(frame: bytes) -> dict | None:
    if len(frame) < 14 or frame[12:14] != b"\x08\x00":  # IPv4 only
        return None
    ip = frame[14:]
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
        return None
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    tcp = ip[ihl:total]
    if len(tcp) < 20:
        return None
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    off = (tcp[12] >> 4) * 4
    data = tcp[off:]
    if not data:
        return None
    return {
        "src": socket.inet_ntoa(ip[12:16]),
        "dst": socket.inet_ntoa(ip[16:20]),
        "sport": sport,
        "dport": dport,
        "seq": seq,
        "data": data,
    }


def streams(path: str) -> dict[tuple[str, int, str, int], bytes]:
    """(src, sport, dst, dport) -> the bytes sent that way, reassembled."""
    segs: dict[tuple, dict[int, bytes]] = defaultdict(dict)
    with open(path) as f:
        for line in f:
            s = json.loads(line)
            segs[(s["src"], s["sport"], s["dst"], s["dport"])][s["seq"]] = bytes.fromhex(s["data"])
    out = {}
    for key, by_seq in segs.items():
        first = min(by_seq)
        data = bytearray()
        for seq in sorted(by_seq):  # no wrap-around in a short test capture
            chunk = by_seq[seq]
            at = seq - first
            if at + len(chunk) <= len(data):
                continue  # retransmitted
            data[at:] = chunk
        out[key] = bytes(data)
    return out


def tls_records(data: bytes) -> tuple[list[int], bool]:
    """The content types of the TLS records `data` is made of, and whether all of
    it is TLS framing (a record cut by the end of the capture counts as framed)."""
    types = []
    pos = 0
    while pos + 5 <= len(data):
        ctype, major, length = (
            data[pos],
            data[pos + 1],
            struct.unpack("!H", data[pos + 3 : pos + 5])[0],
        )
        if ctype not in (20, 21, 22, 23) or major != 3 or length > (1 << 14) + 2048:
            return types, False
        types.append(ctype)
        pos += 5 + length
    return types, True


if __name__ == "__main__":
    capture(sys.argv[1], sys.argv[2], float(sys.argv[3]))
