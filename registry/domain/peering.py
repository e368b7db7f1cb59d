"""Cluster peering between separate control planes (Consul's `/v1/peering`).

Two clusters peer in three steps:

1. the *acceptor* makes a token (`generate_token`): a PENDING peering row
   holding the hash of the token's establishment secret and its expiry;
2. the *dialer* presents it (`establish`): it calls the acceptor's
   `exchange` with the token, its trust domain, CA roots, server addresses
   and a stream secret; the acceptor checks the token (signature, expiry,
   single use: `meshproto.peering`), stores the dialer's trust bundle, and
   answers with its own and a stream secret of its own. The dialer checks
   the acceptor's roots against the token's pin. Both rows are ACTIVE;
3. each side pulls what the other exports to it (`export_feed`, a blocking
   query answered only to the holder of the stream secret) and stores it as
   `ImportedService` rows (`apply_import`): `?peer=` reads serve them and
   sidecars with a `DestinationPeer` upstream dial them.

Deleting a peering removes its imports and the peer's trust from every
sidecar, tells the peer (which turns its side TERMINATED), and invalidates
the secret it pulled our exports with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
import uuid
from typing import Any

import httpx
from django.conf import settings
from django.utils import timezone

from meshproto import durations, spiffe
from meshproto import peering as pure
from meshproto.config_entries import exported_to
from registry import topics as topic
from registry.acl_rules import Authorizer
from registry.ca.secrets import decrypt, encrypt
from registry.domain import connect_ca, reads
from registry.domain.catalog import aggregate_status
from registry.domain.inventory import ServiceSummary
from registry.errors import BadRequest, MeshError, NotFound, PermissionDenied
from registry.models import ConfigEntry, ImportedService, Peering, ServiceInstance
from registry.txn import Change, topic_index, topics_index

log = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL = 3600.0
MAX_TOKEN_TTL = 7 * 24 * 3600.0
MAX_EXPORTED_SERVICES = 512  # per peer
MAX_INSTANCES = 256  # per exported service (healthy ones; the rest are left out)
MAX_ROOTS = 16
PEER_CALL_TIMEOUT = 10.0
ZERO_TIME = "0001-01-01T00:00:00Z"


class PeerUnreachable(MeshError):
    """The other cluster could not be reached (or answered nonsense)."""

    status = 502


def _bad(err: pure.PeeringError) -> BadRequest:
    return BadRequest(str(err))


def _now() -> dt.datetime:
    return timezone.now()


def _rfc3339(value: dt.datetime | None) -> str:
    if value is None:
        return ZERO_TIME
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def signing_key() -> bytes:
    return pure.signing_key(settings.SECRET_KEY)


def local_roots() -> list[str]:
    """Our CA roots (PEM), the trust bundle a peer gets."""
    _, data = connect_ca.roots_json()
    return [r["RootCert"] for r in data["Roots"]]


def local_addresses(requested: list[str] | None = None) -> list[str]:
    """Where a peer reaches our API: the request's `ServerExternalAddresses`,
    else `MESH_PEERING_ADDRESSES`, else the HTTP listen address."""
    if requested:
        return list(requested)
    configured = [a.strip() for a in settings.MESH_PEERING_ADDRESSES.split(",") if a.strip()]
    if configured:
        return configured
    host, port = settings.MESH_HTTP_ADDR
    return [f"{host}:{port}"]


def _touch(change: Change, name: str) -> None:
    change.touch(topic.PEERINGS, topic.peering(name))


# --------------------------------------------------------------------------- shapes


def peering_json(row: Peering) -> dict[str, Any]:
    """One peering as Consul's `GET /v1/peering/:name` shows it (plus meshweb's
    `PeerTrustDomain`, `LastError`)."""
    imported = sorted(row.imports.values_list("name", flat=True)) if row.pk else []
    exported = sorted(_exported_names(row.name)) if row.state == Peering.ACTIVE else []
    return {
        "ID": row.id,
        "Name": row.name,
        "Partition": "default",
        "Meta": row.meta or {},
        "State": row.state,
        "PeerID": row.peer_id,
        "PeerCAPems": list(row.peer_ca_pems or []),
        "PeerServerName": row.peer_trust_domain,
        "PeerServerAddresses": list(row.peer_server_addresses or []),
        "PeerTrustDomain": row.peer_trust_domain,
        "Remote": {"Partition": "default", "Datacenter": row.peer_datacenter},
        "StreamStatus": {
            "ImportedServices": imported,
            "ExportedServices": exported,
            "LastHeartbeat": _rfc3339(row.last_receive),
            "LastReceive": _rfc3339(row.last_receive),
            "LastSend": _rfc3339(row.last_send),
        },
        "LastError": row.last_error,
        "CreateIndex": row.create_index,
        "ModifyIndex": row.modify_index,
    }


# --------------------------------------------------------------------------- reads


_EXPORTS = topic.config_entry("exported-services", "default")


def list_peerings() -> tuple[int, list[dict]]:
    index = topics_index((topic.PEERINGS, _EXPORTS), (topic.peered_services(""),))
    return index, [peering_json(r) for r in Peering.objects.order_by("name")]


def read(name: str) -> tuple[int, dict | None]:
    index = topic_index(topic.peering(name), topic.peered_services(name), _EXPORTS)
    row = Peering.objects.filter(name=name).first()
    return index, peering_json(row) if row else None


def active_trust() -> dict[str, dict[str, Any]]:
    """peer name -> {trust_domain, roots} for every ACTIVE peering (what sidecars
    trust beside their own roots, each for its own trust domain only)."""
    out = {}
    live = (Peering.ACTIVE, Peering.FAILING, Peering.ESTABLISHING)
    for row in Peering.objects.filter(state__in=live).order_by("name"):
        if row.peer_trust_domain and row.peer_ca_pems:
            out[row.name] = {
                "trust_domain": row.peer_trust_domain,
                "roots": list(row.peer_ca_pems),
            }
    return out


# --------------------------------------------------------------------------- token


def _ttl(expires_in: Any) -> float:
    if expires_in in (None, ""):
        return DEFAULT_TOKEN_TTL
    try:
        ttl = durations.seconds(expires_in)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"ExpiresIn: {exc}") from None
    if ttl <= 0 or ttl > MAX_TOKEN_TTL:
        raise BadRequest("ExpiresIn must be above 0s and at most 168h")
    return ttl


def _meta(meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise BadRequest("Meta must be an object of strings")
    if len(meta) > 64:
        raise BadRequest("Meta has more than 64 keys")
    return dict(meta)


def _addresses(value: Any, what: str) -> list[str]:
    if value in (None, []):
        return []
    if (
        not isinstance(value, list)
        or len(value) > pure.MAX_ADDRESSES
        or not all(isinstance(a, str) and a and len(a) < 300 for a in value)
    ):
        raise BadRequest(f"{what} must be a list of at most {pure.MAX_ADDRESSES} addresses")
    return list(value)


def generate_token(body: dict[str, Any]) -> dict[str, str]:
    """`POST /v1/peering/token`: a signed, single-use, expiring token for `PeerName`.

    A new token for a PENDING peering replaces the previous one (which then
    fails as superseded); a peering that is ACTIVE must be deleted first.
    """
    try:
        name = pure.check_peer_name(body.get("PeerName"))
    except pure.PeeringError as err:
        raise _bad(err) from None
    meta = _meta(body.get("Meta"))
    addresses = local_addresses(
        _addresses(body.get("ServerExternalAddresses"), "ServerExternalAddresses")
    )
    ttl = _ttl(body.get("ExpiresIn"))
    secret = pure.new_secret()
    expires = int(time.time() + ttl)
    td = connect_ca.trust_domain()
    roots = local_roots()
    with Change() as change:
        row = Peering.objects.select_for_update().filter(name=name).first()
        if row is not None and row.state in (Peering.ACTIVE, Peering.FAILING):
            raise BadRequest(
                f'peering "{name}" is already established; delete it before generating a new token'
            )
        before = peering_json(row) if row else None
        if row is None or row.dialer:
            if row is not None:  # a terminated dialer row: start afresh as acceptor
                row.delete()
            row = Peering(id=str(uuid.uuid4()), name=name, create_index=change.index)
        row.state = Peering.PENDING
        row.dialer = False
        row.meta = meta
        row.token_secret_hash = pure.secret_hash(secret)
        row.token_expires_at = dt.datetime.fromtimestamp(expires, dt.UTC)
        row.token_used_at = None
        row.peer_id = row.peer_trust_domain = row.peer_datacenter = ""
        row.peer_server_addresses, row.peer_ca_pems = [], []
        row.inbound_secret_hash = row.outbound_secret_encrypted = row.last_error = ""
        row.modify_index = change.index
        row.save()
        change.audit("peering.token", "peering", name, before, peering_json(row))
        _touch(change, name)
    payload = pure.TokenPayload(
        PeerID=row.id,
        PeerName=name,
        ServerAddresses=tuple(addresses),
        TrustDomain=td,
        Datacenter=settings.MESH_DC,
        CAPin=pure.roots_pin(roots),
        ExpiresAt=expires,
        EstablishmentSecret=secret,
    )
    return {"PeeringToken": pure.encode_token(payload, signing_key())}


def _check_roots(value: Any, what: str) -> list[str]:
    if (
        not isinstance(value, list)
        or not value
        or len(value) > MAX_ROOTS
        or not all(isinstance(p, str) and "-----BEGIN CERTIFICATE-----" in p for p in value)
    ):
        raise BadRequest(f"{what} must be a list of 1 to {MAX_ROOTS} PEM certificates")
    return list(value)


def _check_td(value: Any, what: str) -> str:
    try:
        return spiffe.check_trust_domain(value if isinstance(value, str) else "")
    except spiffe.SpiffeError:
        raise BadRequest(f"{what} {value!r} is not a trust domain") from None


# --------------------------------------------------------------------------- acceptor side


def exchange(body: dict[str, Any]) -> dict[str, Any]:
    """The acceptor's half of establishment, called by the dialer's server.

    Refuses (400, saying which) a token that is malformed, altered, expired,
    already used or superseded, or whose peering was deleted; otherwise makes
    the peering ACTIVE with the dialer's trust bundle and answers with ours.
    """
    try:
        payload = pure.verify(body.get("PeeringToken"), signing_key(), time.time())
    except pure.PeeringError as err:
        raise _bad(err) from None
    peer_id = body.get("PeerID")
    if not isinstance(peer_id, str) or not peer_id or len(peer_id) > 36:
        raise BadRequest("PeerID is required")
    td = _check_td(body.get("TrustDomain"), "TrustDomain")
    if td == connect_ca.trust_domain():
        raise BadRequest("cannot peer a cluster with itself (same trust domain)")
    roots = _check_roots(body.get("Roots"), "Roots")
    addresses = _addresses(body.get("ServerAddresses"), "ServerAddresses")
    if not addresses:
        raise BadRequest("ServerAddresses is required")
    their_secret = body.get("StreamSecret")
    if not isinstance(their_secret, str) or len(their_secret) < 32 or len(their_secret) > 256:
        raise BadRequest("StreamSecret is required")
    datacenter = body.get("Datacenter") if isinstance(body.get("Datacenter"), str) else ""
    ours = pure.new_secret()
    with Change() as change:
        row = Peering.objects.select_for_update().filter(id=payload.PeerID).first()
        if row is None or row.dialer:
            raise BadRequest("peering token is no longer valid: its peering was deleted")
        if row.token_secret_hash != pure.secret_hash(payload.EstablishmentSecret):
            raise BadRequest(
                "peering token was superseded: a newer token was generated for this peering"
            )
        used = Peering.objects.filter(
            id=row.id, token_secret_hash=row.token_secret_hash, token_used_at__isnull=True
        ).update(token_used_at=_now())
        if not used:
            raise BadRequest(
                "peering token has already been used: generate a new one on the accepting cluster"
            )
        row.refresh_from_db()
        before = peering_json(row)
        # ACTIVE once the dialer has stored its side: its first pull says so.
        row.state = Peering.ESTABLISHING
        row.peer_id = peer_id
        row.peer_trust_domain = td
        row.peer_datacenter = datacenter[:128]
        row.peer_server_addresses = addresses
        row.peer_ca_pems = roots
        row.inbound_secret_hash = pure.secret_hash(ours)
        row.outbound_secret_encrypted = encrypt(their_secret)
        row.last_error = ""
        row.modify_index = change.index
        row.save()
        change.audit("peering.accept", "peering", row.name, before, peering_json(row))
        _touch(change, row.name)
    return {
        "PeerID": row.id,
        "TrustDomain": connect_ca.trust_domain(),
        "Datacenter": settings.MESH_DC,
        "Roots": local_roots(),
        "ServerAddresses": list(payload.ServerAddresses),
        "StreamSecret": ours,
    }


# --------------------------------------------------------------------------- dialer side


def _post(
    addresses: list[str] | tuple[str, ...], path: str, body: dict, headers=None
) -> httpx.Response:
    """POST to the first of a peer's servers that answers."""
    last: Exception | None = None
    for address in addresses:
        try:
            return httpx.post(
                pure.server_url(address) + path,
                json=body,
                headers=headers or {},
                timeout=PEER_CALL_TIMEOUT,
            )
        except httpx.HTTPError as exc:
            last = exc
    raise PeerUnreachable(f"cannot reach the peer's servers ({', '.join(addresses)}): {last}")


def establish(body: dict[str, Any]) -> dict:
    """`POST /v1/peering/establish`: peer with the cluster that issued `PeeringToken`."""
    try:
        name = pure.check_peer_name(body.get("PeerName"))
        payload, _ = pure.decode_token(body.get("PeeringToken"))
        pure.check_expiry(payload, time.time())
    except pure.PeeringError as err:
        raise _bad(err) from None
    meta = _meta(body.get("Meta"))
    our_td = connect_ca.trust_domain()
    if payload.TrustDomain == our_td:
        raise BadRequest("cannot peer a cluster with itself (same trust domain)")
    existing = Peering.objects.filter(name=name).first()
    if existing is not None and existing.state in (Peering.ACTIVE, Peering.FAILING):
        raise BadRequest(f'peering "{name}" is already established; delete it first')
    if existing is not None and not existing.dialer and existing.state == Peering.PENDING:
        raise BadRequest(
            f'peering "{name}" is a pending peering this cluster generated a token for; '
            "use another name or delete it first"
        )
    our_id = str(uuid.uuid4())
    ours = pure.new_secret()
    answer = _post(
        payload.ServerAddresses,
        "/v1/peering/exchange",
        {
            "PeeringToken": body.get("PeeringToken"),
            "PeerID": our_id,
            "TrustDomain": our_td,
            "Datacenter": settings.MESH_DC,
            "Roots": local_roots(),
            "ServerAddresses": local_addresses(),
            "StreamSecret": ours,
        },
    )
    if answer.status_code != 200:
        text = answer.text.strip()[:500]
        if 400 <= answer.status_code < 500:
            raise BadRequest(f"the accepting cluster refused the peering: {text}")
        raise PeerUnreachable(f"the accepting cluster failed ({answer.status_code}): {text}")
    try:
        reply = answer.json()
        roots = reply["Roots"]
        their_secret = reply["StreamSecret"]
        their_td = reply["TrustDomain"]
        their_id = reply["PeerID"]
    except (ValueError, KeyError, TypeError):
        raise PeerUnreachable(
            "the accepting cluster answered something other than a peering"
        ) from None
    if pure.roots_pin(roots) != payload.CAPin or their_td != payload.TrustDomain:
        raise BadRequest(
            "the accepting cluster's CA roots do not match the token's pin: refusing to trust them"
        )
    roots = _check_roots(roots, "the peer's Roots")
    with Change() as change:
        row = Peering.objects.select_for_update().filter(name=name).first()
        before = peering_json(row) if row else None
        if row is not None:
            row.delete()
        row = Peering(
            id=our_id,
            name=name,
            state=Peering.ACTIVE,
            dialer=True,
            meta=meta,
            peer_id=str(their_id)[:36],
            peer_trust_domain=their_td,
            peer_datacenter=str(reply.get("Datacenter") or payload.Datacenter)[:128],
            peer_server_addresses=list(payload.ServerAddresses),
            peer_ca_pems=roots,
            inbound_secret_hash=pure.secret_hash(ours),
            outbound_secret_encrypted=encrypt(str(their_secret)),
            create_index=change.index,
            modify_index=change.index,
        )
        row.save()
        change.audit("peering.establish", "peering", name, before, peering_json(row))
        _touch(change, name)
    return {}


# --------------------------------------------------------------------------- delete


def _drop_imports(change: Change, row: Peering) -> None:
    for name in list(row.imports.values_list("name", flat=True)):
        _touch_import(change, row.name, name)
    row.imports.all().delete()
    change.touch(topic.peered_services(row.name))


def _touch_import(change: Change, peer: str, name: str) -> None:
    change.touch(topic.peered_service(peer, name), topic.peered_services(peer))


def delete(name: str) -> bool:
    """`DELETE /v1/peering/:name`: cut the peering. Its imports and the peer's
    trust go at once; the peer is told (best effort: otherwise it learns on
    its next pull, which our server now refuses)."""
    with Change() as change:
        row = Peering.objects.select_for_update().filter(name=name).first()
        if row is None:
            return False
        before = peering_json(row)
        addresses = list(row.peer_server_addresses or [])
        secret = decrypt(row.outbound_secret_encrypted) if row.outbound_secret_encrypted else ""
        _drop_imports(change, row)
        row.delete()
        change.audit("peering.delete", "peering", name, before, None)
        _touch(change, name)
    if addresses and secret:
        try:
            _post(addresses, "/v1/peering/terminate", {}, {pure.SECRET_HEADER: secret})
        except MeshError as exc:
            log.info("peering %s deleted; the peer could not be told: %s", name, exc)
    return True


def _by_secret(secret: str) -> Peering:
    if not secret:
        raise PermissionDenied("peering secret required")
    row = Peering.objects.filter(inbound_secret_hash=pure.secret_hash(secret)).first()
    if row is None or row.state not in (Peering.ACTIVE, Peering.FAILING, Peering.ESTABLISHING):
        raise PermissionDenied("peering secret not recognised: the peering was deleted")
    return row


def confirm(secret: str) -> None:
    """The dialer pulled for the first time: it stored its side, so ours is ACTIVE
    (and only now do we pull from it: before, it could not know our secret)."""
    with Change() as change:
        row = (
            Peering.objects.select_for_update()
            .filter(inbound_secret_hash=pure.secret_hash(secret), state=Peering.ESTABLISHING)
            .first()
        )
        if row is None:
            return
        before = peering_json(row)
        row.state = Peering.ACTIVE
        row.modify_index = change.index
        row.save(update_fields=["state", "modify_index"])
        change.audit("peering.active", "peering", row.name, before, peering_json(row))
        _touch(change, row.name)


def terminate(secret: str) -> None:
    """The peer deleted the peering: our side becomes TERMINATED, imports and trust go."""
    with Change() as change:
        row = _by_secret(secret)
        row = Peering.objects.select_for_update().get(pk=row.pk)
        _terminated(change, row, "the peer deleted the peering")


def _terminated(change: Change, row: Peering, why: str) -> None:
    before = peering_json(row)
    _drop_imports(change, row)
    row.state = Peering.TERMINATED
    row.inbound_secret_hash = ""
    row.outbound_secret_encrypted = ""
    row.peer_ca_pems = []
    row.last_error = why
    row.modify_index = change.index
    row.save()
    change.audit("peering.terminated", "peering", row.name, before, peering_json(row))
    _touch(change, row.name)


# --------------------------------------------------------------------------- exporting


def _exported_entry() -> dict | None:
    return (
        ConfigEntry.objects.filter(kind="exported-services", name="default")
        .values_list("data", flat=True)
        .first()
    )


def _exported_names(peer: str) -> set[str]:
    everything, names = exported_to(_exported_entry(), peer)
    if everything:
        names |= set(
            ServiceInstance.objects.filter(kind="typical", node__datacenter__name=settings.MESH_DC)
            .values_list("name", flat=True)
            .distinct()
        )
    return names


def feed_topics(peer: str) -> list[str]:
    """What the export feed to `peer` depends on (read before computing it)."""
    names = sorted(_exported_names(peer))[:MAX_EXPORTED_SERVICES]
    out = [
        topic.config_entry("exported-services", "default"),
        topic.peering(peer),
        topic.SERVICES,  # a mesh gateway or (for `*`) a service registered
    ]
    for n in names:
        out += [topic.service(n), topic.connect(n)]
    return out


def _gateways(authz: Authorizer) -> list[dict]:
    """Our healthy mesh gateways' WAN addresses (what a peer dials)."""
    names = sorted(
        set(
            ServiceInstance.objects.filter(
                kind="mesh-gateway", node__datacenter__name=settings.MESH_DC
            ).values_list("name", flat=True)
        )
    )
    out = []
    for gname in names:
        _, entries = reads.health_service(authz, gname, settings.MESH_DC, passing=True)
        for e in entries:
            svc = e["Service"]
            wan = (svc.get("TaggedAddresses") or {}).get("wan") or {}
            address = wan.get("Address") or svc.get("Address") or e["Node"]["Address"]
            port = wan.get("Port") or svc.get("Port")
            out.append({"Address": address, "Port": port})
    return sorted(out, key=lambda g: (g["Address"], g["Port"]))


def _strip(entry: dict) -> dict:
    """A health entry as a peer gets it: no raw check definitions."""
    checks = [
        {k: c.get(k) for k in ("CheckID", "Name", "Status", "Output", "ServiceID", "ServiceName")}
        for c in entry["Checks"]
    ]
    return {"Node": entry["Node"], "Service": entry["Service"], "Checks": checks}


def export_payload(row: Peering) -> dict[str, Any]:
    """Everything we export to the peer `row`, bounded, with a content hash."""
    from registry.domain.config_entries import service_protocol

    authz = Authorizer.management()
    td = connect_ca.trust_domain()
    dc = settings.MESH_DC
    gateways = _gateways(authz)
    services: dict[str, Any] = {}
    for name in sorted(_exported_names(row.name))[:MAX_EXPORTED_SERVICES]:
        _, healthy = reads.health_service(authz, name, dc, passing=True)
        _, proxies = reads.health_service(authz, name, dc, passing=True, connect=True)
        endpoints = sorted(
            (
                {
                    "Address": p["Service"]["Address"] or p["Node"]["Address"],
                    "Port": p["Service"]["Port"],
                }
                for p in proxies
                if p["Service"]["Kind"] == "connect-proxy"
            ),
            key=lambda e: (e["Address"], e["Port"]),
        )[:MAX_INSTANCES]
        if not healthy:
            continue
        services[name] = {
            "Instances": [_strip(e) for e in healthy[:MAX_INSTANCES]],
            "Connect": {
                "SpiffeID": spiffe.service_id(td, name, dc).uri,
                "SNI": pure.peered_sni(name, "default", dc, td),
                "Protocol": service_protocol(name),
                "Datacenter": dc,
                "TrustDomain": td,
                "Gateways": gateways,
                "Endpoints": endpoints,
            },
        }
    digest = hashlib.sha256(json.dumps(services, sort_keys=True).encode()).hexdigest()
    return {"Services": services, "Hash": digest}


def feed_peer(secret: str) -> Peering:
    """The peering whose stream secret this is (PermissionDenied otherwise)."""
    return _by_secret(secret)


def feed_index(peer: str) -> int:
    return topics_index(tuple(feed_topics(peer)))


def note_sent(row: Peering) -> None:
    """Stream status only (no index, no announcement): when we last answered."""
    Peering.objects.filter(pk=row.pk).update(last_send=_now())


# --------------------------------------------------------------------------- importing


def _clean_import(name: Any, data: Any) -> tuple[str, list, dict]:
    if not isinstance(name, str) or not name or len(name) > 256 or not isinstance(data, dict):
        raise ValueError("malformed exported service")
    instances = data.get("Instances")
    connect = data.get("Connect")
    if not isinstance(instances, list) or not isinstance(connect, dict):
        raise ValueError(f"exported service {name!r} is malformed")
    return name, instances[:MAX_INSTANCES], connect


def apply_import(peering_id: str, payload: dict[str, Any]) -> int:
    """Store what a peer exports to us: only the services that changed are
    written (their topics wake `?peer=` readers and sidecars). Returns how many
    services changed."""
    services = payload.get("Services")
    if not isinstance(services, dict) or len(services) > MAX_EXPORTED_SERVICES:
        raise ValueError("the peer's export is malformed")
    cleaned: dict[str, tuple[list, dict]] = {}
    for n, d in services.items():
        name, instances, connect = _clean_import(n, d)
        cleaned[name] = (instances, connect)
    with Change() as change:
        row = Peering.objects.select_for_update().filter(id=peering_id).first()
        if row is None or row.state not in (Peering.ACTIVE, Peering.FAILING):
            return 0
        if row.state == Peering.FAILING or row.last_error:
            row.state, row.last_error = Peering.ACTIVE, ""
            row.modify_index = change.index
            row.save(update_fields=["state", "last_error", "modify_index"])
            _touch(change, row.name)
        changed = 0
        existing = {i.name: i for i in row.imports.all()}
        for name, (instances, connect) in cleaned.items():
            imp = existing.pop(name, None)
            if imp is not None and imp.instances == instances and imp.connect == connect:
                continue
            if imp is None:
                imp = ImportedService(peering=row, name=name, create_index=change.index)
            imp.instances, imp.connect, imp.modify_index = instances, connect, change.index
            imp.save()
            _touch_import(change, row.name, name)
            changed += 1
        for imp in existing.values():
            imp.delete()
            _touch_import(change, row.name, imp.name)
            changed += 1
        Peering.objects.filter(pk=row.pk).update(last_receive=_now())
    return changed


def note_failure(peering_id: str, error: str, *, revoked: bool = False) -> None:
    """A pull failed: FAILING (kept imports: static stability), or, when the
    peer refused our secret (it deleted the peering), TERMINATED."""
    with Change() as change:
        row = Peering.objects.select_for_update().filter(id=peering_id).first()
        if row is None or row.state not in (Peering.ACTIVE, Peering.FAILING):
            return
        if revoked:
            _terminated(change, row, error)
            return
        if row.state == Peering.FAILING and row.last_error == error[:1000]:
            return
        row.state, row.last_error = Peering.FAILING, error[:1000]
        row.modify_index = change.index
        row.save(update_fields=["state", "last_error", "modify_index"])
        _touch(change, row.name)


def pull_targets() -> list[tuple[str, str, list[str], str]]:
    """(id, name, peer addresses, our secret) of every peering we pull from."""
    out = []
    for row in Peering.objects.filter(state__in=(Peering.ACTIVE, Peering.FAILING)):
        if row.outbound_secret_encrypted and row.peer_server_addresses:
            out.append(
                (
                    row.id,
                    row.name,
                    list(row.peer_server_addresses),
                    decrypt(row.outbound_secret_encrypted),
                )
            )
    return out


# --------------------------------------------------------------------------- `?peer=` reads


def _imports(peer: str, name: str | None = None):
    qs = ImportedService.objects.filter(
        peering__name=peer, peering__state__in=(Peering.ACTIVE, Peering.FAILING)
    )
    if name is not None:
        qs = qs.filter(name=name)
    return qs.order_by("name")


def _with_peer(entry: dict, peer: str) -> dict:
    node = {**entry.get("Node", {}), "PeerName": peer}
    service = {**entry.get("Service", {}), "PeerName": peer}
    checks = [{**c, "PeerName": peer} for c in entry.get("Checks", [])]
    return {"Node": node, "Service": service, "Checks": checks}


def peer_services(authz: Authorizer, peer: str) -> tuple[int, dict[str, list[str]]]:
    """`/v1/catalog/services?peer=`: imported service names and their tags."""
    index = topic_index(topic.peered_services(peer), topic.peering(peer))
    out = {}
    for imp in _imports(peer):
        if authz.service_read(imp.name):
            tags: set[str] = set()
            for e in imp.instances:
                tags.update((e.get("Service") or {}).get("Tags") or [])
            out[imp.name] = sorted(tags)
    return index, out


def peer_health(
    authz: Authorizer,
    peer: str,
    name: str,
    *,
    tags: list[str] = (),
    passing: bool = False,  # type: ignore[assignment]
) -> tuple[int, list[dict]]:
    """`/v1/health/service/:name?peer=`: the imported instances, `PeerName` set."""
    index = topic_index(topic.peered_service(peer, name), topic.peering(peer))
    if not authz.service_read(name):
        return index, []
    out = []
    for imp in _imports(peer, name):
        for e in imp.instances:
            svc_tags = set((e.get("Service") or {}).get("Tags") or [])
            if not all(t in svc_tags for t in tags):
                continue
            if passing and any(c.get("Status") != "passing" for c in e.get("Checks", [])):
                continue
            out.append(_with_peer(e, peer))
    return index, out


def peer_names() -> list[str]:
    """The peers whose imports we serve (ACTIVE or FAILING: kept while failing)."""
    return list(
        Peering.objects.filter(state__in=(Peering.ACTIVE, Peering.FAILING))
        .order_by("name")
        .values_list("name", flat=True)
    )


def _entry_facts(entry: dict) -> tuple[list[str], str, str, str]:
    """(tags, kind, datacenter, health) of one imported `/v1/health/service` entry."""
    svc = entry.get("Service") or {}
    statuses = [c.get("Status", "") for c in entry.get("Checks") or []]
    return (
        list(svc.get("Tags") or []),
        svc.get("Kind") or "typical",
        (entry.get("Node") or {}).get("Datacenter", ""),
        aggregate_status(statuses),
    )


def imported_summaries(
    authz: Authorizer,
    *,
    q: str = "",
    tag: str = "",
    kind: str = "",
    datacenter: str = "",
    peer: str = "",
) -> list[ServiceSummary]:
    """The services peers export to us, one row per (name, peer), summarised as
    the service list shows local ones (instances by health, tags, kinds, the
    peer's datacenters) over the instances that pass the filters; only names
    the token may read (`service:read`, as `?peer=` reads)."""
    qs = ImportedService.objects.filter(
        peering__state__in=(Peering.ACTIVE, Peering.FAILING)
    ).select_related("peering")
    if peer:
        qs = qs.filter(peering__name=peer)
    if q:
        qs = qs.filter(name__icontains=q)
    out = []
    for imp in qs.order_by("name", "peering__name"):
        if not authz.service_read(imp.name):
            continue
        s = ServiceSummary(imp.name, peer=imp.peering.name, modify_index=imp.modify_index)
        tags: set[str] = set()
        kinds: set[str] = set()
        dcs: set[str] = set()
        for entry in imp.instances:
            e_tags, e_kind, e_dc, status = _entry_facts(entry)
            if (tag and tag not in e_tags) or (kind and e_kind != kind):
                continue
            if datacenter and e_dc != datacenter:
                continue
            s.instance_count += 1
            s.health[status] += 1
            tags.update(e_tags)
            kinds.add(e_kind)
            dcs.add(e_dc)
        if (tag or kind or datacenter) and not s.instance_count:
            continue
        s.tags, s.kinds, s.datacenters = sorted(tags), sorted(kinds), sorted(d for d in dcs if d)
        out.append(s)
    return out


def imported_service(authz: Authorizer, peer: str, name: str) -> dict[str, Any]:
    """One imported service as we see it: its instances (`PeerName` set, with
    their checks), and how our sidecars reach it. 404 if the peer does not
    export it to us; 403 without `service:read` on the name."""
    if not authz.service_read(name):
        raise PermissionDenied(f"Permission denied: token lacks service:read on {name!r}")
    imp = _imports(peer, name).first()
    if imp is None:
        raise NotFound(f'Peer "{peer}" exports no service "{name}" to this cluster')
    _index, entries = peer_health(authz, peer, name)
    return {
        "name": name,
        "peer": peer,
        "state": imp.peering.state,
        "instances": [
            {"entry": e, "status": aggregate_status([c.get("Status", "") for c in e["Checks"]])}
            for e in entries
        ],
        "connect": dict(imp.connect or {}),
        "modify_index": imp.modify_index,
    }


def peer_catalog(
    authz: Authorizer, peer: str, name: str, tags: list[str]
) -> tuple[int, list[dict]]:
    """`/v1/catalog/service/:name?peer=`: the imported instances in the catalog's shape."""
    index, entries = peer_health(authz, peer, name, tags=tags)
    out = []
    for e in entries:
        node, svc = e["Node"], e["Service"]
        out.append(
            {
                "ID": node.get("ID", ""),
                "Node": node.get("Node", ""),
                "Address": node.get("Address", ""),
                "Datacenter": node.get("Datacenter", ""),
                "TaggedAddresses": node.get("TaggedAddresses") or {},
                "NodeMeta": node.get("Meta") or {},
                "ServiceKind": "" if svc.get("Kind") in (None, "typical") else svc.get("Kind"),
                "ServiceID": svc.get("ID", ""),
                "ServiceName": svc.get("Service", ""),
                "ServiceTags": svc.get("Tags") or [],
                "ServiceAddress": svc.get("Address", ""),
                "ServiceTaggedAddresses": svc.get("TaggedAddresses") or {},
                "ServiceWeights": svc.get("Weights") or {"Passing": 1, "Warning": 1},
                "ServiceMeta": svc.get("Meta") or {},
                "ServicePort": svc.get("Port", 0),
                "ServiceEnableTagOverride": bool(svc.get("EnableTagOverride")),
                "ServiceProxy": svc.get("Proxy") or {},
                "ServiceConnect": svc.get("Connect") or {},
                "Namespace": svc.get("Namespace", "default"),
                "PeerName": peer,
                "CreateIndex": svc.get("CreateIndex", 0),
                "ModifyIndex": svc.get("ModifyIndex", 0),
            }
        )
    return index, out


# --------------------------------------------------------------------------- what sidecars need


def imported_connect(pairs: set[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """(peer, service) -> how to reach it (`ImportedService.connect`), for the
    pairs that are imported from an ACTIVE (or FAILING: last known) peering."""
    out: dict[tuple[str, str], dict] = {}
    peers = {p for p, _ in pairs}
    if not peers:
        return out
    rows = ImportedService.objects.filter(
        peering__name__in=peers, peering__state__in=(Peering.ACTIVE, Peering.FAILING)
    ).values_list("peering__name", "name", "connect")
    for peer, name, connect in rows:
        if (peer, name) in pairs:
            out[(peer, name)] = connect
    return out


def peers_exported_to(service: str) -> set[str]:
    """The peers `service` is exported to (their callers reach its sidecars)."""
    out: set[str] = set()
    for svc in (_exported_entry() or {}).get("Services", []):
        if svc.get("Name") in (service, "*"):
            out.update(c["Peer"] for c in svc.get("Consumers", []) if c.get("Peer"))
    return out


def trust_for(peers: set[str]) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(peer, trust domain, roots) of those `peers` that are ACTIVE peerings."""
    trust = active_trust()
    return tuple(
        (p, trust[p]["trust_domain"], tuple(trust[p]["roots"])) for p in sorted(peers) if p in trust
    )
