"""Catalog writes and reads: nodes, service instances and their checks.

Registration follows Consul's agent, by the rules of
`meshproto.registration.rules` (shared with the agent): inline checks get IDs
`service:<id>` (`service:<id>:<n>` for several), new checks are critical
until they pass, `Connect.SidecarService` registers `<id>-sidecar-proxy`
(removed with its parent) and maintenance mode is a
`_service_maintenance:<id>` check. `instance_fields` / `check_fields` say
what a registration stores; node sync compares with them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.db.models.base import ModelState
from django.utils import timezone

from meshproto import durations
from meshproto.registration import rules
from registry import topics as topic
from registry.domain import rows, shapes
from registry.errors import BadRequest, NotFound, rule_errors
from registry.models import Check, Datacenter, Node, ServiceInstance
from registry.txn import Change

STATUS_ORDER = rules.STATUS_ORDER
SERF_CHECK_ID = "serfHealth"
NODE_MAINTENANCE_CHECK_ID = rules.NODE_MAINTENANCE_CHECK_ID
aggregate_status = rules.aggregate_status


# --- topics -------------------------------------------------------------------


def service_topics(svc: ServiceInstance) -> list[str]:
    """What a change to this instance (or its health) invalidates."""
    topics = [topic.SERVICES, topic.service(svc.name), topic.node(svc.node.name)]
    if svc.destination_name:
        topics.append(topic.connect(svc.destination_name))
    return topics


def touch_node_services(change: Change, node: Node) -> None:
    """A node-level change moves the health of every service on the node."""
    change.touch(topic.NODES, topic.node(node.name), topic.CHECKS)
    for name, dest in node.services.values_list("name", "destination_name"):
        change.touch(topic.service(name))
        if dest:
            change.touch(topic.connect(dest))


# --- datacenters and nodes ------------------------------------------------------


def ensure_datacenter(name: str, change: Change | None = None) -> Datacenter:
    dc = rows.first(Datacenter, name=name)
    if dc is not None:
        return dc
    if change is None:
        with Change() as c:
            return ensure_datacenter(name, c)
    dc = Datacenter.objects.create(name=name, create_index=change.index, modify_index=change.index)
    change.touch(topic.DATACENTERS)
    return dc


_local_node: tuple[float, Node] | None = None
_LOCAL_NODE_TTL = 2.0


def local_node() -> Node:
    """The control plane's own node (what `/v1/agent/...` acts for here).

    Every agent-API request needs it, so it is kept for a couple of seconds:
    writes use only its key and name, which do not change.
    """
    global _local_node
    now = time.monotonic()
    cached = _local_node
    if cached is not None and now - cached[0] < _LOCAL_NODE_TTL:
        return _clone(cached[1])
    node = Node.objects.select_related("datacenter").filter(name=settings.MESH_NODE_NAME).first()
    if node is None:
        node = ensure_local_node()
    _local_node = (now, node)
    return _clone(node)


def _clone(node: Node) -> Node:
    """A shallow copy of a node and its cached datacenter (cheaper than `copy.copy`,
    which pickles the model's state: the agent API asks for the local node each request)."""
    c = Node.__new__(Node)
    c.__dict__.update(node.__dict__)
    c._state = ModelState()
    c._state.adding, c._state.db = False, node._state.db
    c._state.fields_cache = dict(node._state.fields_cache)
    return c


def forget_local_node() -> None:
    """Drop the cached local node (it was deleted or re-created)."""
    global _local_node
    _local_node = None


def ensure_local_node() -> Node:
    """Create the control plane's node and its `serfHealth` check on first start."""
    forget_local_node()
    with Change() as c:
        dc = ensure_datacenter(settings.MESH_DC, c)
        node, created = Node.objects.get_or_create(
            name=settings.MESH_NODE_NAME,
            defaults={
                "node_id": str(uuid.uuid5(uuid.NAMESPACE_DNS, settings.MESH_NODE_NAME)),
                "address": settings.MESH_HTTP_ADDR[0] or "127.0.0.1",
                "datacenter": dc,
                "meta": {"consul-network-segment": "", "mesh-role": "server"},
                "create_index": c.index,
                "modify_index": c.index,
            },
        )
        if not Check.objects.filter(node=node, check_id=SERF_CHECK_ID).exists():
            Check.objects.create(
                node=node,
                check_id=SERF_CHECK_ID,
                name="Serf Health Status",
                status=Check.PASSING,
                output="Agent alive and reachable",
                create_index=c.index,
                modify_index=c.index,
            )
            c.touch(topic.CHECKS, topic.node(node.name))
        if created:
            c.touch(topic.NODES, topic.node(node.name))
    return Node.objects.select_related("datacenter").get(pk=node.pk)


def find_node(name: str) -> Node | None:
    """The node named `name` with its datacenter, or None (plain SQL: every catalog write asks)."""
    return rows.first_related(Node, "datacenter", name=name)


def get_node(name: str) -> Node:
    node = find_node(name)
    if node is None:
        raise NotFound(f'Node "{name}" not found')
    return node


# --- service registration --------------------------------------------------------


class _Unknown:
    """Marks an argument the caller did not look up (None means "there is none")."""


def _check_type(spec: dict[str, Any]) -> str:
    with rule_errors():
        return rules.check_kind(spec)


def check_fields(
    spec: dict[str, Any],
    *,
    check_id: str,
    name: str,
    service_id: str = "",
    service_name: str = "",
    service_tags: list[str] | None = None,
    agent_local: bool,
) -> dict[str, Any]:
    """What registering the check `spec` stores in its row (besides status and output)."""
    return {
        "name": name,
        "notes": spec.get("Notes", ""),
        "type": "maintenance" if rules.is_maintenance(check_id) else _check_type(spec),
        "definition": rules.check_definition(spec),
        "interval": durations.seconds(spec.get("Interval")),
        "timeout": durations.seconds(spec.get("Timeout")),
        "ttl": durations.seconds(spec.get("TTL")),
        "deregister_after": durations.seconds(spec.get("DeregisterCriticalServiceAfter")),
        "service_id": service_id,
        "service_name": service_name,
        "service_tags": list(service_tags or []),
        "agent_local": agent_local,
    }


def _upsert_check(
    change: Change,
    node: Node,
    spec: dict[str, Any],
    *,
    check_id: str,
    name: str,
    svc: ServiceInstance | None,
    agent_local: bool,
    status: str | None = None,
    output: str | None = None,
    existing: Check | None | type[_Unknown] = _Unknown,
    save: bool = True,
) -> Check:
    """Insert or update one check (plain SQL: it runs for every registered check).

    `existing` is the stored row when the caller already read it (None: there
    is none); left out, it is read here. With `save` off the caller stores
    the returned row (with others, `rows.save_each`) before it reads again.
    """
    fields = check_fields(
        spec,
        check_id=check_id,
        name=name,
        service_id=svc.service_id if svc else "",
        service_name=svc.name if svc else "",
        service_tags=list(svc.tags) if svc else [],
        agent_local=agent_local,
    )
    kind = fields["type"]
    if existing is _Unknown:
        existing = rows.first(Check, node_id=node.pk, check_id=check_id)
    now = timezone.now()
    check = existing or rows.new(
        Check, node_id=node.pk, check_id=check_id, create_index=change.index
    )
    check.node = node
    for attr, value in fields.items():
        setattr(check, attr, value)
    if existing is None or spec.get("Status"):
        with rule_errors():
            check.status = rules.check_status(
                status if status is not None else spec.get("Status", "")
            )
        check.critical_since = now if check.status == Check.CRITICAL else None
    if output is not None:
        check.output = output
    if kind in ("http", "tcp", "grpc", "alias"):
        check.next_run_at = now  # run soon after registration
    if kind == "ttl" and existing is None:
        check.ttl_expires_at = now + timedelta(seconds=check.ttl)
    check.modify_index = change.index
    if save:
        rows.save(check)
    change.audit(
        "check.register",
        "check",
        f"{node.name}/{check_id}",
        None if existing is None else {"Status": existing.status},
        {"Name": name, "Status": check.status, "Type": kind, "ServiceID": check.service_id},
    )
    change.touch(topic.CHECKS, topic.node(node.name))
    if svc is not None:
        change.touch(*service_topics(svc))
    else:
        touch_node_services(change, node)
    return check


def sidecar_ports(node: Node) -> dict[str, int]:
    """The ports of the node's saved sidecars, by sidecar ID."""
    return dict(node.services.filter(kind="connect-proxy").values_list("service_id", "port"))


def sidecar_port(
    node: Node, sidecar_id: str, taken: Iterable[int] = (), ports: dict[str, int] | None = None
) -> int:
    """The port of the node's sidecar `sidecar_id`: the one it has, else the first
    free one of the sidecar range (not a saved sidecar's, nor one in `taken`).
    `ports` is `sidecar_ports(node)` when the caller already has it."""
    ports = sidecar_ports(node) if ports is None else ports
    if ports.get(sidecar_id):
        return ports[sidecar_id]
    with rule_errors():
        return rules.free_sidecar_port(set(ports.values()) | set(taken))


def expand_sidecar(
    node: Node,
    parent: dict[str, Any],
    taken: Iterable[int] = (),
    ports: dict[str, int] | None = None,
) -> dict[str, Any]:
    """`Connect.SidecarService` of `parent` as registered on `node` (Consul's defaults)."""
    sidecar = parent["Connect"]["SidecarService"]
    port = sidecar.get("Port") or sidecar_port(node, rules.sidecar_id(parent) or "", taken, ports)
    return rules.expand_sidecar(parent, port)


def validate_service(spec: dict[str, Any]) -> None:
    """Refuse (400) a service definition Consul would refuse."""
    with rule_errors():
        rules.validate_service(spec)


_validate_service = validate_service


def instance_fields(spec: dict[str, Any], *, parent_id: str, agent_local: bool) -> dict[str, Any]:
    """What registering the service `spec` stores in its row."""
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
        "agent_local": agent_local,
    }


def stored_instance(node: Node, spec: dict[str, Any]) -> ServiceInstance | None:
    """The instance on `node` that registering `spec` would replace (same ID), if any.

    A caller that needs it before the write (the ACL check) passes it on to
    `register_agent_service` so the write does not read it again.
    """
    return rows.first(ServiceInstance, node_id=node.pk, service_id=rules.service_id(spec))


@dataclass(frozen=True)
class StoredService:
    """The rows registering a service replaces, read before the write: its
    instance and its inline checks (`checks` None when not read)."""

    instance: ServiceInstance | None
    checks: dict[str, Check] | None


def stored_service(node: Node, spec: dict[str, Any]) -> StoredService:
    """`stored_instance` and the stored rows of the service's inline checks, read together.

    For `PUT /v1/agent/service/register`: its ACL check needs the instance,
    its write both, and the write needs no read of its own. A
    definition whose checks are invalid reads the instance only (the write
    refuses it later, after the ACL check, as before).
    """
    service_id = rules.service_id(spec)
    try:
        check_ids = [c.check_id for c in service_checks(service_id, spec)]
    except (BadRequest, KeyError, TypeError):
        check_ids = None
    if not check_ids:
        instance = rows.first(ServiceInstance, node_id=node.pk, service_id=service_id)
        return StoredService(instance, {} if check_ids == [] else None)
    marks = ", ".join(["%s"] * len(check_ids))
    found_instances, found_checks = rows.where_each(
        [
            (ServiceInstance, "node_id = %s AND service_id = %s", [node.pk, service_id]),
            (Check, f"node_id = %s AND check_id IN ({marks})", [node.pk, *check_ids]),
        ]
    )
    return StoredService(
        found_instances[0] if found_instances else None,
        {c.check_id: c for c in found_checks},
    )


def _save_instance(
    change: Change,
    node: Node,
    spec: dict[str, Any],
    *,
    agent_local: bool,
    parent_id: str = "",
    stored: ServiceInstance | None | type[_Unknown] = _Unknown,
    save: bool = True,
) -> ServiceInstance:
    _validate_service(spec)
    service_id = spec.get("ID") or spec["Name"]
    svc = stored_instance(node, spec) if stored is _Unknown else stored
    before = shapes.agent_service_json(_with_node(svc, node)) if svc is not None else None
    if svc is not None and svc.name != spec["Name"]:
        # Renaming an instance moves it between services: both lists change.
        change.touch(*service_topics(svc))
    svc = svc or rows.new(
        ServiceInstance, node_id=node.pk, service_id=service_id, create_index=change.index
    )
    for attr, value in instance_fields(spec, parent_id=parent_id, agent_local=agent_local).items():
        setattr(svc, attr, value)
    svc.modify_index = change.index
    svc.node = node
    if save:
        rows.save(svc)
    change.touch(*service_topics(svc))
    change.audit(
        "service.register",
        "service",
        f"{node.name}/{service_id}",
        before,
        shapes.agent_service_json(svc),
    )
    if before is not None and (before["Service"] != svc.name or before["Tags"] != svc.tags):
        # Checks copy the service's name and tags; keep them current.
        rows.update_where(
            Check,
            {"service_name": svc.name, "service_tags": svc.tags, "modify_index": change.index},
            node_id=node.pk,
            service_id=service_id,
        )
    return svc


def register_agent_service(
    node: Node,
    spec: dict[str, Any],
    *,
    replace_existing_checks: bool = False,
    stored: ServiceInstance | None | type[_Unknown] | StoredService = _Unknown,
) -> ServiceInstance:
    """`PUT /v1/agent/service/register`: the service, its checks and its sidecar, atomically.

    `stored` is `stored_service(node, spec)` (or `stored_instance`) when the
    caller has read it already. The instance and its checks are stored in
    one round trip.
    """
    validate_service(spec)
    spec = dict(spec, ID=rules.service_id(spec))
    stored_checks = None
    if isinstance(stored, StoredService):
        stored, stored_checks = stored.instance, stored.checks
    with Change() as change:
        svc = _save_instance(change, node, spec, agent_local=True, stored=stored, save=False)
        _register_service_checks(
            change, node, svc, spec, replace_existing_checks, stored=stored_checks, with_rows=[svc]
        )
        if rules.sidecar_id(spec) is not None:
            sc = expand_sidecar(node, spec)
            sidecar = _save_instance(change, node, sc, agent_local=True, parent_id=svc.service_id)
            _register_service_checks(change, node, sidecar, sc, replace_existing_checks)
    return svc


def service_checks(service_id: str, spec: dict[str, Any]) -> list[rules.InlineCheck]:
    """A service's inline checks with the IDs and names Consul gives them (400 if bad)."""
    with rule_errors():
        return rules.service_checks(service_id, spec["Name"], spec)


def _register_service_checks(
    change: Change,
    node: Node,
    svc: ServiceInstance,
    spec: dict[str, Any],
    replace: bool,
    *,
    stored: dict[str, Check] | None = None,
    with_rows: list[ServiceInstance] | None = None,
) -> None:
    """Upsert a service's inline checks; `stored`: their rows when already read.

    `with_rows` (an instance not stored yet) is stored with the checks, all
    in one statement (`rows.save_each`); it comes first.
    """
    specs = service_checks(svc.service_id, spec)
    keep = {s.check_id for s in specs} | {rules.maintenance_check_id(svc.service_id)}
    if stored is None:
        stored = _stored_checks(node, [s.check_id for s in specs])
    pending: list[Any] = list(with_rows or [])
    for s in specs:
        pending.append(
            _upsert_check(
                change,
                node,
                s.spec,
                check_id=s.check_id,
                name=s.name,
                svc=svc,
                agent_local=True,
                existing=stored.get(s.check_id),
                save=False,
            )
        )
    rows.save_each(pending)
    if replace:
        stale = Check.objects.filter(node=node, service_id=svc.service_id).exclude(
            check_id__in=keep
        )
        if stale.exists():
            stale.delete()
            change.touch(*service_topics(svc), topic.CHECKS)


def _stored_checks(node: Node, check_ids: list[str]) -> dict[str, Check]:
    """The node's stored checks among `check_ids`, in one query."""
    if not check_ids:
        return {}
    marks = ", ".join(["%s"] * len(check_ids))
    found = rows.where(Check, f"node_id = %s AND check_id IN ({marks})", [node.pk, *check_ids])
    return {c.check_id: c for c in found}


def _with_node(svc: ServiceInstance, node: Node) -> ServiceInstance:
    svc.node = node
    return svc


def _delete_instance(change: Change, svc: ServiceInstance) -> None:
    change.touch(*service_topics(svc), topic.CHECKS)
    change.audit(
        "service.deregister",
        "service",
        f"{svc.node.name}/{svc.service_id}",
        shapes.agent_service_json(svc),
        None,
    )
    Check.objects.filter(node=svc.node, service_id=svc.service_id).delete()
    from registry.domain.sessions import invalidate_sessions_for_checks

    svc.delete()
    invalidate_sessions_for_checks(change, svc.node, service_ids=[svc.service_id])


def save_instance(
    change: Change,
    node: Node,
    spec: dict[str, Any],
    *,
    agent_local: bool,
    parent_id: str = "",
    stored: ServiceInstance | None | type[_Unknown] = _Unknown,
    save: bool = True,
) -> ServiceInstance:
    """Write one service instance (validated, `ID` set) in `change`, without its checks.

    `stored`: the row it replaces (None: there is none) when the caller has read it;
    with `save` off the caller stores the returned row (`rows.save_each`).
    """
    return _save_instance(
        change,
        node,
        spec,
        agent_local=agent_local,
        parent_id=parent_id,
        stored=stored,
        save=save,
    )


def delete_instance(change: Change, svc: ServiceInstance) -> None:
    """Remove one service instance and its checks in `change` (audited, sessions invalidated)."""
    _delete_instance(change, svc)


# Register or update one check in a change (public for node sync): a new check starts
# as `spec["Status"]` (critical when absent), an existing one keeps its status unless
# `Status` (or `status=`) is given.
upsert_check = _upsert_check


def deregister_agent_service(node: Node, service_id: str) -> None:
    """Remove a service, its checks and any sidecar registered with it."""
    with Change() as change:
        svc = (
            ServiceInstance.objects.select_related("node")
            .filter(node=node, service_id=service_id)
            .first()
        )
        if svc is None:
            raise NotFound(
                f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.'
            )
        for sidecar in ServiceInstance.objects.select_related("node").filter(
            node=node, parent_service_id=service_id
        ):
            _delete_instance(change, sidecar)
        _delete_instance(change, svc)


def get_instance(node: Node, service_id: str) -> ServiceInstance:
    svc = (
        ServiceInstance.objects.select_related("node__datacenter")
        .filter(node=node, service_id=service_id)
        .first()
    )
    if svc is None:
        raise NotFound(f"unknown service ID: {service_id}")
    return svc


def set_service_maintenance(node: Node, service_id: str, enable: bool, reason: str = "") -> None:
    """Maintenance mode is a critical `_service_maintenance:<id>` check, as in Consul."""
    svc = get_instance(node, service_id)
    check_id = rules.maintenance_check_id(service_id)
    with Change() as change:
        if enable:
            spec = rules.maintenance_check(service_id, reason)
            _upsert_check(
                change,
                node,
                spec,
                check_id=check_id,
                name=spec["Name"],
                svc=svc,
                agent_local=True,
                status=Check.CRITICAL,
            )
        else:
            if Check.objects.filter(node=node, check_id=check_id).delete()[0]:
                change.touch(*service_topics(svc), topic.CHECKS)


def set_node_maintenance(node: Node, enable: bool, reason: str = "") -> None:
    with Change() as change:
        if enable:
            spec = rules.maintenance_check("", reason)
            _upsert_check(
                change,
                node,
                spec,
                check_id=NODE_MAINTENANCE_CHECK_ID,
                name=spec["Name"],
                svc=None,
                agent_local=True,
                status=Check.CRITICAL,
            )
        elif Check.objects.filter(node=node, check_id=NODE_MAINTENANCE_CHECK_ID).delete()[0]:
            touch_node_services(change, node)


# --- checks -----------------------------------------------------------------------------


def register_agent_check(node: Node, spec: dict[str, Any]) -> Check:
    """`PUT /v1/agent/check/register`."""
    if not spec.get("Name"):
        raise BadRequest("Missing check name")
    with rule_errors():
        rules.require_check_kind(spec)
    check_id = spec.get("CheckID") or spec["Name"]
    with Change() as change:
        svc = None
        if spec.get("ServiceID"):
            svc = (
                ServiceInstance.objects.select_related("node")
                .filter(node=node, service_id=spec["ServiceID"])
                .first()
            )
            if svc is None:
                raise NotFound(f'ServiceID "{spec["ServiceID"]}" does not exist')
        return _upsert_check(
            change, node, spec, check_id=check_id, name=spec["Name"], svc=svc, agent_local=True
        )


def deregister_check(node: Node, check_id: str) -> None:
    with Change() as change:
        check = Check.objects.filter(node=node, check_id=check_id).first()
        if check is None:
            raise NotFound(
                f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        check.node = node
        delete_check(change, check)


def delete_check(change: Change, check: Check) -> None:
    """Remove one check in `change`: audited, watchers woken, its sessions invalidated."""
    from registry.domain.sessions import invalidate_sessions_for_checks

    _touch_check(change, check)
    change.audit(
        "check.deregister",
        "check",
        f"{check.node.name}/{check.check_id}",
        {"Status": check.status},
        None,
    )
    check.delete()
    invalidate_sessions_for_checks(change, check.node, check_ids=[check.check_id])


def _touch_check(change: Change, check: Check, svc: ServiceInstance | None = None) -> None:
    """Touch what a change to `check` invalidates; `svc`: its service's row, when known."""
    change.touch(topic.CHECKS, topic.node(check.node.name))
    if check.service_id:
        if svc is None or svc.service_id != check.service_id:
            svc = rows.first(ServiceInstance, node_id=check.node_id, service_id=check.service_id)
        if svc is not None:
            svc.node = check.node
            change.touch(*service_topics(svc))
    else:
        touch_node_services(change, check.node)


def update_check_status(node: Node, check_id: str, status: str, output: str | None = None) -> Check:
    """Set a check's status (TTL pass/warn/fail/update, or a check run's result).

    A TTL check's timer restarts. Only a real change of status or output
    bumps indexes and wakes watchers, so a TTL heartbeat costs one UPDATE.
    """
    if status not in STATUS_ORDER:
        raise BadRequest(f"Invalid check status: {status!r}")
    with Change() as change:
        check = (
            Check.objects.select_related("node")
            .select_for_update()
            .filter(node=node, check_id=check_id)
            .first()
        )
        if check is None:
            raise NotFound(
                f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        return apply_check_result(change, check, status, output)


def apply_check_result(
    change: Change,
    check: Check,
    status: str,
    output: str | None,
    *,
    svc: ServiceInstance | None = None,
    save: bool = True,
) -> Check:
    """Set `check`'s status and output (audited, watchers woken when they change).

    `svc`: the check's service row when the caller has it (else it is read if
    needed); with `save` off the caller stores the check (`rows.save_each`).
    """
    now = timezone.now()
    if check.type == "ttl" and check.ttl:
        check.ttl_expires_at = now + timedelta(seconds=check.ttl)
    changed = status != check.status or (output is not None and output != check.output)
    if status == Check.CRITICAL:
        check.critical_since = check.critical_since or now
    else:
        check.critical_since = None
    if changed:
        change.audit(
            "check.update",
            "check",
            f"{check.node.name}/{check.check_id}",
            {"Status": check.status, "Output": check.output},
            {"Status": status, "Output": output if output is not None else check.output},
        )
        check.status = status
        if output is not None:
            check.output = output
        check.modify_index = change.index
        _touch_check(change, check, svc)
    if save:
        rows.save(check)
    if changed and status == Check.CRITICAL:
        from registry.domain.sessions import invalidate_sessions_for_checks

        invalidate_sessions_for_checks(change, check.node, check_ids=[check.check_id])
    return check


# --- permissions --------------------------------------------------------------------------


Need = tuple[str, str]  # (permission, resource), e.g. ("service:write", "web")


def agent_register_needs(
    node: Node, spec: dict[str, Any], stored: ServiceInstance | None | type[_Unknown] = _Unknown
) -> list[Need]:
    """What `register_agent_service(node, spec)` needs from the caller's token.

    Write on the service, on any other service whose ID it re-uses (it would
    replace it), on a proxy's destination and on a named sidecar. `stored`:
    as for `register_agent_service`.
    """
    name = spec.get("Name", "")
    needs: list[Need] = [("service:write", name)]
    replaced = (
        rows.first(ServiceInstance, node_id=node.pk, service_id=spec.get("ID") or name)
        if stored is _Unknown
        else stored
    )
    if replaced is not None and replaced.name != name:
        needs.append(("service:write", replaced.name))
    dest = (spec.get("Proxy") or {}).get("DestinationServiceName")
    if spec.get("Kind") == "connect-proxy" and dest:
        needs.append(("service:write", dest))
    sidecar = (spec.get("Connect") or {}).get("SidecarService")
    if sidecar is not None and sidecar.get("Name"):
        needs.append(("service:write", sidecar["Name"]))
    return needs


@dataclass(frozen=True)
class StoredRows:
    """What a catalog registration would change, read once for its ACL check and its write."""

    node: Node | None  # with its datacenter
    instance: ServiceInstance | None  # on that node, with the registered service's ID


def stored_for_catalog(spec: dict[str, Any]) -> StoredRows:
    """The stored node and service instance that `catalog_register(spec)` would replace."""
    node = find_node(spec.get("Node", "")) if spec.get("Node") else None
    service = spec.get("Service") or {}
    service_id = service.get("ID") or service.get("Name") or ""
    instance = None
    if node is not None and service_id:
        instance = rows.first(ServiceInstance, node_id=node.pk, service_id=service_id)
    return StoredRows(node, instance)


def catalog_register_needs(spec: dict[str, Any], stored: StoredRows | None = None) -> list[Need]:
    """What `catalog_register(spec)` needs from the caller's token.

    node:write when the node is created or any of its fields change; write on
    the service (and on a service whose ID it re-uses, and a proxy's
    destination); node:write for node-level checks and write on the service
    a check is attached to. `stored`: `stored_for_catalog(spec)`, if read already.
    """
    node = spec.get("Node", "")
    stored = stored or stored_for_catalog(spec)
    existing = stored.node
    needs: list[Need] = []
    if not spec.get("SkipNodeUpdate"):
        changes_node = (
            existing is None
            or spec.get("Address") not in (None, "", existing.address)
            or "NodeMeta" in spec
            or spec.get("ID") not in (None, "", existing.node_id)
            or (
                "TaggedAddresses" in spec
                and spec["TaggedAddresses"] != (existing.tagged_addresses or {})
            )
        )
        if changes_node:
            needs.append(("node:write", node))

    def on_node(service_id: str) -> ServiceInstance | None:
        if existing is None or not service_id:
            return None
        return rows.first(ServiceInstance, node_id=existing.pk, service_id=service_id)

    service = spec.get("Service") or {}
    service_id = ""
    if service:
        name = service.get("Name", "")
        needs.append(("service:write", name))
        service_id = service.get("ID") or name
        replaced = stored.instance
        if replaced is not None and replaced.name != name:
            needs.append(("service:write", replaced.name))
        dest = (service.get("Proxy") or {}).get("DestinationServiceName")
        if service.get("Kind") == "connect-proxy" and dest:
            needs.append(("service:write", dest))
    checks = ([spec["Check"]] if spec.get("Check") else []) + list(spec.get("Checks") or [])
    for c in checks:
        if not c.get("ServiceID"):
            needs.append(("node:write", node))
        elif c["ServiceID"] != service_id:
            target = on_node(c["ServiceID"])
            if target is not None:
                needs.append(("service:write", target.name))
    return needs


# --- catalog register / deregister ------------------------------------------------------


def catalog_register(spec: dict[str, Any], stored: StoredRows | None = None) -> None:
    """`PUT /v1/catalog/register`: node, optional service, optional checks, atomically.

    `stored`: `stored_for_catalog(spec)`, when the caller has read it already.
    """
    if not spec.get("Node"):
        raise BadRequest("Must provide node")
    dc_name = spec.get("Datacenter") or settings.MESH_DC
    with Change() as change:
        stored = stored or stored_for_catalog(spec)
        node = stored.node
        if node is None:
            if not spec.get("Address"):
                raise BadRequest("Must provide address if SkipNodeUpdate is not set")
            node = Node(name=spec["Node"], create_index=change.index)
        if node.pk is None or not spec.get("SkipNodeUpdate"):
            if not spec.get("Address") and not node.address:
                raise BadRequest("Must provide address if SkipNodeUpdate is not set")
            before = shapes.node_json(node) if node.pk is not None else None
            node.address = spec.get("Address") or node.address
            node.node_id = spec.get("ID") or node.node_id
            if node.pk is None or node.datacenter.name != dc_name:
                node.datacenter = ensure_datacenter(dc_name, change)
            if "TaggedAddresses" in spec:
                node.tagged_addresses = spec["TaggedAddresses"]
            if "NodeMeta" in spec:
                node.meta = spec["NodeMeta"]
            after = shapes.node_json(node)
            # Re-registering an unchanged node (every catalog register does) is
            # not a change: no write, no index bump, no watcher woken.
            if before is None or {**before, "ModifyIndex": 0} != {**after, "ModifyIndex": 0}:
                node.modify_index = change.index
                node.save()
                change.audit("node.register", "node", node.name, before, shapes.node_json(node))
                touch_node_services(change, node)
        svc = None
        if spec.get("Service"):
            service = dict(spec["Service"])
            _validate_service(service)
            service["ID"] = service.get("ID") or service["Name"]
            svc = _save_instance(
                change,
                node,
                service,
                agent_local=False,
                stored=stored.instance if stored.node is not None else None,
            )
        checks = ([spec["Check"]] if spec.get("Check") else []) + list(spec.get("Checks") or [])
        for c in checks:
            if not c.get("CheckID") and not c.get("Name"):
                raise BadRequest("Missing check ID or name")
            check_svc = svc
            if c.get("ServiceID") and svc is not None and c["ServiceID"] == svc.service_id:
                pass  # the service this request registered
            elif c.get("ServiceID"):
                check_svc = (
                    ServiceInstance.objects.select_related("node")
                    .filter(node=node, service_id=c["ServiceID"])
                    .first()
                )
                if check_svc is None:
                    raise BadRequest(
                        f'Missing service "{c["ServiceID"]}" for check "{c.get("CheckID") or c.get("Name")}"'
                    )
            elif not c.get("ServiceID"):
                check_svc = None
            fields = dict(c.get("Definition") or {})
            fields.update({k: v for k, v in c.items() if k in ("Notes", "Status")})
            _upsert_check(
                change,
                node,
                fields,
                check_id=c.get("CheckID") or c["Name"],
                name=c.get("Name") or c["CheckID"],
                svc=check_svc,
                agent_local=False,
                output=c.get("Output"),
            )


def catalog_deregister(spec: dict[str, Any]) -> None:
    """`PUT /v1/catalog/deregister`: a check, a service, or the whole node."""
    if not spec.get("Node"):
        raise BadRequest("Must provide node")
    with Change() as change:
        node = Node.objects.select_related("datacenter").filter(name=spec["Node"]).first()
        if node is None:
            return  # Consul answers true: deregistering what is gone is idempotent
        if spec.get("ServiceID"):
            svc = (
                ServiceInstance.objects.select_related("node")
                .filter(node=node, service_id=spec["ServiceID"])
                .first()
            )
            if svc is not None:
                _delete_instance(change, svc)
        elif spec.get("CheckID"):
            check = (
                Check.objects.select_related("node")
                .filter(node=node, check_id=spec["CheckID"])
                .first()
            )
            if check is not None:
                _touch_check(change, check)
                check.delete()
        else:
            delete_node(change, node)


def delete_node(change: Change, node: Node) -> None:
    forget_local_node()
    change.audit("node.deregister", "node", node.name, shapes.node_json(node), None)
    touch_node_services(change, node)
    for svc in ServiceInstance.objects.select_related("node").filter(node=node):
        change.touch(*service_topics(svc))
    from registry.domain.sessions import destroy_node_sessions

    destroy_node_sessions(change, node)
    node.delete()


# --- reads ------------------------------------------------------------------------------


def instances_query(name: str | None = None, *, connect: bool = False, dc: str | None = None):
    qs = ServiceInstance.objects.select_related("node__datacenter")
    if connect:
        qs = qs.filter(Q(destination_name=name) | Q(name=name, connect__Native=True))
    elif name is not None:
        qs = qs.filter(name=name)
    if dc:
        qs = qs.filter(node__datacenter__name=dc)
    return qs.order_by("node__name", "service_id")


def checks_for(instances: list[ServiceInstance]) -> dict[int, list[Check]]:
    """Node-level checks per node id and service checks per instance id, in one query."""
    if not instances:
        return {}
    node_ids = {s.node_id for s in instances}
    service_ids = {s.service_id for s in instances}
    rows = list(
        Check.objects.filter(node_id__in=node_ids)
        .filter(Q(service_id="") | Q(service_id__in=service_ids))
        .order_by("check_id")
    )
    by_node: dict[int, list[Check]] = {}
    by_service: dict[tuple[int, str], list[Check]] = {}
    for c in rows:
        if c.service_id:
            by_service.setdefault((c.node_id, c.service_id), []).append(c)
        else:
            by_node.setdefault(c.node_id, []).append(c)
    return {
        s.pk: by_node.get(s.node_id, []) + by_service.get((s.node_id, s.service_id), [])
        for s in instances
    }
