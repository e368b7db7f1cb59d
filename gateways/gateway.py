"""The mesh gateway's data path: peek the ClientHello's SNI, splice the stream.

Per accepted connection (`Inbound`):

1. read until the ClientHello is complete (`gateways.sni`), at most
   `sni.MAX_BUFFER` bytes and `hello_timeout` seconds; a stream that is not
   TLS, not a ClientHello, malformed, too large or too slow is closed and
   counted by reason;
2. look the SNI up in the current `RoutingTable`: unknown -> closed
   (`unknown_sni`); known but no endpoint -> closed (`no_healthy_endpoint`);
3. connect to the target's endpoints in round-robin order (a local
   instance's sidecar, or another datacenter's gateway), send the bytes read
   so far unchanged and splice both ways until either side closes.

Nothing is decrypted: the TLS session is between the two sidecars, so the
gateway holds no key. Reading pauses when the other side's write buffer is
full (flow control), so a slow reader never makes the gateway buffer without
bound. A new config swaps the table for new connections; open ones go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter

from gateways import sni
from gateways.routing import RoutingTable, Target

log = logging.getLogger("mesh.gateway")

HELLO_TIMEOUT = 10.0
CONNECT_ATTEMPTS = 3
WRITE_HIGH = 256 * 1024  # a side's write buffer above this pauses the other side's reads

REFUSALS = (*sni.REASONS, "hello_timeout", "unknown_sni", "no_healthy_endpoint", "unreachable")


class Metrics:
    """The gateway's counters (see `render`)."""

    def __init__(self) -> None:
        # (source dc, destination dc, service) -> count / bytes
        self.connections: Counter[tuple[str, str, str]] = Counter()
        self.rx: Counter[tuple[str, str, str]] = Counter()  # bytes from the caller
        self.tx: Counter[tuple[str, str, str]] = Counter()  # bytes back to the caller
        self.refused: Counter[str] = Counter()
        self.connect_failures: Counter[tuple[str, str]] = Counter()  # (destination dc, reason)
        self.accepted = 0
        self.config_version = 0
        self.config_applied = 0
        self.config_rejected = 0
        self.control_connected = 0
        self.started = time.time()

    def render(self, live: set[Inbound]) -> str:
        """Prometheus text (0.0.4); open connections' bytes included."""
        rx, tx = Counter(self.rx), Counter(self.tx)
        active: Counter[tuple[str, str, str]] = Counter()
        for conn in live:
            if conn.key is not None:
                rx[conn.key] += conn.rx
                tx[conn.key] += conn.tx
                active[conn.key] += 1
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{labels} {value}")

        def lab(**kw: str) -> str:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in kw.items())
            return "{" + inner + "}"

        def by_key(counter):
            return [
                (lab(source_dc=s, destination_dc=d, service=svc or "*"), v)
                for (s, d, svc), v in sorted(counter.items())
            ]

        family(
            "mesh_gateway_accepted_total",
            "counter",
            "TCP connections accepted.",
            [("", self.accepted)],
        )
        family(
            "mesh_gateway_connections_total",
            "counter",
            "Streams spliced, by source and destination datacenter and service.",
            by_key(self.connections),
        )
        family(
            "mesh_gateway_active_connections",
            "gauge",
            "Streams being spliced now.",
            by_key(active),
        )
        family(
            "mesh_gateway_received_bytes_total",
            "counter",
            "Bytes read from callers.",
            by_key(rx),
        )
        family(
            "mesh_gateway_sent_bytes_total",
            "counter",
            "Bytes written back to callers.",
            by_key(tx),
        )
        family(
            "mesh_gateway_refused_total",
            "counter",
            "Streams closed before splicing, by reason.",
            [(lab(reason=r), self.refused[r]) for r in REFUSALS],
        )
        family(
            "mesh_gateway_connect_failures_total",
            "counter",
            "Failed connections to endpoints, by destination datacenter and reason.",
            [
                (lab(destination_dc=d, reason=r), v)
                for (d, r), v in sorted(self.connect_failures.items())
            ],
        )
        family(
            "mesh_gateway_config_version",
            "gauge",
            "Version of the routing table in force.",
            [("", self.config_version)],
        )
        family(
            "mesh_gateway_config_applied_total",
            "counter",
            "Configs applied.",
            [("", self.config_applied)],
        )
        family(
            "mesh_gateway_config_rejected_total",
            "counter",
            "Configs rejected.",
            [("", self.config_rejected)],
        )
        family(
            "mesh_gateway_control_connected",
            "gauge",
            "1 while connected to the agent.",
            [("", self.control_connected)],
        )
        return "\n".join(out) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Gateway:
    """Holds the routing table in force and the open connections."""

    def __init__(
        self, metrics: Metrics | None = None, hello_timeout: float = HELLO_TIMEOUT
    ) -> None:
        self.metrics = metrics or Metrics()
        self.table = RoutingTable()
        self.connect_timeout = 5.0
        self.hello_timeout = hello_timeout
        self.conns: set[Inbound] = set()

    def set_table(self, table: RoutingTable, connect_timeout: float = 5.0) -> None:
        self.table = table
        self.connect_timeout = connect_timeout
        self.metrics.config_version = table.version
        self.metrics.config_applied += 1

    def protocol(self) -> Inbound:
        return Inbound(self)

    async def drain(self, timeout: float) -> None:
        """Let open streams finish for up to `timeout` seconds, then cut them."""
        deadline = time.monotonic() + timeout
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.conns):
            conn.abort()


class _Side(asyncio.Protocol):
    """Flow-control plumbing shared by both halves of a splice."""

    transport: asyncio.Transport | None = None
    other: _Side | None = None

    def pause_writing(self) -> None:  # our write buffer is full: stop reading the other side
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class Inbound(_Side):
    """One caller's stream through the gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.buf = bytearray()
        self.state = "hello"  # hello | connecting | splicing | closed
        self.timer: asyncio.TimerHandle | None = None
        self.key: tuple[str, str, str] | None = None
        self.rx = 0
        self.tx = 0
        self.peer_ip = ""
        self.eof = False

    # --- the caller's side ------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        _nodelay(transport)
        self.gw.conns.add(self)
        self.gw.metrics.accepted += 1
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        self.timer = asyncio.get_running_loop().call_later(self.gw.hello_timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self.state == "splicing":
            self.rx += len(data)
            self.other.transport.write(data)  # type: ignore[union-attr]
            return
        if self.state != "hello":
            self.buf += data  # connecting: kept until the other side is up
            return
        self.buf += data
        try:
            hello = sni.parse_client_hello(bytes(self.buf))
        except sni.HelloError as exc:
            self._refuse(exc.reason)
            return
        if hello is None:
            return
        target = self.gw.table.lookup(hello.sni) if hello.sni else None
        if target is None:
            self._refuse("unknown_sni", sni=hello.sni)
            return
        if not target.endpoints:
            self._refuse("no_healthy_endpoint", sni=hello.sni)
            return
        self._cancel_timer()
        self.state = "connecting"
        self.transport.pause_reading()  # type: ignore[union-attr]
        # A stream leaving for another datacenter comes from a caller here; one
        # for a local service, from here or from a remote gateway (by address).
        source = (
            self.gw.table.datacenter
            if target.kind == "remote"
            else self.gw.table.source_dc(self.peer_ip)
        )
        self.key = (source, target.datacenter, target.service)
        asyncio.get_running_loop().create_task(self._connect(target))

    def eof_received(self) -> bool:
        self.eof = True
        if self.state == "splicing" and self.other is not None and self.other.transport:
            return _half_close(self, self.other)
        if self.state == "hello":
            self._refuse("malformed" if self.buf else "not_tls")
        return self.state == "connecting"

    def connection_lost(self, exc) -> None:
        self._cancel_timer()
        self.state = "closed"
        self.gw.conns.discard(self)
        if self.key is not None:
            self.gw.metrics.rx[self.key] += self.rx
            self.gw.metrics.tx[self.key] += self.tx
            self.rx = self.tx = 0
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    # --- connecting -------------------------------------------------------------------

    async def _connect(self, target: Target) -> None:
        loop = asyncio.get_running_loop()
        for address in target.order()[:CONNECT_ATTEMPTS]:
            if self.state != "connecting":
                return
            try:
                _, outbound = await asyncio.wait_for(
                    loop.create_connection(lambda: Outbound(self), address[0], address[1]),
                    self.gw.connect_timeout,
                )
            except (TimeoutError, OSError) as exc:
                reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                self.gw.metrics.connect_failures[(target.datacenter, reason)] += 1
                log.debug("endpoint unreachable: %s:%s (%s)", address[0], address[1], reason)
                continue
            if self.state != "connecting":  # the caller left meanwhile
                outbound.transport.close()  # type: ignore[union-attr]
                return
            self.other, outbound.other = outbound, self
            self.state = "splicing"
            assert self.key is not None
            self.gw.metrics.connections[self.key] += 1
            if self.buf:
                self.rx += len(self.buf)
                outbound.transport.write(bytes(self.buf))  # type: ignore[union-attr]
                self.buf = bytearray()
            if self.eof and outbound.transport.can_write_eof():  # type: ignore[union-attr]
                outbound.transport.write_eof()  # type: ignore[union-attr]
            self.transport.resume_reading()  # type: ignore[union-attr]
            return
        if self.state == "connecting":
            self.key = None
            self._refuse("unreachable")

    # --- closing ----------------------------------------------------------------------

    def _too_slow(self) -> None:
        self.timer = None
        if self.state == "hello":
            self._refuse("hello_timeout")

    def _refuse(self, reason: str, **fields) -> None:
        self.gw.metrics.refused[reason] += 1
        log.debug("refused %s %s from %s", reason, fields or "", self.peer_ip)
        self.state = "closed"
        self.buf = bytearray()
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.other is not None and self.other.transport is not None:
            self.other.transport.abort()


def _nodelay(transport) -> None:
    """Segments go out as they come in: a spliced TLS record must not wait for Nagle."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _half_close(side: _Side, other: _Side) -> bool:
    """`side` read EOF: pass it on; once both directions ended, close both.
    True keeps `side`'s transport open (the answer may still come back)."""
    t = other.transport
    if t is None or t.is_closing() or not t.can_write_eof() or getattr(other, "eof", False):
        if t is not None:
            t.close()
        return False
    t.write_eof()
    return True


class Outbound(_Side):
    """The gateway's connection to the endpoint chosen for one stream."""

    def __init__(self, inbound: Inbound) -> None:
        self.inbound = inbound
        self.eof = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        inbound = self.inbound
        inbound.tx += len(data)
        if inbound.transport is not None:
            inbound.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        return _half_close(self, self.inbound)

    def connection_lost(self, exc) -> None:
        t = self.inbound.transport
        if self.inbound.state == "splicing" and t is not None:
            t.close()
