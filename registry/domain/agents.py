"""Per-host agents: the control plane's half of the agent protocol.

`registry.grpc` is the adapter; the rules live in three modules:

- `registry.domain.join_tokens`: the tokens agents join with, and their scope;
- `registry.domain.enrollment`: joining, node certificates, leaf signing, the
  server's certificate;
- here, node sync: `sync_node` (anti-entropy, the agent's state is the truth
  for its node) and `update_checks` (check results as they change).

The names of the first two stay importable from here (`agents.join`, ...).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from registry import decode
from registry import topics as topic
from registry.domain import catalog, enrollment, shapes
from registry.domain.enrollment import (  # noqa: F401  (re-exported)
    MAX_META_KEYS,
    ROLE_AGENT,
    ROLE_KEY,
    Joined,
    ServerCert,
    _check_meta,
    _check_node_name,
    _csr_identity,
    _node_writer,
    _register_node,
    _service_writer,
    active_root_id,
    agent_node,
    ca_pin,
    connect_ca,
    issue_server_certificate,
    join,
    roots_pem,
    server_spiffe_id,
    sign_leaf,
)
from registry.domain.join_tokens import (  # noqa: F401  (re-exported)
    DEFAULT_TTL_SECONDS,
    MAX_TTL_SECONDS,
    MIN_TTL_SECONDS,
    NewToken,
    Unauthenticated,
    create_token,
    list_tokens,
    revoke_token,
    token_json,
    token_state,
)
from registry.errors import BadRequest
from registry.models import Check, Node, ServiceInstance
from registry.txn import Change, topic_index

log = logging.getLogger(__name__)

MAX_OUTPUT = 4096


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
    enrollment.check_scope(node_name, state.services)
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
