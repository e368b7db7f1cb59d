"""Node sync: the catalog's half of an agent's anti-entropy (gRPC `SyncNode`,
`UpdateChecks`) and the proxies a node's config stream serves.

- `sync_node`: the agent's state is the truth for its node; what differs is
  written, what the agent no longer has is removed, in one `Change`, and
  nothing is written when nothing differs;
- `update_checks`: check results as they change;
- `node_proxies`: the sidecars registered on a node.

Registrations go through the same rules and catalog functions as
`PUT /v1/agent/service/register` (`meshproto.registration.rules`, the public
functions of `registry.domain.catalog`); what a row would hold is asked of
`catalog.instance_fields` / `catalog.check_fields`, never restated here.
Callers are identified by the adapter (node certificate -> node name); the
functions here trust the node name they are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import connection

from meshproto.registration import decode as pure_decode
from meshproto.registration import rules
from registry import decode
from registry import topics as topic
from registry.domain import catalog, enrollment, shapes
from registry.domain import rows as db_rows
from registry.errors import BadRequest, rule_errors
from registry.models import Check, Node, ServiceInstance
from registry.txn import Change, topic_index

# --- the agent's state --------------------------------------------------------------------


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
    """Decode the wire form (JSON strings) with the registration decoder; 400 on anything
    malformed."""
    services = tuple(
        decode.AGENT_SERVICE(_json(raw, f"services_json[{i}]"), f"services_json[{i}]")
        for i, raw in enumerate(services_json)
    )
    checks = tuple(
        decode.SYNC_CHECK(_json(raw, f"checks_json[{i}]"), f"checks_json[{i}]")
        for i, raw in enumerate(checks_json)
    )
    return NodeState(address=address or "", meta=dict(meta), services=services, checks=checks)


def _json(raw: str | bytes, where: str) -> Any:
    with rule_errors():
        data = pure_decode.parse_json(raw, where)
    if not isinstance(data, dict):
        raise BadRequest(f"{where}: expected an object")
    return data


# --- the plan ---------------------------------------------------------------------------


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
    stored_services: dict[str, ServiceInstance] = field(default_factory=dict)  # by service ID
    stored_checks: dict[str, Check] = field(default_factory=dict)  # by check ID

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


def _check_fields(want: _WantCheck, svc_spec: dict[str, Any] | None) -> dict[str, Any]:
    return catalog.check_fields(
        want.spec,
        check_id=want.check_id,
        name=want.name,
        service_id=want.service_id,
        service_name=svc_spec["Name"] if svc_spec else "",
        service_tags=list(svc_spec.get("Tags", [])) if svc_spec else [],
        agent_local=True,
    )


def _desired(
    node: Node, state: NodeState
) -> tuple[dict[str, tuple[dict[str, Any], str]], dict[str, _WantCheck]]:
    """The services (sidecars expanded) and checks the agent's state asks for."""
    services: dict[str, tuple[dict[str, Any], str]] = {}
    checks: dict[str, _WantCheck] = {}
    taken: set[int] = set()  # sidecar ports this sync gives (the catalog sees saved rows only)
    ports: dict[str, int] | None = None  # the node's saved sidecar ports, read once if needed

    def add_service(spec: dict[str, Any], parent_id: str) -> None:
        if spec["ID"] in services:
            raise BadRequest(f'duplicate service ID "{spec["ID"]}"')
        services[spec["ID"]] = (spec, parent_id)
        if spec.get("Kind") == "connect-proxy" and spec.get("Port"):
            taken.add(spec["Port"])
        for s in catalog.service_checks(spec["ID"], spec):
            add_check(_WantCheck(s.check_id, s.spec, s.name, spec["ID"]))

    def add_check(want: _WantCheck) -> None:
        if want.check_id in checks:
            raise BadRequest(f'duplicate check ID "{want.check_id}"')
        checks[want.check_id] = want

    for raw in state.services:
        catalog.validate_service(raw)
        spec = dict(raw, ID=rules.service_id(raw))
        add_service(spec, "")
        if rules.sidecar_id(spec) is not None:
            if ports is None and not spec["Connect"]["SidecarService"].get("Port"):
                ports = catalog.sidecar_ports(node)
            sc = catalog.expand_sidecar(node, spec, taken, ports)
            catalog.validate_service(sc)
            add_service(sc, spec["ID"])

    for raw in state.checks:
        spec = dict(raw)
        check_id = spec.get("CheckID") or spec.get("Name") or ""
        if not check_id:
            raise BadRequest("a check needs a CheckID or a Name")
        status = spec.pop("Status", None) or None
        output = spec.pop("Output", None)
        with rule_errors():
            if status is not None:
                rules.check_status(status)
            has_definition = bool(rules.check_kind(spec)) or rules.is_maintenance(check_id)
        if output is not None:
            output = rules.truncate_output(output)
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


def _differs(row: Any, fields: dict[str, Any]) -> bool:
    return any(getattr(row, k) != v for k, v in fields.items())


def _plan(node: Node, state: NodeState) -> _Plan:

    services, checks = _desired(node, state)
    rows, check_rows = _stored(node)
    meta = enrollment.check_meta(state.meta)
    node_fields: dict[str, Any] = {}
    if state.address and state.address != node.address:
        node_fields["address"] = state.address
    if meta != (node.meta or {}):
        node_fields["meta"] = meta
    upsert_services = [
        sid
        for sid, (spec, parent) in services.items()
        if sid not in rows
        or _differs(rows[sid], catalog.instance_fields(spec, parent_id=parent, agent_local=True))
    ]
    upsert_checks, status_checks = [], []
    for cid, want in checks.items():
        row = check_rows.get(cid)
        svc_spec = services[want.service_id][0] if want.service_id else None
        if row is None or _differs(row, _check_fields(want, svc_spec)):
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
        stored_services=rows,
        stored_checks=check_rows,
    )


def _stored(node: Node) -> tuple[dict[str, ServiceInstance], dict[str, Check]]:
    """The node's stored instances and checks (with `node` set), one plain-SQL read each."""
    found_services, found_checks = db_rows.where_each(
        [
            (ServiceInstance, "node_id = %s ORDER BY service_id", [node.pk]),
            (Check, "node_id = %s ORDER BY check_id", [node.pk]),
        ]
    )
    for row in (*found_services, *found_checks):
        row.node = node
    return (
        {s.service_id: s for s in found_services},
        {c.check_id: c for c in found_checks},
    )


# --- sync -------------------------------------------------------------------------------


def sync_node(node_name: str, dc: str, state: NodeState) -> int:
    """Make the catalog's services and checks of `node_name` equal to the agent's.

    What differs is registered or updated, what the agent no longer has is
    deregistered, all in one `Change`; when nothing differs nothing is
    written and no index moves. A node the catalog lost is registered again
    (anti-entropy: the agent restores what the control plane lost).
    Returns the index of the node's state after the sync.
    """
    enrollment.check_scope(node_name, state.services)
    found = Node.objects.select_related("datacenter").filter(name=node_name)
    # Inside a transaction already (the writer's batch), the node is locked at
    # once and planned once; otherwise the plan is made again under the lock.
    locked = connection.in_atomic_block
    node = (found.select_for_update(of=("self",)) if locked else found).first()
    plan = _plan(node, state) if node is not None else None
    if plan is not None and plan.empty:
        return topic_index(topic.node(node_name))
    with Change() as w:
        if plan is None or not locked:
            node = found.select_for_update(of=("self",)).first()
            if node is None:
                if not state.address:
                    raise BadRequest("address is required to register the node again")
                node = enrollment.register_node(
                    w, node_name, state.address, enrollment.check_meta(state.meta), dc
                )
            plan = _plan(node, state)  # inside the transaction: this one is authoritative
        _apply(w, node, plan)
    return w.index


def _apply(w: Change, node: Node, plan: _Plan) -> None:
    if plan.node_fields:
        before = shapes.node_json(node)
        for k, v in plan.node_fields.items():
            setattr(node, k, v)
        node.modify_index = w.index
        node.save()
        w.audit("node.register", "node", node.name, before, shapes.node_json(node))
        catalog.touch_node_services(w, node)
    for sid in plan.delete_services:
        for row in ServiceInstance.objects.select_related("node").filter(node=node, service_id=sid):
            catalog.delete_instance(w, row)
    # The plan's rows were read in this transaction with the node locked: what
    # the steps below still find stored is known without reading it again.
    # Deleting an instance deletes its checks with it.
    gone = set(plan.delete_services)
    stored_checks = {
        cid: row for cid, row in plan.stored_checks.items() if row.service_id not in gone
    }
    saved: dict[str, ServiceInstance] = {}
    # Instances and checks are stored together, in one round trip: their
    # statements depend on no answer (`rows.save_each`).
    pending: list[Any] = []
    for sid in plan.upsert_services:
        spec, parent = plan.services[sid]
        saved[sid] = catalog.save_instance(
            w,
            node,
            spec,
            agent_local=True,
            parent_id=parent,
            stored=plan.stored_services.get(sid) if sid not in gone else None,
            save=False,
        )
        pending.append(saved[sid])
    if plan.delete_checks:
        db_rows.save_each(pending)  # a deleted check's service is read as stored
        pending = []
    for cid in plan.delete_checks:
        row = stored_checks.pop(cid, None)
        if row is not None:  # else it went with its service above
            catalog.delete_check(w, row)
    for cid in plan.upsert_checks:
        want = plan.checks[cid]
        svc = None
        if want.service_id:
            svc = saved.get(want.service_id) or plan.stored_services[want.service_id]
        spec = dict(want.spec)
        existing = stored_checks.get(cid)
        if existing is not None:
            # An update keeps the stored status; the agent's report (below) moves it.
            spec.pop("Status", None)
        check = catalog.upsert_check(
            w,
            node,
            spec,
            check_id=cid,
            name=want.name,
            svc=svc,
            agent_local=True,
            existing=existing,
            save=False,
        )
        if want.status is not None:
            check.node = node
            catalog.apply_check_result(w, check, want.status, want.output, svc=svc, save=False)
        pending.append(check)
    if plan.status_checks:
        # Read again, locked: a check's status may have moved since the plan
        # (a TTL expiry, a check run) without the node's lock.
        lock = " FOR UPDATE" if connection.vendor == "postgresql" else ""
        marks = ", ".join(["%s"] * len(plan.status_checks))
        current = db_rows.where(
            Check,
            f"node_id = %s AND check_id IN ({marks}) ORDER BY check_id{lock}",
            [node.pk, *plan.status_checks],
        )
        by_id = {c.check_id: c for c in current}
        for cid in plan.status_checks:
            check = by_id.get(cid)
            if check is None:
                raise Check.DoesNotExist(f"check {cid!r} of node {node.name!r}")
            want = plan.checks[cid]
            check.node = node
            svc = None
            if check.service_id:
                svc = saved.get(check.service_id) or plan.stored_services.get(check.service_id)
            catalog.apply_check_result(
                w, check, want.status or check.status, want.output, svc=svc, save=False
            )
            pending.append(check)
    db_rows.save_each(pending)


# --- check updates ---------------------------------------------------------------------------


def update_checks(node_name: str, updates: Sequence[tuple[str, str, str | None]]) -> int:
    """Apply check results `(check_id, status, output)` from the node's agent.

    One `Change` for the batch, and none at all when every result equals
    what is stored. Checks the catalog does not have are skipped (the next
    full sync registers them). Returns the node's index after the update.
    """
    for check_id, status, _output in updates:
        if status not in rules.STATUS_ORDER:
            raise BadRequest(f"check {check_id!r}: invalid status {status!r}")
    latest: dict[str, tuple[str, str | None]] = {}
    for check_id, status, output in updates:
        latest[check_id] = (status, rules.truncate_output(output) if output is not None else None)
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
    """IDs of the sidecar proxies (`connect-proxy` instances) and mesh gateways
    registered on the node: the config stream compiles a config for each."""
    return list(
        ServiceInstance.objects.filter(
            node__name=node_name, kind__in=("connect-proxy", "mesh-gateway")
        )
        .order_by("service_id")
        .values_list("service_id", flat=True)
    )
