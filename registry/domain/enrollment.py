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
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from django.conf import settings
from django.db.models import Q, Subquery
from django.utils import timezone

from meshproto import pki, scope, spiffe
from registry import topics as topic
from registry.acl_rules import Authorizer, parse_rules
from registry.domain import catalog, connect_ca, join_tokens, shapes
from registry.domain.acl import Identity
from registry.errors import BadRequest, Conflict, PermissionDenied
from registry.models import (
    Check,
    IssuedCert,
    JoinToken,
    Node,
    NodeCertificate,
    NodeEnrollment,
    ServiceInstance,
)
from registry.txn import Change

log = logging.getLogger(__name__)

ROLE_KEY = "mesh-role"
ROLE_AGENT = "agent"
MAX_META_KEYS = 64
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SERF = catalog.SERF_CHECK_ID
HEARD_FROM_STEP = 5.0  # seconds: how stale `last_seen_at` may get before an RPC raises it


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
    services: tuple[str, ...] = ()  # the node's scope (service names and patterns)


def _check_node_name(name: str) -> str:
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise BadRequest(
            f"invalid node name {name!r}: letters, digits, '.', '_' and '-', at most 128"
        )
    return name


def check_meta(meta: dict[str, str] | None) -> dict[str, str]:
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


def register_node(
    change: Change,
    name: str,
    address: str,
    meta: dict[str, str],
    dc: str,
    *,
    node_id: str = "",
) -> Node:
    """Create or update an agent's node. A node another role owns (the server) is refused.

    The node's ID is its enrollment's (`node_id`, or the enrolled one when a
    sync registers a node the catalog lost), so the catalog's node ID and the
    node's certificates agree.
    """
    datacenter = catalog.ensure_datacenter(dc, change)
    node = Node.objects.select_related("datacenter").select_for_update().filter(name=name).first()
    if node is not None:
        role = (node.meta or {}).get(ROLE_KEY)
        if role not in (None, "", ROLE_AGENT):
            raise PermissionDenied(f'node "{name}" is a {role}; an agent cannot join as it')
    if not node_id:
        node_id = (
            NodeEnrollment.objects.filter(node=name).values_list("node_id", flat=True).first() or ""
        )
    before = shapes.node_json(node) if node is not None else None
    if node is None:
        node = Node(name=name, node_id=node_id or str(uuid.uuid4()), create_index=change.index)
    elif node_id:
        node.node_id = node_id
    node.address = address
    node.meta = meta
    node.datacenter = datacenter
    node.modify_index = change.index
    node.save()
    change.audit("node.register", "node", name, before, shapes.node_json(node))
    catalog.touch_node_services(change, node)
    return node


def _live(row: NodeEnrollment | None, now: dt.datetime) -> bool:
    """Whether a node holds its name: enrolled, not revoked, heard from lately."""
    return (
        row is not None
        and row.revoked_at is None
        and row.last_seen_at > now - dt.timedelta(seconds=settings.MESH_NODE_LIVENESS_TIMEOUT)
    )


def _claim_name(node_name: str, token: JoinToken, replace: bool, now: dt.datetime) -> None:
    """Refuse a name the token does not name, or one a live node (or the catalog) holds."""
    if token.node_name and token.node_name != node_name:
        raise PermissionDenied(
            f'Permission denied: the join token is for node "{token.node_name}", not "{node_name}"'
        )
    if replace:
        return
    held = NodeEnrollment.objects.filter(node=node_name).first()
    if _live(held, now):
        raise Conflict(
            f'node name "{node_name}" is held by a live node (node ID {held.node_id}); '
            "join with -replace to take it over"
        )
    node = Node.objects.filter(name=node_name).first()
    if node is not None and held is None and (node.meta or {}).get(ROLE_KEY) in (None, ""):
        raise Conflict(
            f'node name "{node_name}" is registered in the catalog by another client; '
            "join with -replace to take it over"
        )


def join(
    token: str,
    node_name: str,
    csr_pem: str,
    *,
    address: str = "",
    meta: dict[str, str] | None = None,
    datacenter: str = "",
    peer_host: str = "",
    replace: bool = False,
) -> Joined:
    """Exchange a join token and a node CSR for the node's certificate.

    One transaction: the token's use, the node's registration, its
    enrollment (a new node ID, the token's scope) and the signing commit
    together or not at all (a refused CSR leaves the token unused and
    nothing registered). Errors: 401 (`Unauthenticated`) for any token that
    cannot be used, 400 for bad input, 403 for a CSR asking for another
    identity than `spiffe://<td>/agent/client/dc/<token's dc>/id/<node>`, a
    node name the server owns or the token does not name, 409 for a name a
    live node holds (unless `replace`: the old holder's certificates stop
    working at once).
    """
    _check_node_name(node_name)
    node_meta = check_meta(meta)
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
        now = timezone.now()
        _claim_name(node_name, row, replace, now)
        td = connect_ca.trust_domain()
        expected = spiffe.agent_id(td, node_name, dc).uri
        wanted = _csr_identity(csr_pem)
        if wanted is not None and wanted.uri != expected:
            raise PermissionDenied(f'Permission denied: the CSR must ask for "{expected}"')
        node_id = str(uuid.uuid4())
        node = register_node(w, node_name, address, node_meta, dc, node_id=node_id)
        identity = Identity(f"join-token:{row.id}", _node_writer(node_name), row.description)
        leaf = connect_ca.sign_csr(identity, csr_pem, agent=True)
        if leaf.spiffe_id != expected:  # e.g. a CSR our quick parse could not read
            raise PermissionDenied(f'Permission denied: the CSR must ask for "{expected}"')
        NodeEnrollment.objects.update_or_create(
            node=node_name,
            defaults={
                "node_id": node_id,
                "join_token": row.id,
                "services": list(row.services or []),
                "joined_at": now,
                "last_seen_at": now,
                "revoked_at": None,
                "down": False,
            },
        )
        _bind(leaf, node_name, node_id)
        w.touch(topic.node(node_name))
        w.audit(
            "agent.join",
            "node",
            node_name,
            None,
            {
                "JoinToken": row.id,
                "Serial": leaf.serial,
                "Address": address,
                "Datacenter": dc,
                "NodeID": node_id,
                "Replaced": bool(replace),
                "Services": list(row.services or []),
            },
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
        services=tuple(row.services or ()),
    )


# --- node certificates: binding, revocation, liveness ---------------------------------------


def serial_key(serial: str) -> str:
    """One spelling for a serial: `pki.info`'s `0a:1b:...` and `ssl`'s `0A1B...` alike."""
    return serial.replace(":", "").lower().lstrip("0") or "0"


def _bind(leaf: connect_ca.SignedLeaf, node_name: str, node_id: str) -> None:
    NodeCertificate.objects.create(
        serial=serial_key(leaf.serial), node=node_name, node_id=node_id, not_after=leaf.not_after
    )


def authenticate(node_name: str, serial: str) -> NodeEnrollment:
    """The node behind a verified client certificate, if that certificate is still its own.

    Refused (401): a certificate the join flow did not issue to this node
    (one signed through `/api/ca/sign`), one bound to an older node ID (the
    name was taken over with `-replace`), or any certificate of a revoked
    node. Accepted calls count as the node being heard from: `last_seen_at`
    moves (at most every few seconds) and a node marked down comes back up.
    """
    _authenticated.row = None
    bound = NodeCertificate.objects.filter(serial=serial_key(serial or ""), node=node_name)
    row = (  # one query on every RPC: the node and what this certificate is bound to
        NodeEnrollment.objects.annotate(cert_node_id=Subquery(bound.values("node_id")[:1]))
        .filter(node=node_name)
        .first()
    )
    if row is None or row.cert_node_id is None:
        raise join_tokens.Unauthenticated(
            f'this certificate was not issued to node "{node_name}" by the join flow; join first'
        )
    if row.revoked_at is not None:
        raise join_tokens.Unauthenticated(f'node "{node_name}" was revoked; join again')
    if row.cert_node_id != row.node_id:
        raise join_tokens.Unauthenticated(
            f'node "{node_name}" joined again as node ID {row.node_id}; this certificate is '
            "for a replaced node"
        )
    now = timezone.now()
    step = min(HEARD_FROM_STEP, settings.MESH_NODE_LIVENESS_TIMEOUT / 4)
    if row.down or row.last_seen_at < now - dt.timedelta(seconds=step):
        _heard_from(row, now)
    _authenticated.row = row
    return row


# The row `authenticate` just read, for `check_scope` in the same unit of work
# (a gRPC call runs both on one pool thread): one query per sync, not two.
_authenticated = threading.local()


def _enrollment(node_name: str) -> NodeEnrollment | None:
    row = getattr(_authenticated, "row", None)
    _authenticated.row = None  # used once: a later call on this thread reads afresh
    if row is not None and row.node == node_name:
        return row
    return NodeEnrollment.objects.filter(node=node_name).first()


def _heard_from(row: NodeEnrollment, now: dt.datetime) -> None:
    """Record that the node spoke; a node that was down gets its `serfHealth` back."""
    claimed = NodeEnrollment.objects.filter(pk=row.pk, down=False).update(last_seen_at=now)
    if claimed:
        return
    with Change() as w:
        if not NodeEnrollment.objects.filter(pk=row.pk, down=True).update(
            last_seen_at=now, down=False
        ):
            return
        node = Node.objects.filter(name=row.node).first()
        check = Check.objects.select_related("node").filter(node=node, check_id=SERF).first()
        if check is not None:
            catalog._touch_check(w, check)
            w.audit("check.deregister", "check", f"{row.node}/{SERF}", {"Status": check.status})
            check.delete()
        log.info("node %s is back", row.node)


_next_sweep = 0.0  # monotonic time of this process's next liveness sweep


def sweep_liveness(now: dt.datetime | None = None, *, force: bool = False) -> int:
    """Mark nodes not heard from for `MESH_NODE_LIVENESS_TIMEOUT` down: a critical
    `serfHealth` check on the node, so its instances leave healthy answers, DNS and
    sidecar endpoints until it speaks again. Idempotent (claims with a conditional
    update); returns how many nodes it marked.

    Called from every background tick; it queries at most every
    `HEARD_FROM_STEP` seconds (or a quarter of the timeout), so an idle tick
    stays cheap.
    """
    global _next_sweep
    clock = time.monotonic()
    if not force and clock < _next_sweep:
        return 0
    _next_sweep = clock + min(HEARD_FROM_STEP, settings.MESH_NODE_LIVENESS_TIMEOUT / 4)
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.MESH_NODE_LIVENESS_TIMEOUT)
    stale = list(
        NodeEnrollment.objects.filter(
            down=False, revoked_at__isnull=True, last_seen_at__lt=cutoff
        ).values_list("node", flat=True)
    )
    marked = 0
    for name in stale:
        with Change() as w:
            if not NodeEnrollment.objects.filter(
                node=name, down=False, last_seen_at__lt=cutoff
            ).update(down=True):
                continue
            node = Node.objects.select_related("datacenter").filter(name=name).first()
            if node is None:
                continue
            output = f"Agent not heard from for {settings.MESH_NODE_LIVENESS_TIMEOUT}s"
            check = catalog._upsert_check(
                w,
                node,
                {"Notes": "set by the control plane's liveness sweep"},
                check_id=SERF,
                name="Serf Health Status",
                svc=None,
                agent_local=False,
                status=Check.CRITICAL,
                output=output,
            )
            catalog.apply_check_result(w, check, Check.CRITICAL, output)
            marked += 1
            log.warning("node %s not heard from; marked down", name)
    return marked


def revoke_nodes(change: Change, token_id: str) -> list[str]:
    """Revoke every node that joined with the token: certificates refused from now on
    (every server process reads the revocation from the database), no leaves, and
    the nodes leave the catalog for good (their agents' syncs are refused)."""
    now = timezone.now()
    names = list(
        NodeEnrollment.objects.select_for_update()
        .filter(join_token=token_id, revoked_at__isnull=True)
        .values_list("node", flat=True)
    )
    for name in names:
        NodeEnrollment.objects.filter(node=name).update(revoked_at=now)
        node = Node.objects.select_related("datacenter").filter(name=name).first()
        if node is not None and (node.meta or {}).get(ROLE_KEY) == ROLE_AGENT:
            catalog.delete_node(change, node)
        change.audit("agent.node.revoke", "node", name, None, {"JoinToken": token_id})
        change.touch(topic.node(name))
    return names


# --- scope: what a node may claim ------------------------------------------------------------


def check_scope(node_name: str, services: Iterable[dict[str, Any]]) -> NodeEnrollment:
    """Refuse (403, audited) a node that is not an enrolled agent, or services its
    join token's scope does not allow. Called at the start of every node sync."""
    row = _enrollment(node_name)
    if row is None or row.revoked_at is not None:
        raise PermissionDenied(
            f'Permission denied: node "{node_name}" is not a joined agent node'
            + (" (revoked)" if row is not None else "")
        )
    for spec in services:
        name = scope.refused(row.services, spec)
        if name is not None:
            _refuse_scope(row, name)
    return row


def _refuse_scope(row: NodeEnrollment, service: str) -> None:
    message = (
        f'Permission denied: node "{row.node}" may not register service "{service}" '
        f"(its join token {row.join_token} allows: {scope.describe(row.services)})"
    )
    # The refusal is recorded in its own write: the caller's work is rolled back.
    with Change() as w:
        w.audit(
            "agent.scope.refuse",
            "node",
            row.node,
            None,
            {"Service": service, "Allowed": list(row.services), "JoinToken": row.join_token},
        )
    raise PermissionDenied(message)


# --- leaves for the caller's services -------------------------------------------------------


def agent_node(name: str) -> Node:
    """The caller's node (it may have been deregistered since it joined: NotFound)."""
    return catalog.get_node(name)


def sign_leaf(node_name: str, dc: str, csr_pem: str, service: str) -> connect_ca.SignedLeaf:
    """Sign a leaf for `service`, registered on the caller's node and within its
    scope; or, with no service, renew the node's own certificate (bound to the
    node's current node ID).

    403 when the service is not on that node or out of its scope, or the CSR
    asks for any other identity (another service, another dc, another node).
    """
    td = connect_ca.trust_domain()
    row = NodeEnrollment.objects.filter(node=node_name, revoked_at__isnull=True).first()
    if row is None:
        raise PermissionDenied(f'Permission denied: node "{node_name}" is not a joined agent node')
    if not service:
        expected = spiffe.agent_id(td, node_name, dc).uri
        authz = _node_writer(node_name)
    else:
        if not join_tokens.scope_allows(row.services, service):
            _refuse_scope(row, service)
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
    leaf = connect_ca.sign_csr(identity, csr_pem, agent=not service)
    if leaf.spiffe_id != expected:
        # Only reachable for a CSR our quick parse could not read but the CA could;
        # the CA's narrow authorizer already kept it to this service or node.
        raise PermissionDenied(f'Permission denied: the CSR must ask for "{expected}"')
    if not service:
        _bind(leaf, node_name, row.node_id)
    return leaf
