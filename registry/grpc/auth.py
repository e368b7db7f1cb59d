"""Who is calling: the caller's node, from the certificate its TLS handshake verified.

Connections reach the gRPC server through the TLS listener of
`registry.grpc.server`, which verifies an optional client certificate against
the CA roots and records, per connection, what it saw (`Peer`), keyed by the
loopback port it forwards the connection from. An RPC looks its connection
up by `context.peer()`; a connection the listener did not forward (someone
reaching the internal port directly) has no entry and is refused.

Per RPC: `Join` needs only a forwarded connection (the join token is its
credential); everything else needs a certificate whose SPIFFE ID is an agent
ID of this trust domain (`spiffe://<td>/agent/client/dc/<dc>/id/<node>`),
which names the caller's node; the servicer then checks, on the database,
that this very certificate is still the node's (`enrollment.authenticate`:
issued by the join flow, bound to the node's current ID, not revoked).
Anything else: UNAUTHENTICATED (no or an
unusable certificate) or PERMISSION_DENIED (a valid certificate that is not
an agent's, e.g. a service leaf).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc

from meshproto import spiffe


@dataclass(frozen=True)
class Peer:
    """One client connection as the TLS listener saw it."""

    host: str  # the client's address
    port: int
    uris: tuple[str, ...] = ()  # URI SANs of a verified client certificate; () without one
    serial: str = ""  # the verified client certificate's serial (hex), "" without one


@dataclass(frozen=True)
class Caller:
    """An authenticated agent."""

    node: str
    datacenter: str
    spiffe_id: str
    peer: Peer

    @property
    def serial(self) -> str:
        """The certificate's serial: `enrollment.authenticate` checks it is still bound
        to the node (issued by the join flow, not replaced, not revoked)."""
        return self.peer.serial


class PeerTable:
    """Forwarded connections by the loopback port they arrive from (thread-safe)."""

    def __init__(self) -> None:
        self._peers: dict[int, Peer] = {}
        self._lock = threading.Lock()

    def add(self, local_port: int, peer: Peer) -> None:
        with self._lock:
            self._peers[local_port] = peer

    def remove(self, local_port: int) -> None:
        with self._lock:
            self._peers.pop(local_port, None)

    def lookup(self, grpc_peer: str) -> Peer | None:
        """The connection behind `context.peer()` (`ipv4:127.0.0.1:<port>`).

        Only 127.0.0.1 is the listener: a local process connecting from another
        loopback address with the same port number is nobody.
        """
        kind, _, rest = grpc_peer.partition(":")
        host, _, port = rest.rpartition(":")
        if kind != "ipv4" or host != "127.0.0.1" or not port.isdigit():
            return None
        with self._lock:
            return self._peers.get(int(port))

    def __len__(self) -> int:
        return len(self._peers)


class AuthError(Exception):
    """Refuse the RPC with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def peer_of(context: grpc.aio.ServicerContext, peers: PeerTable) -> Peer:
    """The forwarded connection of this RPC, or UNAUTHENTICATED."""
    peer = peers.lookup(context.peer() or "")
    if peer is None:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED, "connect through the control plane's TLS listener"
        )
    return peer


def caller_of(context: grpc.aio.ServicerContext, peers: PeerTable, trust_domain: str) -> Caller:
    """The agent making this RPC, from its verified node certificate."""
    peer = peer_of(context, peers)
    if not peer.uris:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "a node certificate is required (join first, then present it as the client certificate)",
        )
    ids = [u for u in peer.uris if u.startswith("spiffe://")]
    if len(ids) != 1:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED, "the client certificate has no single SPIFFE ID"
        )
    try:
        parsed = spiffe.parse(ids[0])
    except spiffe.SpiffeError:
        parsed = None
    if not isinstance(parsed, spiffe.AgentID):
        raise AuthError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{ids[0]} is not an agent identity (spiffe://<trust-domain>/agent/client/dc/<dc>/id/<node>)",
        )
    if parsed.trust_domain != trust_domain:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            f'the client certificate is for trust domain "{parsed.trust_domain}", not "{trust_domain}"',
        )
    return Caller(node=parsed.node, datacenter=parsed.datacenter, spiffe_id=parsed.uri, peer=peer)
