"""Enrollment: joining, node certificates, leaves for a node's services, the
server's own certificate.

- `join`: a join token + a node CSR -> the node in the catalog (`mesh-role: agent`)
  and its certificate (SPIFFE `spiffe://<td>/agent/client/dc/<dc>/id/<node>`),
  atomically with the token's use (a bad CSR does not burn a token);
- `sign_leaf`: leaves for the services registered on the caller's node only;
- `issue_server_certificate`: the gRPC server's own TLS certificate.

Callers are identified by the adapter (node certificate -> node name); the
functions here trust the node name they are given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from django.conf import settings
from django.db.models import Q

from meshproto import pki, spiffe
from registry.acl_rules import Authorizer, parse_rules
from registry.domain import catalog, connect_ca, join_tokens, shapes
from registry.domain.acl import Identity
from registry.errors import BadRequest, PermissionDenied
from registry.models import IssuedCert, Node, ServiceInstance
from registry.txn import Change

log = logging.getLogger(__name__)

ROLE_KEY = "mesh-role"
ROLE_AGENT = "agent"
MAX_META_KEYS = 64
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --- CA pin and the server's certificate ---------------------------------------------


def ca_pin() -> str:
    """`sha256:<hex>` of the active root's DER: what an agent checks before trusting us."""
    _index, data = connect_ca.roots_json()
    active = next(r for r in data["Roots"] if r["Active"])
    der = pki.load_cert(active["RootCert"]).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def roots_pem() -> list[str]:
    """Every trusted root certificate (PEM), the active one first."""
    _index, data = connect_ca.roots_json()
    roots = sorted(data["Roots"], key=lambda r: not r["Active"])
    return [_nl(r["RootCert"]) for r in roots]


def _nl(pem: str) -> str:
    return pem if pem.endswith("\n") else pem + "\n"


def server_spiffe_id(trust_domain: str, dc: str) -> str:
    """Consul's server identity form: `spiffe://<td>/agent/server/dc/<dc>`."""
    return f"spiffe://{trust_domain}/agent/server/dc/{dc}"


@dataclass(frozen=True)
class ServerCert:
    """The gRPC server's TLS material, issued by the active root."""

    chain_pem: str  # leaf, its intermediates, then the active root (so agents can pin it)
    key_pem: str
    roots_pem: tuple[str, ...]  # trust anchors for client certificates
    root_id: str
    not_after: dt.datetime
    renew_at: dt.datetime


def issue_server_certificate(hosts: Iterable[str]) -> ServerCert:
    """Sign a server certificate for the agent protocol's listener.

    SANs: the IPs and host names in `hosts`, `server.<dc>.mesh` and
    `localhost`. The key is made here and never stored; the certificate is
    recorded as issued (kind `server`) so that a root is not retired under it.
    """
    dc = settings.MESH_DC
    ips, names = [], [f"server.{dc}.mesh", "localhost"]
    for host in hosts:
        if not host:
            continue
        try:
            ips.append(str(_ip(host)))
        except ValueError:
            names.append(host.lower())
    state = connect_ca.signing_state()
    key = pki.generate_key(state.settings.key_type, state.settings.key_bits)
    uri = server_spiffe_id(state.trust_domain, dc)
    csr = x509.load_pem_x509_csr(pki.make_csr(key, uri).encode())
    cert = state.provider.sign_leaf(
        state.signer,
        csr,
        uri,
        list(dict.fromkeys(names)),
        dt.timedelta(seconds=state.settings.effective_leaf_ttl),
        f"server.{dc}.mesh",
        ip_addresses=list(dict.fromkeys(ips)),
    )
    info = pki.info(cert)
    with Change() as w:
        IssuedCert.objects.create(
            serial=info.serial,
            spiffe_id=uri,
            kind="server",
            name=f"server.{dc}",
            root_id=state.root_id,
            not_after=info.not_after,
        )
        w.audit("ca.sign", "ca-leaf-server", info.serial, None, {"SpiffeID": uri})
    roots = roots_pem()
    chain = "".join(_nl(p) for p in (pki.cert_pem(cert), *state.intermediates)) + roots[0]
    issued = info.not_before + connect_ca.BACKDATE
    return ServerCert(
        chain_pem=chain,
        key_pem=pki.key_pem(key),
        roots_pem=tuple(roots),
        root_id=state.root_id,
        not_after=info.not_after,
        renew_at=issued + (info.not_after - issued) / 2,
    )


def _ip(text: str):
    import ipaddress

    return ipaddress.ip_address(text.strip("[]"))


def active_root_id() -> str:
    return connect_ca.signing_state().root_id


# --- join ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Joined:
    node_id: str
    cert_pem: str  # the node certificate followed by its intermediates
    roots_pem: tuple[str, ...]
    trust_domain: str
    datacenter: str
    serial: str
    index: int


def _check_node_name(name: str) -> str:
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise BadRequest(
            f"invalid node name {name!r}: letters, digits, '.', '_' and '-', at most 128"
        )
    return name


def _check_meta(meta: dict[str, str] | None) -> dict[str, str]:
    meta = dict(meta or {})
    if len(meta) > MAX_META_KEYS:
        raise BadRequest(f"node meta: at most {MAX_META_KEYS} keys")
    for k, v in meta.items():
        if not isinstance(k, str) or not k or len(k) > 128:
            raise BadRequest(f"node meta: invalid key {k!r}")
        if not isinstance(v, str) or len(v) > 512:
            raise BadRequest(f"node meta: the value of {k!r} must be a string of at most 512")
    meta[ROLE_KEY] = ROLE_AGENT
    return meta


def _node_writer(node: str) -> Authorizer:
    """An authorizer that may write exactly one node (what a join grants)."""
    return Authorizer.from_rules([parse_rules(json.dumps({"node": {node: {"policy": "write"}}}))])


def _service_writer(service: str) -> Authorizer:
    return Authorizer.from_rules(
        [parse_rules(json.dumps({"service": {service: {"policy": "write"}}}))]
    )


def _csr_identity(csr_pem: str) -> spiffe.ServiceID | spiffe.AgentID | None:
    """The SPIFFE ID a CSR asks for, if it parses (else the CA's own checks answer)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
        uris = pki.uri_sans(csr)
    except Exception:
        return None
    if len(uris) != 1:
        return None
    try:
        return spiffe.parse(uris[0])
    except spiffe.SpiffeError:
        return None


def _register_node(change: Change, name: str, address: str, meta: dict[str, str], dc: str) -> Node:
    """Create or update an agent's node. A node another role owns (the server) is refused."""
    datacenter = catalog.ensure_datacenter(dc, change)
    node = Node.objects.select_related("datacenter").select_for_update().filter(name=name).first()
    if node is not None:
        role = (node.meta or {}).get(ROLE_KEY)
        if role not in (None, "", ROLE_AGENT):
            raise PermissionDenied(f'node "{name}" is a {role}; an agent cannot join as it')
    before = shapes.node_json(node) if node is not None else None
    if node is None:
        node = Node(name=name, node_id=str(uuid.uuid4()), create_index=change.index)
    node.address = address
    node.meta = meta
    node.datacenter = datacenter
    node.modify_index = change.index
    node.save()
    change.audit("node.register", "node", name, before, shapes.node_json(node))
    catalog.touch_node_services(change, node)
    return node


def join(
    token: str,
    node_name: str,
    csr_pem: str,
    *,
    address: str = "",
    meta: dict[str, str] | None = None,
    datacenter: str = "",
    peer_host: str = "",
) -> Joined:
    """Exchange a join token and a node CSR for the node's certificate.

    One transaction: the token's use, the node's registration and the
    signing commit together or not at all (a refused CSR leaves the token
    unused and nothing registered). Errors: 401 (`Unauthenticated`) for any
    token that cannot be used, 400 for bad input, 403 for a CSR asking for
    another identity than `spiffe://<td>/agent/client/dc/<token's dc>/id/<node>`
    or a node name the server owns.
    """
    _check_node_name(node_name)
    node_meta = _check_meta(meta)
    address = (address or peer_host or "").strip()
    if not address:
        raise BadRequest("address is required")
    if not isinstance(csr_pem, str) or not csr_pem.strip():
        raise BadRequest("csr_pem is required")
    with Change() as w:
        row = join_tokens.consume(w, token, node_name)
        dc = row.datacenter
        if datacenter and datacenter != dc:
            raise BadRequest(f'the join token is for datacenter "{dc}", not "{datacenter}"')
        td = connect_ca.trust_domain()
        expected = spiffe.agent_id(td, node_name, dc).uri
        wanted = _csr_identity(csr_pem)
        if wanted is not None and wanted.uri != expected:
            raise PermissionDenied(f'Permission denied: the CSR must ask for "{expected}"')
        node = _register_node(w, node_name, address, node_meta, dc)
        identity = Identity(f"join-token:{row.id}", _node_writer(node_name), row.description)
        leaf = connect_ca.sign_csr(identity, csr_pem)
        if leaf.spiffe_id != expected:  # e.g. a CSR our quick parse could not read
            raise PermissionDenied(f'Permission denied: the CSR must ask for "{expected}"')
        w.audit(
            "agent.join",
            "node",
            node_name,
            None,
            {"JoinToken": row.id, "Serial": leaf.serial, "Address": address, "Datacenter": dc},
        )
    log.info("node %s joined (token %s, dc %s)", node_name, row.id, dc)
    return Joined(
        node_id=node.node_id,
        cert_pem=leaf.chain_pem,
        roots_pem=tuple(roots_pem()),
        trust_domain=td,
        datacenter=dc,
        serial=leaf.serial,
        index=w.index,
    )


# --- leaves for the caller's services -------------------------------------------------------


def agent_node(name: str) -> Node:
    """The caller's node (it may have been deregistered since it joined: NotFound)."""
    return catalog.get_node(name)


def sign_leaf(node_name: str, dc: str, csr_pem: str, service: str) -> connect_ca.SignedLeaf:
    """Sign a leaf for `service`, registered on the caller's node; or, with no
    service, renew the node's own certificate.

    403 when the service is not on that node or the CSR asks for any other
    identity (another service, another dc, another node).
    """
    td = connect_ca.trust_domain()
    if not service:
        expected = spiffe.agent_id(td, node_name, dc).uri
        authz = _node_writer(node_name)
    else:
        on_node = ServiceInstance.objects.filter(node__name=node_name).filter(
            Q(name=service) | Q(kind="connect-proxy", destination_name=service)
        )
        if not on_node.exists():
            raise PermissionDenied(
                f'Permission denied: service "{service}" is not registered on node "{node_name}"'
            )
        try:
            expected = spiffe.service_id(td, service, dc).uri
        except spiffe.SpiffeError as exc:
            raise BadRequest(f"Invalid service name: {exc}") from None
        authz = _service_writer(service)
    wanted = _csr_identity(csr_pem)
    if wanted is not None and wanted.uri != expected:
        raise PermissionDenied(f'Permission denied: the CSR must ask for "{expected}"')
    identity = Identity(f"agent:{node_name}", authz, f"agent {node_name}")
    leaf = connect_ca.sign_csr(identity, csr_pem)
    if leaf.spiffe_id != expected:
        # Only reachable for a CSR our quick parse could not read but the CA could;
        # the CA's narrow authorizer already kept it to this service or node.
        raise PermissionDenied(f'Permission denied: the CSR must ask for "{expected}"')
    return leaf
