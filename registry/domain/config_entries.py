"""Config entries: Consul's `/v1/config` kinds, stored as validated canonical JSON.

Single-entry rules (field names, types, values) live in the pure
`meshproto.config_entries`; this module holds the rules that need the
database: CAS, cross-entry validation (run on the state a write would
produce, inside the write's transaction — every write takes the global
index row first, so config writes are serialised and the check sees every
committed entry), the `service-intentions` view over the Intention rows,
auditing, and the topics blocking reads wait on:

* `config:<kind>` and `config:<kind>:<name>` for every write of an entry;
* `discovery-chain` for writes of the kinds that shape chains.

`service-intentions` entries are not stored as ConfigEntry rows: an entry is
its destination's intentions (`registry.domain.intentions`), so it and
`/v1/connect/intentions` always show the same data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import Max, Min

from meshproto import config_entries as pure
from meshproto import discovery_chain as chains
from registry import topics as topic
from registry.acl_rules import Authorizer
from registry.domain import intentions
from registry.errors import BadRequest, MeshError, NotFound
from registry.models import ConfigEntry, Intention
from registry.txn import Change, topic_index, topics_index

log = logging.getLogger(__name__)

HTTP_PROTOCOLS = pure.HTTP_PROTOCOLS
CHAIN_TOPIC = topic.DISCOVERY_CHAIN
INTENTIONS_KIND = "service-intentions"


def kind_topic(kind: str) -> str:
    return topic.config_kind(kind)


def entry_topic(kind: str, name: str) -> str:
    return topic.config_entry(kind, name)


class ChainCompileError(MeshError):
    """The stored entries do not compile into a chain (Consul answers 500 too)."""

    status = 500


# --------------------------------------------------------------------------- reads


def service_protocol(name: str) -> str:
    """The protocol `name` speaks: its service-defaults `Protocol`, else the
    proxy-defaults `Config.protocol`, else "tcp" (Consul's order)."""
    rows = ConfigEntry.objects.filter(kind__in=("service-defaults", "proxy-defaults")).filter(
        name__in=(name, pure.PROXY_DEFAULTS_NAME)
    )
    entries: dict[str, dict[str, dict]] = {}
    for kind, n, data in rows.values_list("kind", "name", "data"):
        entries.setdefault(kind, {})[n] = data
    return pure.protocol_of(name, entries)[0]


def snapshot(kinds: frozenset[str] | tuple[str, ...] = tuple(pure.CHAIN_KINDS)) -> dict:
    """Every stored entry of `kinds` as kind -> name -> canonical data (what the
    pure compiler and validator take)."""
    out: dict[str, dict[str, dict]] = {}
    for kind, name, data in ConfigEntry.objects.filter(kind__in=kinds).values_list(
        "kind", "name", "data"
    ):
        out.setdefault(kind, {})[name] = data
    return out


def entry_json(kind: str, name: str, data: dict, create_index: int, modify_index: int) -> dict:
    """One entry as `GET /v1/config/<kind>/<name>` shows it."""
    return {
        "Kind": kind,
        "Name": name,
        **data,
        "CreateIndex": create_index,
        "ModifyIndex": modify_index,
    }


def _row_json(row: ConfigEntry) -> dict:
    return entry_json(row.kind, row.name, row.data, row.create_index, row.modify_index)


def check_kind(kind: str) -> str:
    try:
        return pure.check_kind(kind)
    except pure.ConfigEntryError as exc:
        raise BadRequest(str(exc)) from None


def get(kind: str, name: str) -> tuple[int, dict | None]:
    """(index, entry JSON or None) for one entry; the index is its topic's."""
    check_kind(kind)
    index = topic_index(entry_topic(kind, name))
    if kind == INTENTIONS_KIND:
        return index, _intentions_entry(name)
    row = ConfigEntry.objects.filter(kind=kind, name=name).first()
    return index, _row_json(row) if row else None


def list_kind(authz: Authorizer, kind: str) -> tuple[int, list[dict]]:
    """(index, entries of `kind` the caller may read), ordered by name."""
    check_kind(kind)
    index = topic_index(kind_topic(kind))
    if kind == INTENTIONS_KIND:
        found = [e for e in _intentions_entries() if authz.intention_read(e["Name"])]
        return index, found
    rows = ConfigEntry.objects.filter(kind=kind).order_by("name")
    return index, [_row_json(r) for r in rows if can_read(authz, kind, r.name)[0]]


def list_all(authz: Authorizer) -> list[dict]:
    """Every entry of every kind the caller may read (the `/api` listing)."""
    out: list[dict] = []
    for row in ConfigEntry.objects.exclude(kind=INTENTIONS_KIND).order_by("kind", "name"):
        if can_read(authz, row.kind, row.name)[0]:
            out.append(_row_json(row))
    out.extend(e for e in _intentions_entries() if authz.intention_read(e["Name"]))
    out.sort(key=lambda e: (e["Kind"], e["Name"]))
    return out


# --------------------------------------------------------------------------- ACL


def can_read(authz: Authorizer, kind: str, name: str) -> tuple[bool, str, str]:
    """(allowed, permission, resource) to read an entry, as Consul's rules:
    service kinds need service:read on the name, service-intentions
    intentions:read, proxy-defaults operator:read, mesh mesh:read."""
    if kind == "proxy-defaults":
        return authz.operator_read(), "operator:read", ""
    if kind in ("mesh", "exported-services"):
        return authz.mesh_read(), "mesh:read", ""
    if kind == INTENTIONS_KIND:
        return authz.intention_read(name), "intentions:read", name
    return authz.service_read(name), "service:read", name


def can_write(authz: Authorizer, kind: str, name: str) -> tuple[bool, str, str]:
    """(allowed, permission, resource) to write or delete an entry (see `can_read`)."""
    if kind == "proxy-defaults":
        return authz.operator_write(), "operator:write", ""
    if kind in ("mesh", "exported-services"):
        return authz.mesh_write(), "mesh:write", ""
    if kind == INTENTIONS_KIND:
        return authz.intention_write(name), "intentions:write", name
    return authz.service_write(name), "service:write", name


# --------------------------------------------------------------------------- writes


def decode(raw: Any) -> dict:
    """A request body as a canonical entry, or a 400 naming the field."""
    try:
        return pure.decode_entry(raw)
    except pure.ConfigEntryError as exc:
        raise BadRequest(f"Invalid config entry: {exc}") from None


def _validate_chains(entries: dict) -> None:
    try:
        pure.validate_graph(entries, settings.MESH_DC)
    except pure.ConfigEntryError as exc:
        raise BadRequest(f"Invalid config entry: {exc}") from None


def _check_l7_intentions(entries: dict) -> None:
    """A protocol change must not leave L7 intentions on a non-HTTP destination."""
    l7 = set(
        Intention.objects.filter(action="").values_list("destination_name", flat=True).distinct()
    )
    for dest in sorted(l7):
        proto, source = pure.protocol_of(dest, entries)
        if proto not in HTTP_PROTOCOLS:
            raise BadRequest(
                f'Invalid config entry: service "{dest}" has intentions with L7 Permissions, '
                f'which need an HTTP-family protocol, but would have protocol "{proto}" from {source}'
            )


def _touch(change: Change, kind: str, name: str) -> None:
    change.touch(kind_topic(kind), entry_topic(kind, name))
    if kind in pure.CHAIN_KINDS:
        change.touch(CHAIN_TOPIC)


@dataclass(frozen=True)
class _Planned:
    kind: str
    name: str
    data: dict | None  # None: deleted


def _check_graph(plan: _Planned) -> None:
    """Cross-entry rules on the state the write would leave."""
    if plan.kind not in pure.CHAIN_KINDS:
        return
    entries = snapshot()
    current = entries.setdefault(plan.kind, {})
    if plan.data is None:
        current.pop(plan.name, None)
        if plan.kind == "service-resolver":
            refs = pure.subset_references(plan.name, entries)
            if refs:
                raise BadRequest(
                    f'Invalid config entry: service-resolver "{plan.name}" is still referenced by '
                    f"{', '.join(refs)}; change those first"
                )
    else:
        current[plan.name] = plan.data
    _validate_chains(entries)
    if plan.kind in ("service-defaults", "proxy-defaults"):
        _check_l7_intentions(entries)


def write(entry: dict, *, cas: int | None = None) -> bool:
    """Store a decoded entry (see `decode`). With `cas`, only if the entry's
    ModifyIndex is still `cas` (0: only if it does not exist); False otherwise,
    as Consul answers. Cross-entry rules are checked first (BadRequest);
    nothing is stored on any error. The caller checks `can_write`."""
    kind, name = entry["Kind"], entry["Name"]
    if kind == INTENTIONS_KIND:
        return _write_intentions(entry, cas)
    data = {k: v for k, v in entry.items() if k not in ("Kind", "Name")}
    with Change() as change:
        row = ConfigEntry.objects.select_for_update().filter(kind=kind, name=name).first()
        if cas is not None and cas != (row.modify_index if row else 0):
            return False
        _check_graph(_Planned(kind, name, data))
        before = _row_json(row) if row else None
        if row is None:
            row = ConfigEntry(kind=kind, name=name, create_index=change.index)
        row.data = data
        row.modify_index = change.index
        row.save()
        after = _row_json(row)
        change.audit("config.write", "config-entry", f"{kind}/{name}", before, after)
        if kind == "mesh" and data.get("AllowByDefault") is True:
            change.audit(
                "config.mesh.allow-by-default",
                "config-entry",
                f"{kind}/{name}",
                {"AllowByDefault": bool(before and before.get("AllowByDefault"))},
                {
                    "AllowByDefault": True,
                    "Warning": "default ALLOW: services with no matching intention may connect",
                },
            )
        _touch(change, kind, name)
    if kind == "mesh" and data.get("AllowByDefault") is True:
        log.warning(
            "mesh config entry sets AllowByDefault=true: with no matching intention, "
            "connections are now ALLOWED (meant for development clusters only)"
        )
    return True


def delete(kind: str, name: str, *, cas: int | None = None) -> bool:
    """Delete an entry. With `cas`, only if its ModifyIndex is still `cas`
    (False otherwise, and for a missing entry). Deleting a service-resolver
    whose subsets other entries name, or an entry whose absence breaks a
    chain (a router's protocol), is a 400. The caller checks `can_write`."""
    check_kind(kind)
    if kind == INTENTIONS_KIND:
        return _delete_intentions(name, cas)
    with Change() as change:
        row = ConfigEntry.objects.select_for_update().filter(kind=kind, name=name).first()
        if cas is not None and (row is None or row.modify_index != cas):
            return False
        if row is None:
            return True
        _check_graph(_Planned(kind, name, None))
        before = _row_json(row)
        row.delete()
        change.audit("config.delete", "config-entry", f"{kind}/{name}", before, None)
        _touch(change, kind, name)
    return True


# --------------------------------------------------------------------------- service-intentions


def _intentions_modify_index(name: str) -> int:
    """The entry's ModifyIndex: the last write that touched its destination
    (a removed source changes no remaining row, so row indexes alone lag)."""
    rows = Intention.objects.filter(destination_ns=pure.DEFAULT_NAMESPACE, destination_name=name)
    latest = rows.aggregate(m=Max("modify_index"))["m"]
    if latest is None:
        return 0
    return max(latest, topic_index(entry_topic(INTENTIONS_KIND, name)))


def _intentions_entry(name: str) -> dict | None:
    sources = intentions.list_for_destination(name)
    if not sources:
        return None
    rows = Intention.objects.filter(destination_ns=pure.DEFAULT_NAMESPACE, destination_name=name)
    agg = rows.aggregate(c=Min("create_index"))
    metas = [m or {} for m in rows.values_list("meta", flat=True)]
    out: dict[str, Any] = {"Kind": INTENTIONS_KIND, "Name": name, "Sources": sources}
    if metas and all(m == metas[0] for m in metas) and metas[0]:
        out["Meta"] = metas[0]  # one Meta on every intention: the entry's
    out["CreateIndex"] = agg["c"] or 0
    out["ModifyIndex"] = _intentions_modify_index(name)
    return out


def _intentions_entries() -> list[dict]:
    out = []
    for d in intentions.destinations():
        if d["Namespace"] != pure.DEFAULT_NAMESPACE:
            continue
        entry = _intentions_entry(d["Name"])
        if entry is not None:
            out.append(entry)
    return out


def _write_intentions(entry: dict, cas: int | None) -> bool:
    name = entry["Name"]
    with Change() as change:
        # Lock the destination's rows first, so the CAS check and the replace agree.
        list(
            Intention.objects.select_for_update().filter(
                destination_ns=pure.DEFAULT_NAMESPACE, destination_name=name
            )
        )
        if cas is not None and cas != _intentions_modify_index(name):
            return False
        before = _intentions_entry(name)
        intentions.replace_for_destination(
            change, name, entry.get("Sources", []), meta=entry.get("Meta")
        )
        after = _intentions_entry(name)
        if after is not None:
            after["ModifyIndex"] = change.index
        change.audit("config.write", "config-entry", f"{INTENTIONS_KIND}/{name}", before, after)
        _touch(change, INTENTIONS_KIND, name)
    return True


def _delete_intentions(name: str, cas: int | None) -> bool:
    with Change() as change:
        list(
            Intention.objects.select_for_update().filter(
                destination_ns=pure.DEFAULT_NAMESPACE, destination_name=name
            )
        )
        current = _intentions_modify_index(name)
        if cas is not None and (current == 0 or cas != current):
            return False
        if current == 0:
            return True
        before = _intentions_entry(name)
        intentions.replace_for_destination(change, name, [])
        change.audit("config.delete", "config-entry", f"{INTENTIONS_KIND}/{name}", before, None)
        _touch(change, INTENTIONS_KIND, name)
    return True


# --------------------------------------------------------------------------- discovery chains


def chain_index() -> int:
    return topics_index((CHAIN_TOPIC,))


def decode_overrides(raw: Any) -> dict:
    """`POST /v1/discovery-chain` overrides, or a 400 naming the field."""
    try:
        return chains.decode_overrides(raw)
    except pure.ConfigEntryError as exc:
        raise BadRequest(f"Invalid discovery chain overrides: {exc}") from None


def _trust_domain() -> str:
    from registry.domain import connect_ca

    return connect_ca.trust_domain()


def discovery_chain(
    service: str, *, compile_dc: str = "", overrides: dict | None = None
) -> tuple[int, dict]:
    """(index, compiled chain) for `service` as Consul's `{"Chain": ...}` inner
    object. The caller checks service:read on `service`."""
    if not service or "/" in service:
        raise BadRequest("Invalid service name: must be non-empty, without '/'")
    overrides = overrides or {}
    index = chain_index()
    try:
        chain = chains.compile_chain(
            service,
            compile_dc or settings.MESH_DC,
            snapshot(),
            trust_domain=_trust_domain(),
            use_in_datacenter=settings.MESH_DC,
            override_protocol=overrides.get("OverrideProtocol", ""),
            override_connect_timeout=overrides.get("OverrideConnectTimeout", ""),
            override_mesh_gateway=overrides.get("OverrideMeshGateway"),
        )
    except chains.ChainError as exc:
        raise ChainCompileError(f"Failed to compile discovery chain: {exc}") from None
    return index, chain


def require_entry(kind: str, name: str) -> dict:
    """One entry's JSON, or NotFound with Consul's text."""
    _index, found = get(kind, name)
    if found is None:
        raise NotFound(f'Config entry not found for "{kind}" / "{name}"')
    return found
