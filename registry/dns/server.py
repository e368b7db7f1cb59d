"""The DNS server's I/O: UDP and TCP listeners on the server's event loop.

`handle(wire, tcp=...)` is the whole protocol (parse, classify, read on the
database pool, answer, render); the listeners only move bytes. Every packet
becomes a task, never a thread; reads go through the bounded DB pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time

import dns.exception
import dns.flags
import dns.message
import dns.rcode
from django.conf import settings

from registry import db
from registry.dns import data, names
from registry.dns.answers import DNSConfig, Reply, answer, max_payload, render

log = logging.getLogger("meshweb.dns")

READ_TIMEOUT = 5.0  # a database read slower than this answers SERVFAIL
TCP_IDLE_TIMEOUT = 10.0  # an idle TCP connection is closed after this
TCP_WRITE_TIMEOUT = 10.0
MAX_UDP_IN_FLIGHT = 1024  # beyond this, datagrams are dropped (clients retry)


def config_from_settings() -> DNSConfig:
    return DNSConfig.make(settings.MESH_DNS_DOMAIN, settings.MESH_DC, settings.MESH_DNS_SERVICE_TTL)


def _formerr(wire: bytes) -> bytes | None:
    """A header-only FORMERR for a query we cannot parse; None if it is not a query."""
    if len(wire) < 12:
        return None
    msg_id, flags = struct.unpack("!HH", wire[:4])
    if flags & dns.flags.QR:
        return None  # never answer a response: that is how loops start
    flags = dns.flags.QR | (flags & (0x7800 | dns.flags.RD)) | dns.rcode.FORMERR
    return struct.pack("!HHHHHH", msg_id, flags, 0, 0, 0, 0)


class Resolver:
    """Turns query bytes into response bytes (or None: no answer at all)."""

    def __init__(self, config: DNSConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()

    async def handle(self, wire: bytes, *, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return _formerr(wire)
        except Exception:  # dnspython raises a few non-DNS errors on odd input
            return _formerr(wire)
        if query.flags & dns.flags.QR:
            return None
        reply = await self._reply(query)
        msg = render(query, reply, max_payload(query, tcp=tcp))
        return msg.to_wire(max_size=max_payload(query, tcp=True))

    async def _reply(self, query: dns.message.Message) -> Reply:
        if query.edns > 0:
            return Reply(rcode=dns.rcode.BADVERS)
        lookup = names.classify(query, self.config.domain, self.config.dc)
        if isinstance(lookup, int):
            return Reply(rcode=lookup)
        found = None
        if data.needs_read(lookup):
            try:
                found = await asyncio.wait_for(db.run(data.read, lookup), READ_TIMEOUT)
            except Exception:
                log.exception("DNS lookup failed: %s", query.question[0].name)
                return Reply(rcode=dns.rcode.SERVFAIL)
        now = time.time()
        return answer(query.question[0], lookup, found, self.config, now=now, rng=self.rng)


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task] = set()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, wire: bytes, addr) -> None:
        if len(self.pending) >= MAX_UDP_IN_FLIGHT:
            return
        task = asyncio.get_running_loop().create_task(self._answer(wire, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _answer(self, wire: bytes, addr) -> None:
        try:
            out = await self.resolver.handle(wire, tcp=False)
        except Exception:
            log.exception("DNS query from %s failed", addr)
            out = _formerr(wire)
        if out is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable for a client that went away: nothing to do.
        log.debug("DNS UDP error: %s", exc)


class _TCPServer:
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.connections: set[asyncio.Task] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
        try:
            while True:
                size = struct.unpack(
                    "!H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                )[0]
                wire = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_TIMEOUT)
                out = await self.resolver.handle(wire, tcp=True)
                if out is None:
                    break  # not a query: do not keep talking
                writer.write(struct.pack("!H", len(out)) + out)
                await asyncio.wait_for(writer.drain(), TCP_WRITE_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("DNS TCP connection failed")
        finally:
            if task is not None:
                self.connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)


async def start_dns(host: str, port: int, config: DNSConfig | None = None) -> None:
    """Serve DNS on `host:port` (UDP and TCP) until cancelled."""
    loop = asyncio.get_running_loop()
    resolver = Resolver(config or config_from_settings())
    tcp = _TCPServer(resolver)
    udp_transport = None
    tcp_server = None
    try:
        udp_transport, udp = await loop.create_datagram_endpoint(
            lambda: _UDPProtocol(resolver), local_addr=(host, port)
        )
        tcp_server = await asyncio.start_server(tcp.serve, host, port)
        log.info("DNS listening on %s:%d (UDP and TCP) for %s", host, port, resolver.config.domain)
        await asyncio.Event().wait()  # until cancelled
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("DNS server on %s:%d failed", host, port)
        raise
    finally:
        if tcp_server is not None:
            tcp_server.close()
        for task in list(tcp.connections):
            task.cancel()
        if udp_transport is not None:
            udp_transport.close()
            for task in list(udp.pending):
                task.cancel()
