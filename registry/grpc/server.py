"""The agent protocol's listener: TLS in front of a grpc.aio server.

`mesh server` starts it from its lifespan (`start_grpc`), on uvicorn's event
loop, so the servicer's change-hub watches live on the loop the hub wakes.

Why a TLS front instead of grpc's own TLS: the protocol needs client
certificates that are *optional* at the TLS layer (an agent joins before it
has one) and *verified and checked per RPC* afterwards. grpcio's Python API
offers only "require and verify" or "do not ask" (`require_client_auth`), so
the TLS handshake is done here with the standard library (`CERT_OPTIONAL`:
asked for, verified against the CA roots when presented, not required), and
the decrypted HTTP/2 bytes are spliced to the grpc server on an internal
loopback port. Each forwarded connection is recorded in a `PeerTable` by its
loopback source port; the servicer looks up `context.peer()` there
(`registry.grpc.auth`). A connection that did not come through this listener
has no entry and every RPC on it is refused.

Consequences worth knowing: a certificate our CA did not sign (or an expired
one) fails the TLS handshake itself, so such a client sees UNAVAILABLE, not
an RPC error; a client with no certificate completes the handshake and gets
UNAUTHENTICATED from any RPC but `Join`.

The server certificate is issued by the active CA root at start-up (SANs: the
listen address — every local address for a wildcard —, `server.<dc>.mesh`,
`localhost`), renewed at half its lifetime and whenever the CA roots change
(rotation); new handshakes use the new certificate and roots, open
connections live on. The chain it presents ends with the active root so that
an agent can find the root its `-ca-pin` names.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import socket
import ssl
import struct
import tempfile

import grpc
from django.utils import timezone

from meshproto.proto import mesh_pb2_grpc
from registry import db
from registry import topics as topic
from registry.changes import hub
from registry.domain import enrollment
from registry.grpc.auth import Peer, PeerTable
from registry.grpc.servicer import AgentControlServicer

log = logging.getLogger("meshweb.grpc")

HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
DRAIN_TIMEOUT = 60.0
CHUNK = 64 * 1024
DRAIN_ABOVE = 64 * 1024  # asyncio's default high-water mark
RETRY_SECONDS = 10.0
GRACE_SECONDS = 2.0

# Agents ping every 15 s without calls (keepalive); allow it instead of
# answering GOAWAY "too_many_pings".
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _local_addresses() -> list[str]:
    """Every IPv4 address of this host's interfaces, and its host name."""
    found = ["127.0.0.1", "::1", socket.gethostname()]
    SIOCGIFADDR = 0x8915
    for _index, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(
                    s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode())
                )
            except OSError:
                continue
        found.append(socket.inet_ntoa(packed[20:24]))
    return list(dict.fromkeys(found))


def certificate_hosts(host: str) -> list[str]:
    """What the server certificate names for a listen host."""
    if _wildcard(host):
        return _local_addresses()
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return [host]
    return [str(ip)]


def server_context(cert: enrollment.ServerCert) -> ssl.SSLContext:
    """TLS 1.2+, h2 only, client certificates asked for and verified against the roots
    when presented (not required)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    # load_cert_chain reads files only: a private directory, removed at once.
    with tempfile.TemporaryDirectory(prefix="mesh-grpc-") as tmp:
        os.chmod(tmp, 0o700)
        chain, key = os.path.join(tmp, "chain.pem"), os.path.join(tmp, "key.pem")
        for path, text in ((chain, cert.chain_pem), (key, cert.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        ctx.load_cert_chain(chain, key)
    ctx.load_verify_locations(cadata="".join(cert.roots_pem))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class AgentProtocolServer:
    """The TLS listener, the internal grpc.aio server and the certificate's upkeep."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.peers = PeerTable()
        self.cert: enrollment.ServerCert | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self._grpc: grpc.aio.Server | None = None
        self._internal_port = 0
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task | None = None
        self._connections: set[asyncio.Task] = set()
        self._upkeep: asyncio.Task | None = None
        self.servicer: AgentControlServicer | None = None

    async def start(self) -> None:
        await self._issue()
        trust_domain = await db.run(enrollment.connect_ca.trust_domain)
        self.servicer = AgentControlServicer(self.peers, trust_domain)
        self._grpc = grpc.aio.server(options=SERVER_OPTIONS)
        mesh_pb2_grpc.add_AgentControlServicer_to_server(self.servicer, self._grpc)
        self._internal_port = self._grpc.add_insecure_port("127.0.0.1:0")
        await self._grpc.start()
        try:
            self._sock = _listen(self.host, self.port)
        except OSError:
            await self._grpc.stop(None)
            raise
        self._acceptor = asyncio.create_task(self._accept_loop(), name="grpc-accept")
        self._upkeep = asyncio.create_task(self._keep_certificate(), name="grpc-cert")
        log.info("agent protocol (gRPC, TLS) on %s:%s", self.host, self.port)

    async def stop(self, grace: float = GRACE_SECONDS) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceptor
        if self._sock is not None:
            self._sock.close()
        if self.servicer is not None:
            self.servicer.close()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    # --- certificate -------------------------------------------------------------------

    async def _issue(self) -> None:
        cert = await db.run(enrollment.issue_server_certificate, certificate_hosts(self.host))
        self.ssl_context = server_context(cert)  # new handshakes only
        self.cert = cert
        log.info(
            "gRPC server certificate issued (root %s, renew at %s)", cert.root_id, cert.renew_at
        )

    async def _keep_certificate(self) -> None:
        """Renew at half-life, and on any change of the CA roots (rotation, retirement)."""
        while True:
            waiter = hub.watch([topic.CA_ROOTS])
            try:
                remaining = (self.cert.renew_at - timezone.now()).total_seconds()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter.future), max(remaining, 0.0))
            finally:
                hub.unwatch(waiter)
            try:
                roots = await db.run(enrollment.roots_pem)
                due = timezone.now() >= self.cert.renew_at - dt.timedelta(seconds=1)
                if due or tuple(roots) != self.cert.roots_pem:
                    await self._issue()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not renew the gRPC server certificate; retrying")
                await asyncio.sleep(RETRY_SECONDS)

    # --- connections -------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _addr = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and the like: do not spin
                log.warning("accepting a gRPC connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._serve(sock))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, sock: socket.socket) -> None:
        """TLS with the context current at accept time, then splice to the grpc server."""
        loop = asyncio.get_running_loop()
        try:
            client = sock.getpeername()
        except OSError:
            sock.close()
            return
        reader = asyncio.StreamReader(limit=CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            # The TLS layer is in place before any byte is read (no ClientHello
            # can be swallowed by a plaintext reader).
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=self.ssl_context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as exc:  # plaintext, a foreign or expired certificate, a timeout
            log.info(
                "TLS handshake with %s:%s refused: %s",
                client[0],
                client[1],
                exc or type(exc).__name__,
            )
            sock.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        cert = writer.get_extra_info("peercert") or {}
        uris = tuple(v for k, v in cert.get("subjectAltName", ()) if k == "URI")
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", self._internal_port, local_addr=("127.0.0.1", 0)
                ),
                CONNECT_TIMEOUT,
            )
        except Exception as exc:
            log.warning("cannot reach the internal gRPC server: %s", exc)
            transport.abort()
            return
        local_port = up_writer.get_extra_info("sockname")[1]
        serial = str(cert.get("serialNumber", "")) if uris else ""
        self.peers.add(local_port, Peer(str(client[0]), int(client[1]), uris, serial))
        try:
            await _splice(reader, writer, up_reader, up_writer)
        finally:
            self.peers.remove(local_port)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket (IPv4 or IPv6 by the host's form; "" listens everywhere)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server(
        (host.strip("[]") or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port),
        family=family,
        backlog=1024,
        reuse_port=False,
    )
    sock.setblocking(False)
    return sock


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            return
        writer.write(data)
        # Flow control: stop reading while the other side is not taking the
        # bytes (only then: `wait_for` makes a task, a cost on every message).
        if writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
            await asyncio.wait_for(writer.drain(), DRAIN_TIMEOUT)


async def _splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until either side closes or fails, then close both."""
    tasks = [
        asyncio.create_task(_pump(a_reader, b_writer)),
        asyncio.create_task(_pump(b_reader, a_writer)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (a_writer, b_writer):
            with contextlib.suppress(Exception):
                w.close()


async def start_grpc(host: str, port: int) -> asyncio.Task:
    """Start the agent protocol's server; the returned task stops it when cancelled.

    Failing to listen (the port is taken) fails `mesh server`'s start-up.
    """
    server = AgentProtocolServer(host, port)
    await server.start()

    async def run() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    task = asyncio.create_task(run(), name="grpc")
    task.server = server  # type: ignore[attr-defined]
    return task
