"""The agent's side of the gRPC protocol: trust bootstrap, identity, channels.

Trust bootstrap (first start): the agent opens a TLS connection to the
control plane WITHOUT verifying it, only to read the certificate chain the
server presents, and looks in it for a certificate whose SHA-256 (of its DER)
equals `-ca-pin`: that is the CA root. From then on that root is the only
trust anchor: the `Join` call itself already runs over TLS verified against
it, so a server that merely replays the chain cannot answer it. The trust
domain comes from the root's URI SAN (`spiffe://<trust-domain>`, which the CA
puts there) and the datacenter from the server certificate's DNS SAN
`server.<dc>.mesh` (unless `-dc` says), so the node CSR can be built before
`Join` answers.

Identity on disk (`<data-dir>/identity/`, files 0600): `node.key` (born here,
never sent), `node.crt`, `roots.pem`, `identity.json` (node, dc, trust domain,
node ID). Later starts reuse them; the agent rejoins only when they are
missing or the certificate expired.

Every RPC has a deadline; reconnects use exponential backoff with full
jitter (`Backoff`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import random
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from meshproto import pki, spiffe
from meshproto.proto import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger("mesh.agent.client")


class JoinError(Exception):
    """The agent cannot (or must not) join; the message says why and what to do."""


class Backoff:
    """Exponential backoff with full jitter: sleep U(0, min(cap, base * 2**n))."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * (2**self.attempt)))
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        self.attempt = 0


# --- bootstrap ----------------------------------------------------------------------


def fetch_server_chain(host: str, port: int, timeout: float = 10.0) -> list[bytes]:
    """The DER certificates the server presents, unverified (only to find the pinned root)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])  # gRPC servers insist on h2
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        chain = None
        if hasattr(tls, "get_unverified_chain"):  # Python 3.13+
            chain = tls.get_unverified_chain()
        else:  # 3.10-3.12 have it on the private SSL object
            chain = tls._sslobj.get_unverified_chain()  # type: ignore[union-attr]
        out = []
        for c in chain or []:
            out.append(c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
        if not out:
            leaf = tls.getpeercert(binary_form=True)
            out = [leaf] if leaf else []
        return out


def pin_of(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def find_pinned(chain: list[bytes], pin: str) -> bytes | None:
    for der in chain:
        if pin_of(der) == pin:
            return der
    return None


def trust_domain_of(root: x509.Certificate) -> str:
    for uri in pki.uri_sans(root):
        if uri.startswith("spiffe://"):
            return spiffe.check_trust_domain(uri[len("spiffe://") :].rstrip("/"))
    raise JoinError("the pinned root has no spiffe://<trust-domain> URI SAN")


def datacenter_of(server_cert: x509.Certificate) -> str:
    for name in pki.dns_sans(server_cert):
        if name.startswith("server.") and name.endswith(".mesh") and name.count(".") == 2:
            return name.split(".")[1]
    return ""


# --- identity on disk -----------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """This node's credentials and what it learnt when it joined."""

    node: str
    node_id: str
    datacenter: str
    trust_domain: str
    key_pem: str
    cert_pem: str
    roots_pem: tuple[str, ...]
    server_name: str = ""  # the name the control plane's certificate is checked for
    # The join token's service scope (names, `prefix*`, `*`); None: not known (an
    # identity saved before scopes existed), then only the control plane checks it.
    services: tuple[str, ...] | None = None

    @property
    def not_after(self) -> dt.datetime:
        return pki.load_cert(self.cert_pem).not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return pki.load_cert(self.cert_pem).not_valid_before_utc


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class IdentityStore:
    """`<data-dir>/identity/`: the node key, certificate, roots and metadata."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "identity"

    def load(self) -> Identity | None:
        try:
            meta = json.loads((self.dir / "identity.json").read_text())
            key = (self.dir / "node.key").read_text()
            cert = (self.dir / "node.crt").read_text()
            roots = (self.dir / "roots.pem").read_text()
        except (OSError, ValueError):
            return None
        return Identity(
            node=meta["node"],
            node_id=meta.get("node_id", ""),
            datacenter=meta["datacenter"],
            trust_domain=meta["trust_domain"],
            key_pem=key,
            cert_pem=cert,
            roots_pem=tuple(pki.cert_pem(c) for c in pki.load_certs(roots)),
            server_name=meta.get("server_name", ""),
            services=tuple(meta["services"]) if isinstance(meta.get("services"), list) else None,
        )

    def save(self, ident: Identity) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        write_private(self.dir / "node.key", ident.key_pem)
        write_private(self.dir / "node.crt", ident.cert_pem)
        write_private(self.dir / "roots.pem", "".join(ident.roots_pem))
        meta = {
            "node": ident.node,
            "node_id": ident.node_id,
            "datacenter": ident.datacenter,
            "trust_domain": ident.trust_domain,
            "server_name": ident.server_name,
        }
        if ident.services is not None:
            meta["services"] = list(ident.services)
        write_private(self.dir / "identity.json", json.dumps(meta, indent=1) + "\n")


def usable(ident: Identity | None, node: str) -> bool:
    """A stored identity the agent can keep using (same node, certificate not expired)."""
    if ident is None or ident.node != node:
        return False
    try:
        return ident.not_after > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    except ValueError:
        return False


# --- channels -------------------------------------------------------------------------

KEEPALIVE = [
    ("grpc.keepalive_time_ms", 15000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Our Backoff decides when to reconnect; keep gRPC's own short.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def channel(
    target: str,
    roots_pem: str,
    server_name: str,
    *,
    key_pem: str | None = None,
    cert_pem: str | None = None,
) -> grpc.aio.Channel:
    """A TLS channel trusting only `roots_pem`, presenting the node cert when given."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots_pem.encode(),
        private_key=key_pem.encode() if key_pem else None,
        certificate_chain=cert_pem.encode() if cert_pem else None,
    )
    options = [*KEEPALIVE]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, creds, options=options)


def mtls_channel(target: str, ident: Identity) -> grpc.aio.Channel:
    return channel(
        target,
        "".join(ident.roots_pem),
        ident.server_name,
        key_pem=ident.key_pem,
        cert_pem=ident.cert_pem,
    )


async def join(
    *,
    host: str,
    port: int,
    pin: str,
    token: str,
    node: str,
    address: str,
    datacenter: str,
    meta: dict[str, str],
    timeout: float,
    replace: bool = False,
) -> Identity:
    """First contact: pin the root, then exchange the join token and a node CSR.

    Raises JoinError for what retrying cannot fix (pin mismatch, refused
    token); connection errors propagate (OSError / grpc.aio.AioRpcError) so
    the caller retries with backoff.
    """
    import asyncio

    chain = await asyncio.to_thread(fetch_server_chain, host, port, timeout)
    root_der = find_pinned(chain, pin)
    if root_der is None:
        seen = ", ".join("sha256:" + pin_of(d) for d in chain) or "none"
        raise JoinError(
            f"-ca-pin sha256:{pin} matches no certificate the server at {host}:{port} presented "
            f"(it presented: {seen}); refusing to join. Check the pin printed by "
            "`mesh join-token create` and that -join names the right server."
        )
    root = x509.load_der_x509_certificate(root_der)
    trust_domain = trust_domain_of(root)
    dc = datacenter
    if not dc and chain:
        dc = datacenter_of(x509.load_der_x509_certificate(chain[0]))
    dc = dc or "dc1"
    key = pki.generate_key()
    csr = pki.make_csr(key, spiffe.agent_id(trust_domain, node, dc).uri)
    root_pem = pki.cert_pem(root)
    server_name = datacenter_of(x509.load_der_x509_certificate(chain[0])) if chain else ""
    name = f"server.{server_name}.mesh" if server_name else ""
    async with channel(f"{host}:{port}", root_pem, name) as ch:
        stub = mesh_pb2_grpc.AgentControlStub(ch)
        try:
            resp = await stub.Join(
                mesh_pb2.JoinRequest(
                    join_token=token,
                    node_name=node,
                    address=address,
                    csr_pem=csr,
                    meta=meta,
                    datacenter=datacenter,
                    replace=replace,
                ),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.NOT_FOUND,
            ):
                raise JoinError(f"the control plane refused to join: {exc.details()}") from None
            raise
    cert = pki.load_cert(resp.cert_pem)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise JoinError("the control plane answered Join with a certificate for another key")
    roots = tuple(resp.roots_pem) or (root_pem,)
    return Identity(
        node=node,
        node_id=resp.node_id,
        datacenter=resp.datacenter or dc,
        trust_domain=resp.trust_domain or trust_domain,
        key_pem=pki.key_pem(key),
        cert_pem=resp.cert_pem,
        roots_pem=roots,
        server_name=name,
        services=tuple(resp.services),
    )
