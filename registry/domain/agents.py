"""Per-host agents: join tokens, joining, anti-entropy, check updates, leaves.

The control plane's half of the agent protocol (`registry.grpc` is the
adapter; every rule is here):

- join tokens (`create_token`, `list_tokens`, `revoke_token`): `<id>.<secret>`,
  the secret stored as its SHA-256; single- or multi-use, always expiring;
- `join`: a token + a node CSR -> the node in the catalog (`mesh-role: agent`)
  and its certificate (SPIFFE `spiffe://<td>/agent/client/dc/<dc>/id/<node>`),
  atomically with the token's use (a bad CSR does not burn a token);
- `sync_node`: anti-entropy, the agent's state is the truth for its node;
- `update_checks`: check results as they change;
- `sign_leaf`: leaves for the services registered on the caller's node only;
- `issue_server_certificate`: the gRPC server's own TLS certificate.

Callers are identified by the adapter (node certificate -> node name); the
functions here trust the node name they are given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone

from meshproto import pki, spiffe
from registry import decode
from registry import topics as topic
from registry.acl_rules import Authorizer, parse_rules
from registry.domain import catalog, connect_ca, shapes
from registry.domain.acl import Identity
from registry.errors import BadRequest, MeshError, NotFound, PermissionDenied
from registry.models import Check, Datacenter, IssuedCert, JoinToken, Node, ServiceInstance
from registry.txn import Change, topic_index

log = logging.getLogger(__name__)

ROLE_KEY = "mesh-role"
ROLE_AGENT = "agent"
MIN_TTL_SECONDS = 1
MAX_TTL_SECONDS = 365 * 24 * 3600
DEFAULT_TTL_SECONDS = 3600
MAX_META_KEYS = 64
MAX_OUTPUT = 4096
_TOKEN_ID = re.compile(r"^[0-9a-f]{16}$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Unauthenticated(MeshError):
    """The caller's credential (a join token) is not valid; the message never says why."""

    status = 401


_REFUSED = "join token is invalid, expired, revoked or used up"


# --- join tokens -------------------------------------------------------------------------


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class NewToken:
    """A token just created: the row and the only copy of its secret form."""

    row: JoinToken
    token: str  # `<id>.<secret>`: shown once


def create_token(
    *,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
    max_uses: int = 1,
    description: str = "",
    datacenter: str = "",
    created_by: str = "",
) -> NewToken:
    """A new join token. `max_uses` 0 is unlimited (until it expires or is revoked).

    Every token expires: an unlimited, eternal credential that mints node
    identities is not something to hand out.
    """
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int | float):
        raise BadRequest("ttl: expected a duration")
    if not MIN_TTL_SECONDS <= ttl_seconds <= MAX_TTL_SECONDS:
        raise BadRequest(
            f"ttl must be between {MIN_TTL_SECONDS}s and {MAX_TTL_SECONDS // 86400} days"
        )
    if isinstance(max_uses, bool) or not isinstance(max_uses, int) or max_uses < 0:
        raise BadRequest("uses must be 0 (unlimited) or a positive integer")
    if not isinstance(description, str) or len(description) > 1024:
        raise BadRequest("description must be a string of at most 1024 characters")
    dc = datacenter or settings.MESH_DC
    if dc != settings.MESH_DC and not Datacenter.objects.filter(name=dc).exists():
        raise BadRequest(f'unknown datacenter "{dc}"')
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    now = timezone.now()
    with Change() as w:
        row = JoinToken.objects.create(
            id=token_id,
            secret_hash=_hash(secret),
            description=description,
            datacenter=dc,
            max_uses=max_uses,
            expires_at=now + dt.timedelta(seconds=ttl_seconds),
            created_by=created_by,
            create_index=w.index,
            modify_index=w.index,
        )
        w.touch(topic.JOIN_TOKENS)
        w.audit("agent.join-token.create", "join-token", token_id, None, token_json(row))
    return NewToken(row, f"{token_id}.{secret}")


def token_state(row: JoinToken, now: dt.datetime | None = None) -> str:
    """active | expired | revoked | used"""
    now = now or timezone.now()
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    if row.max_uses and row.uses >= row.max_uses:
        return "used"
    return "active"


def token_json(row: JoinToken) -> dict[str, Any]:
    """A token as the API shows it (never its secret nor its hash)."""
    return {
        "id": row.id,
        "description": row.description,
        "datacenter": row.datacenter,
        "max_uses": row.max_uses,
        "uses": row.uses,
        "state": token_state(row),
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "created_by": row.created_by,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "last_used_by": row.last_used_by,
        "create_index": row.create_index,
        "modify_index": row.modify_index,
    }


def list_tokens() -> list[JoinToken]:
    return list(JoinToken.objects.all())


def revoke_token(token_id: str) -> JoinToken:
    """Revoke a token (it stays listed as revoked); revoking twice is a no-op."""
    with Change() as w:
        row = JoinToken.objects.select_for_update().filter(id=token_id).first()
        if row is None:
            raise NotFound(f'join token "{token_id}" not found')
        if row.revoked_at is None:
            before = token_json(row)
            row.revoked_at = timezone.now()
            row.modify_index = w.index
            row.save(update_fields=["revoked_at", "modify_index"])
            w.touch(topic.JOIN_TOKENS)
            w.audit("agent.join-token.revoke", "join-token", row.id, before, token_json(row))
    return row


def _consume(change: Change, token: str, node_name: str) -> JoinToken:
    """Use the token once, inside the join's transaction, or raise Unauthenticated.

    The use is a conditional UPDATE (`uses < max_uses`, not revoked, not
    expired): of two agents racing for a single-use token, the second's
    UPDATE re-reads the row after the first commits and matches nothing.
    """
    token_id, dot, secret = (token or "").strip().partition(".")
    if not dot or not _TOKEN_ID.match(token_id) or not secret:
        log.warning("join refused for node %r: malformed token", node_name)
        raise Unauthenticated(_REFUSED)
    row = JoinToken.objects.filter(id=token_id).first()
    if row is None or not hmac.compare_digest(row.secret_hash, _hash(secret)):
        log.warning("join refused for node %r: unknown token %s", node_name, token_id)
        raise Unauthenticated(_REFUSED)
    now = timezone.now()
    claimed = (
        JoinToken.objects.filter(id=token_id, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .filter(Q(max_uses=0) | Q(uses__lt=F("max_uses")))
        .update(
            uses=F("uses") + 1,
            last_used_at=now,
            last_used_by=node_name,
            modify_index=change.index,
        )
    )
    if not claimed:
        log.warning(
            "join refused for node %r: token %s is %s", node_name, token_id, token_state(row, now)
        )
        raise Unauthenticated(_REFUSED)
    change.touch(topic.JOIN_TOKENS)
    row.refresh_from_db()
    return row


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
        row = _consume(w, token, node_name)
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


# --- anti-entropy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeState:
    """What an agent holds for its node: the catalog is made equal to it.

    `services`: Consul agent service definitions (as `PUT /v1/agent/service/register`
    takes them: inline `Check`/`Checks`, `Connect.SidecarService` expanded here
    as the catalog expands it). `checks`: the node's other checks (check
    definitions, optionally with `ServiceID`) and the current `Status` /
    `Output` of any check, inline ones included (an entry with only `CheckID`,
    `Status`, `Output` reports a status).
    """

    address: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    services: tuple[dict[str, Any], ...] = ()
    checks: tuple[dict[str, Any], ...] = ()


def parse_node_state(
    address: str, meta: dict[str, str], services_json: Sequence[str], checks_json: Sequence[str]
) -> NodeState:
    """Decode the wire form (JSON strings) with the `/v1` decoders; 400 on anything malformed."""
    services = tuple(
        decode.AGENT_SERVICE(_json(raw, f"services_json[{i}]"), f"services_json[{i}]")
        for i, raw in enumerate(services_json)
    )
    checks = []
    for i, raw in enumerate(checks_json):
        where = f"checks_json[{i}]"
        data = _json(raw, where)
        spec = decode.AGENT_CHECK(data, where)
        output = next((v for k, v in data.items() if str(k).lower() == "output"), None)
        if output is not None:
            spec["Output"] = decode.Str(output, f"{where}.Output")
        checks.append(spec)
    return NodeState(
        address=address or "", meta=dict(meta), services=services, checks=tuple(checks)
    )


def _json(raw: str | bytes, where: str) -> Any:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{where}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"{where}: expected an object")
    return data


@dataclass
class _WantCheck:
    check_id: str
    spec: dict[str, Any]  # the definition (Status: the initial status of a new check)
    name: str
    service_id: str  # "" for a node check
    status: str | None = None  # the agent's current status, if it reported one
    output: str | None = None


@dataclass
class _Plan:
    node_fields: dict[str, Any] | None  # address/meta to set, or None
    services: dict[str, tuple[dict[str, Any], str]]  # id -> (spec, parent_id), in save order
    checks: dict[str, _WantCheck]
    upsert_services: list[str]
    delete_services: list[str]
    upsert_checks: list[str]  # definition changed or new
    status_checks: list[str]  # only the status/output changed
    delete_checks: list[str]

    @property
    def empty(self) -> bool:
        return not (
            self.node_fields
            or self.upsert_services
            or self.delete_services
            or self.upsert_checks
            or self.status_checks
            or self.delete_checks
        )


_SERVICE_FIELDS = (
    "name",
    "kind",
    "tags",
    "address",
    "port",
    "meta",
    "tagged_addresses",
    "weights",
    "enable_tag_override",
    "proxy",
    "connect",
    "namespace",
    "parent_service_id",
    "destination_name",
    "agent_local",
)
_CHECK_FIELDS = (
    "name",
    "notes",
    "type",
    "definition",
    "interval",
    "timeout",
    "ttl",
    "deregister_after",
    "service_id",
    "service_name",
    "service_tags",
    "agent_local",
)


def _instance_fields(spec: dict[str, Any], parent_id: str) -> dict[str, Any]:
    """What `catalog._save_instance` stores for `spec` (kept in step with it)."""
    kind = spec.get("Kind") or "typical"
    proxy = spec.get("Proxy") or {}
    return {
        "name": spec["Name"],
        "kind": kind,
        "tags": spec.get("Tags", []),
        "address": spec.get("Address", ""),
        "port": spec.get("Port", 0),
        "meta": spec.get("Meta", {}),
        "tagged_addresses": spec.get("TaggedAddresses", {}),
        "weights": spec.get("Weights") or {"Passing": 1, "Warning": 1},
        "enable_tag_override": spec.get("EnableTagOverride", False),
        "proxy": proxy,
        "connect": {k: v for k, v in (spec.get("Connect") or {}).items() if k != "SidecarService"},
        "namespace": spec.get("Namespace") or "default",
        "parent_service_id": parent_id,
        "destination_name": proxy.get("DestinationServiceName", "")
        if kind == "connect-proxy"
        else "",
        "agent_local": True,
    }


_DEFINITION_EXCLUDED = ("CheckID", "Name", "Notes", "Status", "ServiceID", "Node", "Output", "Type")


def _is_maintenance(check_id: str) -> bool:
    return check_id == catalog.NODE_MAINTENANCE_CHECK_ID or check_id.startswith(
        "_service_maintenance:"
    )


def _check_fields(want: _WantCheck, svc_spec: dict[str, Any] | None) -> dict[str, Any]:
    """What `catalog._upsert_check` stores for the check (kept in step with it)."""
    spec = want.spec
    return {
        "name": want.name,
        "notes": spec.get("Notes", ""),
        "type": "maintenance" if _is_maintenance(want.check_id) else catalog._check_type(spec),
        "definition": {k: v for k, v in spec.items() if k not in _DEFINITION_EXCLUDED},
        "interval": spec.get("Interval", 0.0),
        "timeout": spec.get("Timeout", 0.0),
        "ttl": spec.get("TTL", 0.0),
        "deregister_after": spec.get("DeregisterCriticalServiceAfter", 0.0),
        "service_id": want.service_id,
        "service_name": svc_spec["Name"] if svc_spec else "",
        "service_tags": list(svc_spec.get("Tags", [])) if svc_spec else [],
        "agent_local": True,
    }


def _desired(
    node: Node, state: NodeState
) -> tuple[dict[str, tuple[dict[str, Any], str]], dict[str, _WantCheck]]:
    """The services (sidecars expanded) and checks the agent's state asks for."""
    services: dict[str, tuple[dict[str, Any], str]] = {}
    checks: dict[str, _WantCheck] = {}
    existing_ports = {
        sid: port
        for sid, port in node.services.filter(kind="connect-proxy").values_list(
            "service_id", "port"
        )
    }
    taken: set[int] = set()

    def add_service(spec: dict[str, Any], parent_id: str) -> None:
        if spec["ID"] in services:
            raise BadRequest(f'duplicate service ID "{spec["ID"]}"')
        services[spec["ID"]] = (spec, parent_id)
        if spec.get("Kind") == "connect-proxy" and spec.get("Port"):
            taken.add(spec["Port"])
        for s in catalog._service_check_specs(spec["ID"], spec):
            catalog._require_check_type(s.fields)
            name = s.fields.get("Name") or f"Service '{spec['Name']}' check"
            add_check(_WantCheck(s.check_id, s.fields, name, spec["ID"]))

    def add_check(want: _WantCheck) -> None:
        if want.check_id in checks:
            raise BadRequest(f'duplicate check ID "{want.check_id}"')
        checks[want.check_id] = want

    for raw in state.services:
        spec = dict(raw)
        catalog._validate_service(spec)
        spec["ID"] = spec.get("ID") or spec["Name"]
        add_service(spec, "")
        sidecar = (spec.get("Connect") or {}).get("SidecarService")
        if sidecar is not None:
            if spec.get("Kind") not in (None, "", "typical"):
                raise BadRequest("A sidecar can only be registered for a typical service")
            sidecar_id = sidecar.get("ID") or f"{spec['ID']}-sidecar-proxy"
            if not sidecar.get("Port"):
                # Keep a sidecar's port; give a new one a port no other sidecar
                # of this sync took (the catalog only sees saved rows).
                port = existing_ports.get(sidecar_id) or catalog._free_sidecar_port(node, taken)
                spec["Connect"] = {**spec["Connect"], "SidecarService": {**sidecar, "Port": port}}
            sc = catalog._sidecar_spec(spec, node)
            catalog._validate_service(sc)
            add_service(sc, spec["ID"])

    for raw in state.checks:
        spec = dict(raw)
        check_id = spec.get("CheckID") or spec.get("Name") or ""
        if not check_id:
            raise BadRequest("a check needs a CheckID or a Name")
        status = spec.pop("Status", None) or None
        output = spec.pop("Output", None)
        if status is not None:
            catalog._validate_status(status)
        if output is not None and len(output) > MAX_OUTPUT:
            output = output[:MAX_OUTPUT] + f" ... (captured {MAX_OUTPUT} of {len(output)} bytes)"
        has_definition = bool(catalog._check_type(spec)) or _is_maintenance(check_id)
        if check_id in checks and not has_definition:
            # A status report for a check a service defines.
            checks[check_id].status, checks[check_id].output = status, output
            continue
        service_id = spec.get("ServiceID", "")
        if service_id and service_id not in services:
            raise BadRequest(f'check "{check_id}": ServiceID "{service_id}" is not a service')
        name = spec.get("Name") or check_id
        add_check(_WantCheck(check_id, spec, name, service_id, status, output))
    return services, checks


def _plan(node: Node, state: NodeState) -> _Plan:
    services, checks = _desired(node, state)
    rows = {s.service_id: s for s in node.services.all()}
    check_rows = {c.check_id: c for c in node.checks.all()}
    meta = _check_meta(state.meta)
    node_fields: dict[str, Any] = {}
    if state.address and state.address != node.address:
        node_fields["address"] = state.address
    if meta != (node.meta or {}):
        node_fields["meta"] = meta
    upsert_services = [
        sid
        for sid, (spec, parent) in services.items()
        if sid not in rows
        or _instance_fields(spec, parent) != {f: getattr(rows[sid], f) for f in _SERVICE_FIELDS}
    ]
    upsert_checks, status_checks = [], []
    for cid, want in checks.items():
        row = check_rows.get(cid)
        svc_spec = services[want.service_id][0] if want.service_id else None
        if row is None or _check_fields(want, svc_spec) != {
            f: getattr(row, f) for f in _CHECK_FIELDS
        }:
            upsert_checks.append(cid)
        elif want.status is not None and (
            want.status != row.status or (want.output is not None and want.output != row.output)
        ):
            status_checks.append(cid)
    return _Plan(
        node_fields=node_fields or None,
        services=services,
        checks=checks,
        upsert_services=upsert_services,
        delete_services=[sid for sid in rows if sid not in services],
        upsert_checks=upsert_checks,
        status_checks=status_checks,
        delete_checks=[cid for cid in check_rows if cid not in checks],
    )


def sync_node(node_name: str, dc: str, state: NodeState) -> int:
    """Make the catalog's services and checks of `node_name` equal to the agent's.

    What differs is registered or updated, what the agent no longer has is
    deregistered, all in one `Change`; when nothing differs nothing is
    written and no index moves. A node the catalog lost is registered again
    (anti-entropy: the agent restores what the control plane lost).
    Returns the index of the node's state after the sync.
    """
    node = Node.objects.select_related("datacenter").filter(name=node_name).first()
    if node is not None and _plan(node, state).empty:
        return topic_index(topic.node(node_name))
    with Change() as w:
        node = (
            Node.objects.select_related("datacenter")
            .select_for_update()
            .filter(name=node_name)
            .first()
        )
        if node is None:
            if not state.address:
                raise BadRequest("address is required to register the node again")
            node = _register_node(w, node_name, state.address, _check_meta(state.meta), dc)
        plan = _plan(node, state)  # again, inside the transaction: this one is authoritative
        _apply(w, node, plan)
    return w.index


def _apply(w: Change, node: Node, plan: _Plan) -> None:
    from registry.domain.sessions import invalidate_sessions_for_checks  # (import cycle)

    if plan.node_fields:
        before = shapes.node_json(node)
        for k, v in plan.node_fields.items():
            setattr(node, k, v)
        node.modify_index = w.index
        node.save()
        w.audit("node.register", "node", node.name, before, shapes.node_json(node))
        catalog.touch_node_services(w, node)
    for sid in plan.delete_services:
        svc = ServiceInstance.objects.select_related("node").filter(node=node, service_id=sid)
        for row in svc:
            catalog._delete_instance(w, row)
    saved: dict[str, ServiceInstance] = {}
    for sid in plan.upsert_services:
        spec, parent = plan.services[sid]
        saved[sid] = catalog._save_instance(w, node, spec, agent_local=True, parent_id=parent)
    for cid in plan.delete_checks:
        row = Check.objects.select_related("node").filter(node=node, check_id=cid).first()
        if row is None:  # went with its service above
            continue
        catalog._touch_check(w, row)
        w.audit("check.deregister", "check", f"{node.name}/{cid}", {"Status": row.status}, None)
        row.delete()
        invalidate_sessions_for_checks(w, node, check_ids=[cid])
    for cid in plan.upsert_checks:
        want = plan.checks[cid]
        svc = None
        if want.service_id:
            svc = saved.get(want.service_id) or ServiceInstance.objects.select_related("node").get(
                node=node, service_id=want.service_id
            )
        spec = dict(want.spec)
        if Check.objects.filter(node=node, check_id=cid).exists():
            # An update keeps the stored status; the agent's report (below) moves it.
            spec.pop("Status", None)
        check = catalog._upsert_check(
            w, node, spec, check_id=cid, name=want.name, svc=svc, agent_local=True
        )
        if _is_maintenance(cid) and check.type != "maintenance":
            Check.objects.filter(pk=check.pk).update(type="maintenance")
            check.type = "maintenance"
        if want.status is not None:
            check.node = node
            catalog.apply_check_result(w, check, want.status, want.output)
    for cid in plan.status_checks:
        want = plan.checks[cid]
        check = (
            Check.objects.select_related("node").select_for_update().get(node=node, check_id=cid)
        )
        catalog.apply_check_result(w, check, want.status or check.status, want.output)


# --- check updates ---------------------------------------------------------------------------


def update_checks(node_name: str, updates: Sequence[tuple[str, str, str | None]]) -> int:
    """Apply check results `(check_id, status, output)` from the node's agent.

    One `Change` for the batch, and none at all when every result equals
    what is stored. Checks the catalog does not have are skipped (the next
    full sync registers them). Returns the node's index after the update.
    """
    for check_id, status, _output in updates:
        if status not in catalog.STATUS_ORDER:
            raise BadRequest(f"check {check_id!r}: invalid status {status!r}")
    latest: dict[str, tuple[str, str | None]] = {}
    for check_id, status, output in updates:
        if output is not None and len(output) > MAX_OUTPUT:
            output = output[:MAX_OUTPUT] + f" ... (captured {MAX_OUTPUT} of {len(output)} bytes)"
        latest[check_id] = (status, output)
    node = catalog.get_node(node_name)
    rows = Check.objects.filter(node=node, check_id__in=list(latest)).values_list(
        "check_id", "status", "output"
    )
    pending = [
        cid
        for cid, status, output in rows
        if latest[cid][0] != status or (latest[cid][1] is not None and latest[cid][1] != output)
    ]
    if not pending:
        return topic_index(topic.node(node_name))
    with Change() as w:
        for check in (
            Check.objects.select_related("node")
            .select_for_update()
            .filter(node=node, check_id__in=pending)
        ):
            status, output = latest[check.check_id]
            catalog.apply_check_result(w, check, status, output)
    return w.index


# --- the proxies on a node (for the config stream) --------------------------------------------


def node_proxies(node_name: str) -> list[str]:
    """IDs of the sidecar proxies (`connect-proxy` instances) registered on the node."""
    return list(
        ServiceInstance.objects.filter(node__name=node_name, kind="connect-proxy")
        .order_by("service_id")
        .values_list("service_id", flat=True)
    )
