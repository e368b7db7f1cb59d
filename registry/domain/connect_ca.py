"""Connect CA: the service layer every entry point calls (`/v1`, `/api`, CLI, tasks).

- reads: `roots_json` / `roots_pem` (Consul's `/v1/connect/ca/roots` shapes),
  `configuration_json`;
- `sign_csr(identity, csr_pem)`: validate a CSR, authorise the identity it
  asks for, sign it with the active root, record it (`IssuedCert`);
- `agent_leaf(identity, service)`: the leaf the server's agent API hands out
  for a service on the server's own node: the key is generated here (as a
  Consul agent does for its services), the leaf is cached in this process and
  renewed at half its lifetime or when the active root changes;
- writes, all through the CA manager (`registry.ca.manager`, the only writer
  of CA state): `set_configuration`, `rotate`, `retire_expired_roots`.

Topics: `ca-roots` (roots added, rotated, retired), `ca-config` (the
configuration), `ca-leaf:<service>` (a leaf was issued for that service).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import threading
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID
from django.conf import settings
from django.db import connection
from django.utils import timezone

from meshproto import pki, spiffe
from registry import topics as topic
from registry.ca import manager as ca_manager
from registry.ca.manager import TOPIC_CONFIG, TOPIC_ROOTS, Settings, manager
from registry.ca.provider import BACKDATE, CAProvider, Signer, get_provider
from registry.ca.ratelimit import CSRRateLimiter
from registry.errors import BadRequest, PermissionDenied
from registry.models import (
    CAConfig,
    CARoot,
    ClusterIdentity,
    Datacenter,
    IssuedCert,
    Node,
    ServiceInstance,
)
from registry.txn import Change, topic_index

MAX_CSR_BYTES = 64 * 1024
ZERO_TIME = "0001-01-01T00:00:00Z"
_EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_MIN_RSA_BITS = 2048
_MAX_RSA_BITS = 8192


def leaf_topic(service: str) -> str:
    return topic.ca_leaf(service)


def _rfc3339(value: dt.datetime | None) -> str:
    if value is None:
        return ZERO_TIME
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ensure() -> None:
    if not CARoot.objects.filter(active=True).exists():
        manager.ensure_initialized()


# --- reads -------------------------------------------------------------------------------


def trust_domain() -> str:
    _ensure()
    return ClusterIdentity.objects.values_list("trust_domain", flat=True).get(id=1)


def _root_json(root: CARoot, cluster_id: str) -> dict[str, Any]:
    return {
        "ID": root.id,
        "Name": root.name,
        "SerialNumber": int(root.serial_number),
        "SigningKeyID": root.signing_key_id,
        "ExternalTrustDomain": cluster_id,
        "NotBefore": _rfc3339(root.not_before),
        "NotAfter": _rfc3339(root.not_after),
        "RootCert": root.root_cert,
        "IntermediateCerts": list(root.intermediate_certs) or None,
        "Active": root.active,
        "RotatedOutAt": _rfc3339(root.rotated_out_at),
        "PrivateKeyType": root.private_key_type,
        "PrivateKeyBits": root.private_key_bits,
        "CreateIndex": root.create_index,
        "ModifyIndex": root.modify_index,
    }


def roots_json() -> tuple[int, dict[str, Any]]:
    """(index, Consul's CARootList): every trusted root, never a private key."""
    _ensure()
    index = topic_index(TOPIC_ROOTS)
    identity = ClusterIdentity.objects.get(id=1)
    roots = list(CARoot.objects.defer("private_key_encrypted").order_by("create_index"))
    active = next((r.id for r in roots if r.active), "")
    return index, {
        "ActiveRootID": active,
        "TrustDomain": identity.trust_domain,
        "Roots": [_root_json(r, identity.cluster_id) for r in roots],
    }


def roots_pem() -> tuple[int, str]:
    """(index, the trust bundle as PEM): every root, each followed by its
    cross-signed intermediates, as Consul's `?pem=true`."""
    index, data = roots_json()
    parts: list[str] = []
    for root in data["Roots"]:
        parts.append(_ensure_newline(root["RootCert"]))
        parts.extend(_ensure_newline(p) for p in root["IntermediateCerts"] or ())
    return index, "".join(parts)


def _ensure_newline(pem: str) -> str:
    return pem if pem.endswith("\n") else pem + "\n"


def configuration_json() -> tuple[int, dict[str, Any]]:
    """(index, Consul's CAConfiguration)."""
    row = manager.config_row()
    return topic_index(TOPIC_CONFIG), {
        "Provider": row.provider,
        "Config": dict(row.config),
        "State": None,
        "ForceWithoutCrossSigning": row.force_without_cross_signing,
        "CreateIndex": row.create_index,
        "ModifyIndex": row.modify_index,
    }


# --- writes (through the manager) -------------------------------------------------------


# Consul's CAConfiguration fields a PUT may carry (a read-modify-write sends them all back).
_CONFIG_FIELDS = {
    "provider": "Provider",
    "config": "Config",
    "forcewithoutcrosssigning": "ForceWithoutCrossSigning",
    "state": "State",
    "clusterid": "ClusterID",
    "createindex": "CreateIndex",
    "modifyindex": "ModifyIndex",
}


def set_configuration(body: dict[str, Any]) -> bool:
    """Apply a PUT of Consul's CAConfiguration; True if a new key type rotated the root.

    What the body leaves out keeps its stored value (never a silent reset to
    defaults); an unknown field or provider is a 400 naming it. `State` is
    read-only (as Consul's) and `ClusterID` and the indexes are ignored.
    """
    if not isinstance(body, dict):
        raise BadRequest("Request decode failed: expected an object")
    fields: dict[str, Any] = {}
    for key, value in body.items():
        folded = str(key).lower().replace("_", "")
        if folded not in _CONFIG_FIELDS:
            known = ", ".join(("Provider", "Config", "ForceWithoutCrossSigning"))
            raise BadRequest(f"{key}: unknown field (known: {known})")
        fields[folded] = value
    provider = fields.get("provider")
    if provider is not None and not isinstance(provider, str):
        raise BadRequest("Provider: expected a string")
    force = fields.get("forcewithoutcrosssigning")
    if force is not None and not isinstance(force, bool):
        raise BadRequest("ForceWithoutCrossSigning: expected a boolean")
    if fields.get("state") not in (None, {}):
        raise BadRequest("State: the provider state is read-only; omit it or send it as read")
    return manager.update_config(provider, fields.get("config"), force)


def rotate() -> CARoot:
    """Rotate to a new root (cross-signed with the current one)."""
    return manager.rotate()


def retire_expired_roots() -> int:
    """Background tick: remove old roots whose last leaf expired (cheap when idle)."""
    return manager.retire_expired_roots()


# --- signing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningState:
    """What a signing needs, loaded once per change of the CA (roots or config)."""

    version: tuple[int, str]
    trust_domain: str
    cluster_id: str
    root_id: str
    signer: Signer
    intermediates: tuple[str, ...]
    settings: Settings
    provider: CAProvider


_state: SigningState | None = None
_state_lock = threading.Lock()
_signers: dict[str, Signer] = {}
limiter = CSRRateLimiter(0, 0)


def _state_version() -> tuple[int, str]:
    """(index of the CA's topics, active root ID) in one small query: the
    root ID guards against indexes reused by a database restored or rolled back."""
    with connection.cursor() as cur:
        cur.execute(
            'SELECT (SELECT MAX("index") FROM registry_topicindex WHERE topic IN (%s, %s)), '
            "(SELECT id FROM registry_caroot WHERE active = %s ORDER BY id LIMIT 1)",
            [TOPIC_ROOTS, TOPIC_CONFIG, True],
        )
        index, root_id = cur.fetchone()
    return int(index or 0), root_id or ""


def signing_state() -> SigningState:
    """The active root ready to sign, reloaded only when `ca-roots`/`ca-config` moved."""
    global _state
    version = _state_version()
    state = _state
    if state is not None and state.version == version:
        return state
    with _state_lock:
        root = CARoot.objects.filter(active=True).first()
        if root is None:
            manager.ensure_initialized()
            version = _state_version()
            root = CARoot.objects.get(active=True)
        identity = ClusterIdentity.objects.get(id=1)
        row = CAConfig.objects.get(id=1)
        provider = get_provider(row.provider)
        signer = _signers.get(root.id)
        if signer is None:
            signer = ca_manager.load_signer(root, provider)
            _signers.clear()  # one active root at a time: drop retired keys from memory
            _signers[root.id] = signer
        cfg = ca_manager.settings_of(row.config)
        _state = SigningState(
            version=version,
            trust_domain=identity.trust_domain,
            cluster_id=identity.cluster_id,
            root_id=root.id,
            signer=signer,
            intermediates=tuple(root.intermediate_certs),
            settings=cfg,
            provider=provider,
        )
        return _state


@dataclass(frozen=True)
class SignedLeaf:
    """A leaf the CA signed: the certificate, the chain a holder presents after
    it (its root's cross-signed intermediates) and what was recorded."""

    cert_pem: str
    intermediates: tuple[str, ...]
    root_id: str
    serial: str
    spiffe_id: str
    kind: str  # service | agent
    name: str
    not_before: dt.datetime
    not_after: dt.datetime
    index: int

    @property
    def chain_pem(self) -> str:
        """The leaf followed by its intermediates (what a TLS endpoint loads)."""
        return "".join(_ensure_newline(p) for p in (self.cert_pem, *self.intermediates))


def _denied(identity, permission: str, resource: str) -> PermissionDenied:
    return PermissionDenied(
        f"Permission denied: token with AccessorID '{identity.accessor_id}' lacks permission "
        f"'{permission}' on \"{resource}\""
    )


def _load_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode("utf-8", "replace")
    if not isinstance(csr_pem, bytes) or not csr_pem.strip():
        raise BadRequest("Invalid CSR: empty")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise BadRequest(f"Invalid CSR: larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        sig_ok = csr.is_signature_valid
    except (ValueError, TypeError):
        raise BadRequest(
            "Invalid CSR: expected a PEM-encoded PKCS#10 certificate request"
        ) from None
    except Exception as exc:  # unsupported signature algorithm and the like
        raise BadRequest(f"Invalid CSR: {exc}") from None
    if not sig_ok:
        raise BadRequest("Invalid CSR: its signature does not verify with its public key")
    return csr


def _check_key(csr: x509.CertificateSigningRequest) -> None:
    try:
        public = csr.public_key()
    except Exception:
        raise BadRequest("Invalid CSR: unsupported public key type") from None
    if isinstance(public, rsa.RSAPublicKey):
        if not _MIN_RSA_BITS <= public.key_size <= _MAX_RSA_BITS:
            raise BadRequest(
                f"Invalid CSR: RSA keys must be {_MIN_RSA_BITS} to {_MAX_RSA_BITS} bits, not {public.key_size}"
            )
        return
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in _EC_CURVES:
            raise BadRequest(
                f"Invalid CSR: ECDSA curve {public.curve.name} is not supported (use P-256, P-384 or P-521)"
            )
        return
    raise BadRequest(
        f"Invalid CSR: {type(public).__name__.removeprefix('_')} keys are not supported "
        "(use ECDSA P-256/P-384 or RSA of at least 2048 bits)"
    )


_SAN_TYPE_NAMES = {
    x509.IPAddress: "IP address",
    x509.RFC822Name: "email",
    x509.DirectoryName: "directory name",
    x509.RegisteredID: "registered ID",
    x509.OtherName: "other name",
}


def _requested_sans(csr: x509.CertificateSigningRequest) -> tuple[list[str], list[str]]:
    """(URIs, DNS names) the CSR asks for; anything else it asks for is a 400."""
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension) as exc:
        raise BadRequest(f"Invalid CSR: malformed extensions: {exc}") from None
    sans: list[x509.GeneralName] = []
    for ext in extensions:
        if ext.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            sans = list(ext.value)
            continue
        if ext.oid == ExtensionOID.BASIC_CONSTRAINTS and ext.value.ca:
            raise BadRequest(
                "Invalid CSR: it asks for a CA certificate (BasicConstraints CA:true); "
                "the CA signs only leaves"
            )
        name = getattr(ext.oid, "_name", None) or ext.oid.dotted_string
        raise BadRequest(
            f"Invalid CSR: extension {name} is not accepted (a CSR carries only subjectAltName)"
        )
    uris, dns = [], []
    for san in sans:
        if isinstance(san, x509.UniformResourceIdentifier):
            uris.append(san.value)
        elif isinstance(san, x509.DNSName):
            dns.append(san.value)
        else:
            what = _SAN_TYPE_NAMES.get(type(san), type(san).__name__)
            raise BadRequest(
                f"Invalid CSR: a SAN of type {what} is not accepted (only one SPIFFE ID URI and DNS names)"
            )
    return uris, dns


def _is_hostname(value: str) -> bool:
    if not value:
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return True
    return False


def allowed_dns_names(kind: str, name: str, dc: str) -> set[str]:
    """DNS SANs a leaf may carry without looking at the catalog: the names
    meshweb's DNS interface answers for that service or node."""
    domain = settings.MESH_DNS_DOMAIN
    if kind == "service":
        return {
            name,
            f"{name}.service.{domain}",
            f"{name}.service.{dc}.{domain}",
            f"{name}.virtual.{domain}",
        }
    return {name, f"{name}.node.{domain}", f"{name}.node.{dc}.{domain}"}


def _listed_dns_names(kind: str, name: str) -> set[str]:
    """Host names the catalog lists for the service's instances (or the node)."""
    names: set[str] = set()
    if kind == "service":
        rows = ServiceInstance.objects.filter(name=name).values_list("address", "tagged_addresses")
    else:
        rows = Node.objects.filter(name=name).values_list("address", "tagged_addresses")
    for address, tagged in rows:
        names.add(address)
        for value in (tagged or {}).values():
            names.add(value.get("Address", "") if isinstance(value, dict) else str(value))
    return {n.lower() for n in names if _is_hostname(n)}


def _authorise(
    identity, csr_uri: str, dns_names: list[str], state: SigningState, agent: bool = False
):
    """The identity the CSR asks for, if `identity` may have it (else 403)."""
    try:
        wanted = spiffe.parse(csr_uri)
    except spiffe.SpiffeError as exc:
        raise PermissionDenied(f"Permission denied: {exc}") from None
    if wanted.trust_domain != state.trust_domain:
        raise PermissionDenied(
            f'Permission denied: SPIFFE ID trust domain "{wanted.trust_domain}" is not this '
            f'cluster\'s "{state.trust_domain}"'
        )
    dc = wanted.datacenter
    if dc != settings.MESH_DC and not Datacenter.objects.filter(name=dc).exists():
        raise PermissionDenied(f'Permission denied: SPIFFE ID names unknown datacenter "{dc}"')
    authz = identity.authorizer
    if isinstance(wanted, spiffe.ServiceID):
        if wanted.namespace != "default":
            raise PermissionDenied(
                f'Permission denied: namespace "{wanted.namespace}" does not exist (only "default")'
            )
        kind, name = "service", wanted.service
        if not authz.service_write(name):
            raise _denied(identity, "service:write", name)
    else:
        kind, name = "agent", wanted.node
        if not authz.node_write(name):
            raise _denied(identity, "node:write", name)
        if not agent and not authz.acl_write():
            # A node identity is minted by the join flow (which binds it to the
            # node); elsewhere only a token that may mint join tokens gets one.
            raise PermissionDenied(
                "Permission denied: node certificates are issued by the join flow "
                "(mesh join-token create, mesh agent -join-token); signing an agent "
                "ID here needs acl:write"
            )
    allowed = allowed_dns_names(kind, name, dc)
    unexpected = [d for d in dns_names if d.lower() not in allowed]
    if unexpected:
        listed = _listed_dns_names(kind, name)
        unexpected = [d for d in unexpected if d.lower() not in listed]
    if unexpected:
        raise PermissionDenied(
            f'Permission denied: DNS SAN "{unexpected[0]}" is not a name of {kind} "{name}" '
            f"(allowed: {', '.join(sorted(allowed))}, or a host name the catalog lists for it)"
        )
    return wanted, kind, name


def sign_csr(identity, csr_pem: str | bytes, *, agent: bool = False) -> SignedLeaf:
    """Sign a CSR for the identity (service or agent SPIFFE ID) it asks for.

    `identity` is the caller's `registry.domain.acl.Identity`: a service ID
    needs `service:write` on the service, an agent ID `node:write` on the node
    and either `agent=True` (the join flow and node renewals, which bind the
    certificate to the node) or `acl:write`.
    Errors: 429 when the signing rate limit's queue is full; 400 for a CSR
    that is not one (garbage, bad signature, unsupported key, CA:true or
    other extensions, SANs other than URI/DNS); 403 for an identity the
    caller may not have (no or several URI SANs, a foreign trust domain,
    another service, DNS names that are not the service's).
    """
    state = signing_state()
    limiter.configure(state.settings.csr_rate, state.settings.csr_queue)
    limiter.acquire()
    csr = _load_csr(csr_pem)
    _check_key(csr)
    uris, dns_names = _requested_sans(csr)
    if len(uris) != 1:
        raise PermissionDenied(
            f"Permission denied: a CSR must ask for exactly one URI SAN (a SPIFFE ID), not {len(uris)}"
        )
    wanted, kind, name = _authorise(identity, uris[0], dns_names, state, agent)
    cert = state.provider.sign_leaf(
        state.signer,
        csr,
        wanted.uri,
        list(dict.fromkeys(dns_names)),
        dt.timedelta(seconds=state.settings.effective_leaf_ttl),
        name,
    )
    info = pki.info(cert)
    with Change() as w:
        IssuedCert.objects.create(
            serial=info.serial,
            spiffe_id=wanted.uri,
            kind=kind,
            name=name,
            root_id=state.root_id,
            not_after=info.not_after,
        )
        if kind == "service":
            w.touch(leaf_topic(name))
        w.audit(
            "ca.sign",
            f"ca-leaf-{kind}",
            info.serial,
            None,
            {"SpiffeID": wanted.uri, "RootID": state.root_id, "NotAfter": info.not_after},
        )
    return SignedLeaf(
        cert_pem=pki.cert_pem(cert),
        intermediates=state.intermediates,
        root_id=state.root_id,
        serial=info.serial,
        spiffe_id=wanted.uri,
        kind=kind,
        name=name,
        not_before=info.not_before,
        not_after=info.not_after,
        index=w.index,
    )


# --- the server agent's leaves ------------------------------------------------------------


@dataclass(frozen=True)
class AgentLeaf:
    """A cached leaf with its private key (generated here, never stored)."""

    leaf: SignedLeaf
    key_pem: str
    renew_at: dt.datetime

    def json(self) -> dict[str, Any]:
        """Consul's IssuedCert as `/v1/agent/connect/ca/leaf/:service` answers it."""
        return {
            "SerialNumber": self.leaf.serial,
            "CertPEM": self.leaf.chain_pem,
            "PrivateKeyPEM": self.key_pem,
            "Service": self.leaf.name,
            "ServiceURI": self.leaf.spiffe_id,
            "ValidAfter": _rfc3339(self.leaf.not_before),
            "ValidBefore": _rfc3339(self.leaf.not_after),
            "CreateIndex": self.leaf.index,
            "ModifyIndex": self.leaf.index,
        }


_leaves: dict[tuple[str, str], AgentLeaf] = {}
_leaf_locks: dict[tuple[str, str], threading.Lock] = {}
_leaf_locks_guard = threading.Lock()


def _renew_at(leaf: SignedLeaf) -> dt.datetime:
    issued = leaf.not_before + BACKDATE
    return issued + (leaf.not_after - issued) / 2


def agent_leaf(identity, service: str) -> AgentLeaf:
    """The leaf for `service` on the server's node, from the cache while it is
    younger than half its lifetime and signed by the active root; else a new
    key and leaf. Needs `service:write` on the service."""
    if not identity.authorizer.service_write(service):
        raise _denied(identity, "service:write", service)
    dc = settings.MESH_DC
    state = signing_state()
    try:
        uri = spiffe.service_id(state.trust_domain, service, dc).uri
    except spiffe.SpiffeError as exc:
        raise BadRequest(f"Invalid service name: {exc}") from None
    key = (service, dc)
    cached = _leaves.get(key)
    if _fresh(cached, state):
        return cached  # type: ignore[return-value]
    with _leaf_locks_guard:
        lock = _leaf_locks.setdefault(key, threading.Lock())
    with lock:
        cached = _leaves.get(key)
        state = signing_state()
        if _fresh(cached, state):
            return cached  # type: ignore[return-value]
        private = pki.generate_key(state.settings.key_type, state.settings.key_bits)
        leaf = sign_csr(identity, pki.make_csr(private, uri))
        entry = AgentLeaf(leaf, pki.key_pem(private), _renew_at(leaf))
        _leaves[key] = entry
        return entry


def _fresh(entry: AgentLeaf | None, state: SigningState) -> bool:
    return (
        entry is not None
        and entry.leaf.root_id == state.root_id
        and timezone.now() < entry.renew_at
    )


def leaf_renew_at(service: str) -> dt.datetime | None:
    """When the cached leaf of `service` is due for renewal (for blocking readers)."""
    entry = _leaves.get((service, settings.MESH_DC))
    return entry.renew_at if entry is not None else None
