"""Intentions: storage, validation, ACLs and decisions (the one home of their rules).

Two views of the same rows:

* Consul's `/v1/connect/intentions` API (one intention per source and
  destination pair; every intention here has an ID, also those written by
  the exact API, so the legacy ID routes and `/api` work for all of them);
* the `service-intentions` config entry, one per destination, whose
  `Sources` are read with `list_for_destination` and written with
  `replace_for_destination` (called by the config-entry code).

Decisions (`check`, `authorize`) use `meshproto.intentions.IntentionIndex`,
the same pure code the sidecars run, built once per change of the
intentions or of the `mesh` config entry and kept in memory: a decision is
one small index query plus a few dictionary probes, whatever the number of
intentions.

Every write is one `Change` that touches `intentions`, `intentions:<dest>`
and the `service-intentions` config topics of the destination, and records
one audit entry (before/after JSON) per intention it changes.

**Default deny**: with no matching intention nothing is allowed, unless the
`mesh` config entry (kind `mesh`, name `mesh`) has `"AllowByDefault": true`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from meshproto import intentions as pure
from meshproto import spiffe
from registry import topics as topic
from registry.acl_rules import Authorizer
from registry.domain.acl import format_time
from registry.errors import BadRequest, Conflict, NotFound, PermissionDenied
from registry.models import ConfigEntry, Intention
from registry.txn import Change, topic_index, topics_index

TOPIC = topic.INTENTIONS
MESH_TOPICS = (topic.config_kind("mesh"), topic.config_entry("mesh", "mesh"))
# The `mesh` config entry field that switches the cluster to default allow.
ALLOW_BY_DEFAULT_FIELD = "AllowByDefault"
_UUID_LEN = 36


def destination_topic(name: str) -> str:
    return topic.intentions_for(name)


def _touch(change: Change, destination: str) -> None:
    change.touch(
        TOPIC,
        destination_topic(destination),
        topic.config_kind("service-intentions"),
        topic.config_entry("service-intentions", destination),
    )


def _bad(err: pure.IntentionError, prefix: str = "") -> BadRequest:
    return BadRequest(f"Invalid intention: {prefix}{err}")


# --------------------------------------------------------------------------- names


def parse_service_ref(value: str, what: str) -> tuple[str, str]:
    """`name` or `namespace/name` (Consul's forms for ?source= / ?destination=)."""
    if not value:
        raise BadRequest(f"required query parameter '{what}' not set")
    parts = value.split("/")
    if len(parts) == 1:
        return pure.DEFAULT_NAMESPACE, parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise BadRequest(f"Invalid {what} {value!r}: expected NAME or NAMESPACE/NAME")


# --------------------------------------------------------------------------- shapes


def _hash(row: Intention) -> str:
    material = json.dumps(
        [
            row.source_ns,
            row.source_name,
            row.destination_ns,
            row.destination_name,
            row.source_type,
            *([row.source_peer] if row.source_peer else []),
            row.action,
            row.permissions,
            row.description,
            row.meta,
        ],
        sort_keys=True,
    ).encode()
    return base64.b64encode(hashlib.sha256(material).digest()).decode()


def intention_json(row: Intention) -> dict[str, Any]:
    """One intention as Consul's `/v1/connect/intentions` shows it."""
    out: dict[str, Any] = {
        "ID": row.id,
        "Description": row.description,
        "SourceNS": row.source_ns,
        "SourceName": row.source_name,
        "DestinationNS": row.destination_ns,
        "DestinationName": row.destination_name,
        "SourceType": row.source_type,
        "Action": row.action,
    }
    if row.source_peer:
        out["SourcePeer"] = row.source_peer
    if row.permissions:
        out["Permissions"] = row.permissions
    out.update(
        {
            "Meta": row.meta or {},
            "Precedence": row.precedence,
            "CreatedAt": format_time(row.created_at),
            "UpdatedAt": format_time(row.updated_at),
            "Hash": _hash(row),
            "CreateIndex": row.create_index,
            "ModifyIndex": row.modify_index,
        }
    )
    return out


def source_json(row: Intention) -> dict[str, Any]:
    """One intention as a `Sources[]` item of its destination's `service-intentions` entry."""
    out: dict[str, Any] = {"Name": row.source_name}
    if row.source_peer:
        out["Peer"] = row.source_peer
    if row.source_ns != row.destination_ns:
        out["Namespace"] = row.source_ns
    if row.action:
        out["Action"] = row.action
    if row.permissions:
        out["Permissions"] = row.permissions
    out["Precedence"] = row.precedence
    out["Type"] = row.source_type
    if row.description:
        out["Description"] = row.description
    return out


def to_pure(row: Intention) -> pure.Intention:
    """The decision view of a stored row (its permissions were validated on write)."""
    return pure.Intention(
        source_name=row.source_name,
        destination_name=row.destination_name,
        action=row.action,
        permissions=pure.parse_permissions(row.permissions) if row.permissions else (),
        id=row.id,
        source_ns=row.source_ns,
        destination_ns=row.destination_ns,
        source_type=row.source_type,
        source_peer=row.source_peer,
    )


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Proposed:
    """A validated intention, ready to store."""

    intention: pure.Intention
    permissions: list[dict[str, Any]]
    description: str
    meta: dict[str, str]


def destination_protocol(name: str) -> str:
    """The destination's protocol as the mesh sees it (service-defaults, then
    proxy-defaults, then tcp): the config entries' rule, asked of their module."""
    from registry.domain import config_entries  # imports this module: import late

    return str(config_entries.service_protocol(name) or "tcp").lower()


def _check_http(destination: str) -> None:
    protocol = destination_protocol(destination)
    if protocol not in pure.HTTP_PROTOCOLS:
        raise BadRequest(
            f"Invalid intention: Permissions need an HTTP-based destination, but service "
            f"{destination!r} has protocol {protocol!r} (set Protocol to http, http2 or grpc "
            "in its service-defaults config entry first)"
        )


def propose(
    spec: Mapping[str, Any],
    *,
    source: tuple[str, str] | None = None,
    destination: tuple[str, str] | None = None,
    prefix: str = "",
) -> Proposed:
    """Validate an intention body (Consul's field names, already decoded);
    `source` / `destination` override the body's (the exact API's query)."""
    src_ns, src_name = source or (
        spec.get("SourceNS") or pure.DEFAULT_NAMESPACE,
        spec.get("SourceName") or "",
    )
    dst_ns, dst_name = destination or (
        spec.get("DestinationNS") or pure.DEFAULT_NAMESPACE,
        spec.get("DestinationName") or "",
    )
    raw_permissions = spec.get("Permissions")
    try:
        ix = pure.validate(
            source_name=src_name,
            destination_name=dst_name,
            action=spec.get("Action") or "",
            permissions=raw_permissions,
            source_ns=src_ns,
            destination_ns=dst_ns,
            source_type=spec.get("SourceType") or "consul",
            description=spec.get("Description") or "",
            meta=spec.get("Meta"),
            source_peer=spec.get("SourcePeer") or "",
        )
    except pure.IntentionError as err:
        raise _bad(err, prefix) from None
    if ix.permissions:
        _check_http(dst_name)
    return Proposed(
        ix,
        pure.permissions_json(ix.permissions),
        spec.get("Description") or "",
        dict(spec.get("Meta") or {}),
    )


# --------------------------------------------------------------------------- ACL


def can_read(authz: Authorizer, row: Intention | pure.Intention) -> bool:
    """Consul's rule: intentions:read on either end shows the whole intention."""
    return authz.intention_read(row.source_name) or authz.intention_read(row.destination_name)


def can_write(authz: Authorizer, destination: str) -> bool:
    """Consul's rule: intentions are written with intentions:write on the destination."""
    return authz.intention_write(destination)


def _denied(authz_ok: bool, accessor: str, permission: str, resource: str) -> None:
    if not authz_ok:
        who = f"token with AccessorID '{accessor}'" if accessor else "token"
        raise PermissionDenied(
            f"Permission denied: {who} lacks permission '{permission}' on \"{resource}\""
        )


def require_write(authz: Authorizer, destination: str, accessor: str = "") -> None:
    _denied(can_write(authz, destination), accessor, "intentions:write", destination)


def require_read(authz: Authorizer, row: Intention, accessor: str = "") -> None:
    _denied(can_read(authz, row), accessor, "intentions:read", row.destination_name)


# --------------------------------------------------------------------------- reads


@dataclass(frozen=True)
class Listing:
    index: int
    rows: list[Intention]
    filtered: bool


def _ordered(rows: Iterable[Intention]) -> list[Intention]:
    return sorted(
        rows,
        key=lambda r: (
            -r.precedence,
            r.source_ns,
            r.source_name,
            r.destination_ns,
            r.destination_name,
        ),
    )


def list_intentions(
    authz: Authorizer,
    *,
    source: str = "",
    destination: str = "",
    action: str = "",
) -> Listing:
    """Every intention the caller may read, in Consul's order (`X-Consul-Index`: `intentions`)."""
    index = topic_index(TOPIC)
    qs = Intention.objects.all()
    if source:
        qs = qs.filter(source_name=source)
    if destination:
        qs = qs.filter(destination_name=destination)
    if action:
        qs = qs.filter(action=action)
    rows = list(qs)
    visible = [r for r in rows if can_read(authz, r)]
    return Listing(index, _ordered(visible), len(visible) != len(rows))


def current_index() -> int:
    """The index of the last intention write (what the list, match and ID reads answer)."""
    return topic_index(TOPIC)


def visible(authz: Authorizer, qs: QuerySet[Intention] | None = None) -> QuerySet[Intention]:
    """The intentions the caller may read, as a queryset (for `/api` filters and paging).

    Decided per service name (few) rather than per intention (many)."""
    qs = Intention.objects.all() if qs is None else qs
    names = set(Intention.objects.values_list("source_name", flat=True).distinct())
    names |= set(Intention.objects.values_list("destination_name", flat=True).distinct())
    readable = [n for n in names if authz.intention_read(n)]
    hidden = names.difference(readable)
    if not hidden:
        return qs
    if len(hidden) < len(readable):  # the shorter list of names makes the smaller query
        return qs.exclude(Q(source_name__in=hidden) & Q(destination_name__in=hidden))
    return qs.filter(Q(source_name__in=readable) | Q(destination_name__in=readable))


def get_by_id(intention_id: str) -> Intention:
    row = Intention.objects.filter(id=intention_id).first() if intention_id else None
    if row is None:
        raise NotFound("Intention not found")
    return row


def find_exact(source: tuple[str, str], destination: tuple[str, str]) -> Intention | None:
    return Intention.objects.filter(
        source_peer="",
        source_ns=source[0],
        source_name=source[1],
        destination_ns=destination[0],
        destination_name=destination[1],
    ).first()


def get_exact(
    source: tuple[str, str], destination: tuple[str, str]
) -> tuple[int, Intention | None]:
    """The intention for one pair, and the destination topic's index."""
    index = topic_index(destination_topic(destination[1]))
    return index, find_exact(source, destination)


def match(
    authz: Authorizer, by: str, names: list[str], accessor: str = ""
) -> tuple[int, dict[str, list[Intention]]]:
    """For each name, the intentions that apply to it as a source (or a
    destination), in evaluation order. Needs intentions:read on each name."""
    if by not in ("source", "destination"):
        if not by:
            raise BadRequest("required query parameter 'by' not set")
        raise BadRequest(f"'by' must be 'source' or 'destination', not {by!r}")
    if not names:
        raise BadRequest("required query parameter 'name' not set")
    index = topic_index(TOPIC)
    out: dict[str, list[Intention]] = {}
    for raw in names:
        ns, name = parse_service_ref(raw, "name")
        _denied(authz.intention_read(name), accessor, "intentions:read", name)
        if by == "destination":
            q = Q(destination_ns=pure.WILDCARD) | Q(
                destination_ns=ns, destination_name__in=[name, pure.WILDCARD]
            )
        else:
            q = Q(source_ns=pure.WILDCARD) | Q(source_ns=ns, source_name__in=[name, pure.WILDCARD])
        out[raw] = _ordered(Intention.objects.filter(q))
    return index, out


def list_for_destination(
    destination: str, namespace: str = pure.DEFAULT_NAMESPACE
) -> list[dict[str, Any]]:
    """The `Sources` of `destination`'s service-intentions entry, highest precedence first."""
    rows = Intention.objects.filter(destination_ns=namespace, destination_name=destination)
    return [source_json(r) for r in _ordered(rows)]


def destinations() -> list[dict[str, Any]]:
    """Every destination that has intentions, with the indexes its entry shows
    (`CreateIndex`: its oldest intention, `ModifyIndex`: its latest change)."""
    from django.db.models import Max, Min

    rows = (
        Intention.objects.values("destination_ns", "destination_name")
        .annotate(create_index=Min("create_index"), modify_index=Max("modify_index"))
        .order_by("destination_ns", "destination_name")
    )
    return [
        {
            "Namespace": r["destination_ns"],
            "Name": r["destination_name"],
            "CreateIndex": r["create_index"],
            "ModifyIndex": r["modify_index"],
        }
        for r in rows
    ]


# --------------------------------------------------------------------------- writes


def _insert(change: Change, p: Proposed, intention_id: str | None = None) -> Intention:
    ix = p.intention
    now = timezone.now()
    row = Intention(
        id=intention_id or str(uuid.uuid4()),
        source_ns=ix.source_ns,
        source_name=ix.source_name,
        source_type=ix.source_type,
        source_peer=ix.source_peer,
        destination_ns=ix.destination_ns,
        destination_name=ix.destination_name,
        action=ix.action,
        permissions=p.permissions,
        description=p.description,
        meta=p.meta,
        precedence=ix.precedence,
        created_at=now,
        updated_at=now,
        create_index=change.index,
        modify_index=change.index,
    )
    try:
        with transaction.atomic():  # a savepoint: a lost race is a clean 409
            row.save(force_insert=True)
    except IntegrityError:
        raise Conflict(
            f"duplicate intention found: {pure.display_name(ix.source_ns, ix.source_name)} => "
            f"{pure.display_name(ix.destination_ns, ix.destination_name)}"
        ) from None
    _touch(change, ix.destination_name)
    change.audit("intention.create", "intention", row.id, None, intention_json(row))
    return row


def _update(change: Change, row: Intention, p: Proposed) -> Intention:
    before = intention_json(row)
    old_destination = row.destination_name
    ix = p.intention
    row.source_ns, row.source_name, row.source_type = ix.source_ns, ix.source_name, ix.source_type
    row.source_peer = ix.source_peer
    row.destination_ns, row.destination_name = ix.destination_ns, ix.destination_name
    row.action, row.permissions = ix.action, p.permissions
    row.description, row.meta = p.description, p.meta
    row.precedence = ix.precedence
    row.modify_index = change.index
    try:
        with transaction.atomic():
            row.save()
    except IntegrityError:
        raise Conflict(
            f"duplicate intention found: {pure.display_name(ix.source_ns, ix.source_name)} => "
            f"{pure.display_name(ix.destination_ns, ix.destination_name)}"
        ) from None
    _touch(change, old_destination)
    _touch(change, ix.destination_name)
    change.audit("intention.update", "intention", row.id, before, intention_json(row))
    return row


def _delete(change: Change, row: Intention) -> None:
    before = intention_json(row)
    row.delete()
    _touch(change, row.destination_name)
    change.audit("intention.delete", "intention", before["ID"], before, None)


def create(authz: Authorizer, spec: Mapping[str, Any], accessor: str = "") -> Intention:
    """Legacy `POST /v1/connect/intentions`: a new intention with a new ID (409 if
    the pair already has one)."""
    if spec.get("ID"):
        raise BadRequest("Invalid intention: ID must be empty when creating a new intention")
    p = propose(spec)
    require_write(authz, p.intention.destination_name, accessor)
    with Change() as change:
        return _insert(change, p)


def upsert_exact(
    authz: Authorizer,
    source: tuple[str, str],
    destination: tuple[str, str],
    spec: Mapping[str, Any],
    accessor: str = "",
) -> Intention:
    """`PUT /v1/connect/intentions/exact`: create or fully replace the pair's intention
    (an existing intention keeps its ID and CreatedAt)."""
    p = propose(spec, source=source, destination=destination)
    require_write(authz, destination[1], accessor)
    with Change() as change:
        row = (
            Intention.objects.select_for_update()
            .filter(
                source_ns=source[0],
                source_name=source[1],
                destination_ns=destination[0],
                destination_name=destination[1],
            )
            .first()
        )
        if row is None:
            return _insert(change, p)
        return _update(change, row, p)


def update_by_id(
    authz: Authorizer, intention_id: str, spec: Mapping[str, Any], accessor: str = ""
) -> Intention:
    """Legacy `PUT /v1/connect/intentions/<id>`: replace that intention (its pair may change)."""
    body_id = spec.get("ID")
    if body_id and body_id != intention_id:
        raise BadRequest(f"Invalid intention: ID in the body ({body_id!r}) does not match the URL")
    p = propose(spec)
    with Change() as change:
        row = Intention.objects.select_for_update().filter(id=intention_id).first()
        if row is None:
            raise NotFound(f"Cannot modify non-existent intention: '{intention_id}'")
        require_write(authz, row.destination_name, accessor)
        require_write(authz, p.intention.destination_name, accessor)
        return _update(change, row, p)


def delete_by_id(authz: Authorizer, intention_id: str, accessor: str = "") -> bool:
    """Legacy `DELETE /v1/connect/intentions/<id>` (404 if there is none)."""
    with Change() as change:
        row = Intention.objects.select_for_update().filter(id=intention_id).first()
        if row is None:
            raise NotFound(f"Cannot delete non-existent intention: '{intention_id}'")
        require_write(authz, row.destination_name, accessor)
        _delete(change, row)
    return True


def delete_exact(
    authz: Authorizer, source: tuple[str, str], destination: tuple[str, str], accessor: str = ""
) -> bool:
    """`DELETE /v1/connect/intentions/exact`: idempotent, as Consul's."""
    require_write(authz, destination[1], accessor)
    with Change() as change:
        row = (
            Intention.objects.select_for_update()
            .filter(
                source_ns=source[0],
                source_name=source[1],
                destination_ns=destination[0],
                destination_name=destination[1],
            )
            .first()
        )
        if row is not None:
            _delete(change, row)
    return True


_SOURCE_FIELDS = (
    "Name",
    "Namespace",
    "Partition",
    "Peer",
    "Action",
    "Permissions",
    "Description",
    "Type",
    "Precedence",
    "LegacyID",
    "LegacyMeta",
    "LegacyCreateTime",
    "LegacyUpdateTime",
)


def _source_spec(raw: Any, i: int, destination_ns: str) -> dict[str, Any]:
    """A `Sources[i]` item as an intention body (Consul's fields, case-insensitive)."""
    where = f"Sources[{i}]"
    try:
        f = pure._fields(raw, where, _SOURCE_FIELDS)
    except pure.IntentionError as err:
        raise BadRequest(f"Invalid intention: {err}") from None
    if f.get("LegacyMeta"):
        raise BadRequest(f"Invalid intention: {where}.LegacyMeta must be omitted")
    if f.get("Partition") not in (None, "", "default"):
        raise BadRequest(f"Invalid intention: {where}.Partition is not supported")
    for name in ("Name", "Namespace", "Action", "Description", "Type", "Peer"):
        if f.get(name) is not None and not isinstance(f[name], str):
            raise BadRequest(f"Invalid intention: {where}.{name} must be a string")
    return {
        "SourceNS": f.get("Namespace") or destination_ns,
        "SourceName": f.get("Name") or "",
        "Action": f.get("Action") or "",
        "Permissions": f.get("Permissions"),
        "Description": f.get("Description") or "",
        "SourceType": f.get("Type") or "consul",
        "SourcePeer": f.get("Peer") or "",
    }


def replace_for_destination(
    change: Change,
    destination: str,
    sources: list[dict[str, Any]],
    *,
    namespace: str = pure.DEFAULT_NAMESPACE,
    meta: Mapping[str, str] | None = None,
) -> list[Intention]:
    """Make `destination`'s intentions exactly `sources` (a service-intentions
    entry's `Sources`), inside the caller's `change`.

    Validates everything first (BadRequest naming `Sources[i]`; nothing is
    written on error), then keeps the ID and CreatedAt of sources that
    already had an intention, updates what changed, inserts the new ones and
    deletes the rest. `meta`, when given, becomes every intention's `Meta`
    (Consul shows the entry's Meta on each of its intentions); otherwise each
    keeps its own. An empty list deletes them all (the entry was deleted).
    The caller checks intentions:write on the destination.
    """
    try:
        pure.check_name(namespace, destination, "Destination")
    except pure.IntentionError as err:
        raise _bad(err) from None
    if not isinstance(sources, list):
        raise BadRequest("Invalid intention: Sources must be a list")
    proposed: list[Proposed] = []
    seen: set[tuple[str, str, str]] = set()
    for i, raw in enumerate(sources):
        spec = _source_spec(raw, i, namespace)
        if meta is not None:
            spec["Meta"] = dict(meta)
        p = propose(spec, destination=(namespace, destination), prefix=f"Sources[{i}].")
        key = (p.intention.source_ns, p.intention.source_name, p.intention.source_peer)
        if key in seen:
            raise BadRequest(
                f'Invalid intention: Sources[{i}] defines "{pure.display_name(*key)}" more than once'
            )
        seen.add(key)
        proposed.append(p)
    existing = {
        (r.source_ns, r.source_name, r.source_peer): r
        for r in Intention.objects.select_for_update().filter(
            destination_ns=namespace, destination_name=destination
        )
    }
    out: list[Intention] = []
    for p in proposed:
        key = (p.intention.source_ns, p.intention.source_name, p.intention.source_peer)
        row = existing.pop(key, None)
        if row is None:
            out.append(_insert(change, p))
            continue
        if meta is None:
            p = Proposed(p.intention, p.permissions, p.description, dict(row.meta or {}))
        if _same(row, p):
            out.append(row)
        else:
            out.append(_update(change, row, p))
    for row in existing.values():
        _delete(change, row)
    _touch(change, destination)
    return out


def _same(row: Intention, p: Proposed) -> bool:
    ix = p.intention
    return (
        row.action == ix.action
        and row.permissions == p.permissions
        and row.description == p.description
        and (row.meta or {}) == p.meta
        and row.source_type == ix.source_type
    )


# --------------------------------------------------------------------------- decisions


def default_allow() -> bool:
    """Whether the `mesh` config entry switches the cluster to default allow."""
    data = (
        ConfigEntry.objects.filter(kind="mesh", name="mesh").values_list("data", flat=True).first()
    )
    return bool(isinstance(data, dict) and data.get(ALLOW_BY_DEFAULT_FIELD) is True)


_trust_domain_cache: list[str] = []


class _IndexCache:
    """The decision index, rebuilt when the intentions or the mesh entry change.

    The version (max index of those topics) is read *before* the rows, so a
    write landing during a rebuild makes the next call rebuild again rather
    than keep a stale index under a fresh version.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = -1
        self._index: pure.IntentionIndex | None = None

    def get(self) -> pure.IntentionIndex:
        version = topics_index((TOPIC, *MESH_TOPICS))
        index = self._index
        if index is not None and version == self._version:
            return index
        with self._lock:
            if self._index is not None and version == self._version:
                return self._index
            rows = Intention.objects.all()
            built = pure.IntentionIndex((to_pure(r) for r in rows), default_allow=default_allow())
            self._index, self._version = built, version
            return built

    def clear(self) -> None:
        with self._lock:
            self._index, self._version = None, -1


decision_index = _IndexCache()


def reset_caches() -> None:
    """Forget cached decisions and the trust domain (tests roll the database back,
    so an index value can come back with different rows behind it)."""
    decision_index.clear()
    _trust_domain_cache.clear()


def decide(
    authz: Authorizer,
    source: tuple[str, str],
    destination: tuple[str, str],
    source_type: str = "consul",
    accessor: str = "",
) -> pure.Decision:
    """Would an L4 connection from `source` to `destination` be allowed, and why?
    Needs service:read on the destination (Consul's rule for check); L7
    intentions count as deny."""
    if source_type not in pure.SOURCE_TYPES:
        raise BadRequest(f"Invalid source-type {source_type!r}: must be 'consul'")
    _denied(authz.service_read(destination[1]), accessor, "service:read", destination[1])
    return decision_index.get().decide(
        source[1], destination[1], source_ns=source[0], destination_ns=destination[0]
    )


def decide_request(
    authz: Authorizer,
    source: tuple[str, str],
    destination: tuple[str, str],
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    accessor: str = "",
) -> pure.Decision:
    """Would this HTTP request from `source` to `destination` be allowed, and by which
    intention? The sidecar's per-request rule (`IntentionIndex.decide_request`) on
    the control plane's index; needs service:read on the destination, as `decide`."""
    _denied(authz.service_read(destination[1]), accessor, "service:read", destination[1])
    return decision_index.get().decide_request(
        source[1],
        destination[1],
        method.upper(),
        path or "/",
        headers or {},
        source_ns=source[0],
        destination_ns=destination[0],
    )


def check(
    authz: Authorizer,
    source: tuple[str, str],
    destination: tuple[str, str],
    source_type: str = "consul",
    accessor: str = "",
) -> tuple[int, bool]:
    """`GET /v1/connect/intentions/check`: `decide`'s answer and the index to show."""
    index = topic_index(TOPIC)
    return index, decide(authz, source, destination, source_type, accessor).allowed


def _trust_domain() -> str | None:
    """This cluster's trust domain once the CA has made it (cached: it never changes)."""
    if _trust_domain_cache:
        return _trust_domain_cache[0]
    from registry.models import ClusterIdentity

    domain = ClusterIdentity.objects.filter(id=1).values_list("trust_domain", flat=True).first()
    if domain:
        _trust_domain_cache.append(domain)
    return domain


def authorize(
    authz: Authorizer,
    target: str,
    client_cert_uri: str,
    client_cert_serial: str = "",
    accessor: str = "",
) -> pure.Decision:
    """`POST /v1/agent/connect/authorize`: may the client certificate's service
    connect to `target`? Needs service:write on the target (Consul's rule).
    The answer's reason names the intention that decided, or the default."""
    if not target:
        raise BadRequest("Target service must be specified")
    if not client_cert_uri:
        raise BadRequest("ClientCertURI must be specified")
    try:
        uri = spiffe.parse(client_cert_uri)
    except spiffe.SpiffeError:
        raise BadRequest("ClientCertURI not a valid Connect identifier") from None
    if not isinstance(uri, spiffe.ServiceID):
        raise BadRequest("ClientCertURI not a valid Service identifier")
    _denied(authz.service_write(target), accessor, "service:write", target)
    domain = _trust_domain()
    if domain and uri.trust_domain != domain:
        return pure.Decision(
            False,
            None,
            f"Client certificate is from trust domain {uri.trust_domain!r}, "
            f"not this cluster's ({domain!r})",
        )
    return decision_index.get().decide(uri.service, target, source_ns=uri.namespace)
