"""Catalog writes and reads: nodes, service instances and their checks.

Registration follows Consul's agent: inline checks get IDs `service:<id>`
(`service:<id>:<n>` for several), new checks are critical until they pass,
`Connect.SidecarService` registers `<id>-sidecar-proxy` (removed with its
parent) and maintenance mode is a `_service_maintenance:<id>` check.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from registry import topics as topic
from registry.domain import shapes
from registry.errors import BadRequest, NotFound
from registry.models import Check, Datacenter, Node, ServiceInstance
from registry.txn import Change

SIDECAR_PORT_RANGE = range(21000, 21256)
STATUS_ORDER = {Check.PASSING: 0, Check.WARNING: 1, Check.CRITICAL: 2}
SERF_CHECK_ID = "serfHealth"


def maintenance_check_id(service_id: str) -> str:
    return f"_service_maintenance:{service_id}"


NODE_MAINTENANCE_CHECK_ID = "_node_maintenance"


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
    dc = Datacenter.objects.filter(name=name).first()
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
        return copy.copy(cached[1])
    node = Node.objects.select_related("datacenter").filter(name=settings.MESH_NODE_NAME).first()
    if node is None:
        node = ensure_local_node()
    _local_node = (now, node)
    return copy.copy(node)


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


def get_node(name: str) -> Node:
    node = Node.objects.select_related("datacenter").filter(name=name).first()
    if node is None:
        raise NotFound(f'Node "{name}" not found')
    return node


# --- service registration --------------------------------------------------------


@dataclass
class _CheckSpec:
    check_id: str
    fields: dict[str, Any]


def _check_type(spec: dict[str, Any]) -> str:
    kinds = [
        k
        for k, present in (
            ("http", spec.get("HTTP")),
            ("tcp", spec.get("TCP")),
            ("grpc", spec.get("GRPC")),
            ("ttl", spec.get("TTL")),
            ("alias", spec.get("AliasService") or spec.get("AliasNode")),
            ("script", spec.get("ScriptArgs")),
        )
        if present
    ]
    if len(kinds) > 1:
        raise BadRequest(
            f"Invalid check: only one of HTTP, TCP, GRPC, TTL, alias may be set (got {', '.join(kinds)})"
        )
    if not kinds:
        return ""
    kind = kinds[0]
    if kind == "script":
        raise BadRequest(
            "Invalid check: script checks are not supported (use HTTP, TCP, GRPC or TTL)"
        )
    if kind in ("http", "tcp", "grpc") and not spec.get("Interval"):
        raise BadRequest(f"Invalid check: {kind.upper()} checks must have an Interval")
    if kind == "http" and not str(spec["HTTP"]).startswith(("http://", "https://")):
        raise BadRequest(
            f"Invalid check: HTTP must be an http:// or https:// URL, got {spec['HTTP']!r}"
        )
    if kind == "tcp" and ":" not in spec["TCP"]:
        raise BadRequest(f"Invalid check: TCP must be host:port, got {spec['TCP']!r}")
    return kind


def _validate_status(status: str) -> str:
    if status and status not in STATUS_ORDER:
        raise BadRequest(f"Invalid check status: {status!r} (use passing, warning or critical)")
    return status or Check.CRITICAL


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
) -> Check:
    kind = _check_type(spec)
    definition = {
        k: v
        for k, v in spec.items()
        if k not in ("CheckID", "Name", "Notes", "Status", "ServiceID", "Node", "Output", "Type")
    }
    existing = Check.objects.filter(node=node, check_id=check_id).first()
    now = timezone.now()
    check = existing or Check(node=node, check_id=check_id, create_index=change.index)
    check.name = name
    check.notes = spec.get("Notes", "")
    check.type = kind
    check.definition = definition
    check.interval = spec.get("Interval", 0.0)
    check.timeout = spec.get("Timeout", 0.0)
    check.ttl = spec.get("TTL", 0.0)
    check.deregister_after = spec.get("DeregisterCriticalServiceAfter", 0.0)
    check.service_id = svc.service_id if svc else ""
    check.service_name = svc.name if svc else ""
    check.service_tags = list(svc.tags) if svc else []
    check.agent_local = agent_local
    if existing is None or spec.get("Status"):
        check.status = _validate_status(status if status is not None else spec.get("Status", ""))
        check.critical_since = now if check.status == Check.CRITICAL else None
    if output is not None:
        check.output = output
    if kind in ("http", "tcp", "grpc", "alias"):
        check.next_run_at = now  # run soon after registration
    if kind == "ttl" and existing is None:
        check.ttl_expires_at = now + timedelta(seconds=check.ttl)
    check.modify_index = change.index
    check.save()
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


def _service_check_specs(service_id: str, spec: dict[str, Any]) -> list[_CheckSpec]:
    checks = []
    if spec.get("Check"):
        checks.append(spec["Check"])
    checks.extend(spec.get("Checks") or [])
    out = []
    for i, c in enumerate(checks, start=1):
        default_id = f"service:{service_id}" if len(checks) == 1 else f"service:{service_id}:{i}"
        out.append(_CheckSpec(c.get("CheckID") or default_id, c))
    return out


def _free_sidecar_port(node: Node, taken: Iterable[int] = ()) -> int:
    used = set(node.services.filter(kind="connect-proxy").values_list("port", flat=True)) | set(
        taken
    )
    for port in SIDECAR_PORT_RANGE:
        if port not in used:
            return port
    raise BadRequest("No free sidecar port in 21000-21255 on this node")


def _sidecar_spec(parent: dict[str, Any], node: Node) -> dict[str, Any]:
    """Expand `Connect.SidecarService` with Consul's defaults."""
    sidecar = dict(parent["Connect"]["SidecarService"])
    parent_id = parent["ID"]
    if sidecar.get("Kind") not in (None, "", "connect-proxy"):
        raise BadRequest("Invalid SidecarService: Kind must be connect-proxy")
    sidecar["Kind"] = "connect-proxy"
    sidecar.setdefault("ID", f"{parent_id}-sidecar-proxy")
    sidecar["ID"] = sidecar["ID"] or f"{parent_id}-sidecar-proxy"
    sidecar["Name"] = sidecar.get("Name") or f"{parent['Name']}-sidecar-proxy"
    if not sidecar.get("Tags") and parent.get("Tags"):
        sidecar["Tags"] = list(parent["Tags"])
    if not sidecar.get("Meta") and parent.get("Meta"):
        sidecar["Meta"] = dict(parent["Meta"])
    existing = node.services.filter(service_id=sidecar["ID"]).first()
    if not sidecar.get("Port"):
        sidecar["Port"] = existing.port if existing else _free_sidecar_port(node)
    proxy = dict(sidecar.get("Proxy") or {})
    proxy["DestinationServiceName"] = parent["Name"]
    proxy["DestinationServiceID"] = parent_id
    proxy.setdefault("LocalServiceAddress", "127.0.0.1")
    if not proxy.get("LocalServicePort"):
        proxy["LocalServicePort"] = parent.get("Port", 0)
    sidecar["Proxy"] = proxy
    if not sidecar.get("Check") and not sidecar.get("Checks"):
        address = sidecar.get("Address") or parent.get("Address") or "127.0.0.1"
        sidecar["Checks"] = [
            {
                "CheckID": f"service:{sidecar['ID']}:1",
                "Name": "Connect Sidecar Listening",
                "TCP": f"{address}:{sidecar['Port']}",
                "Interval": 10.0,
            },
            {
                "CheckID": f"service:{sidecar['ID']}:2",
                "Name": "Connect Sidecar Aliasing " + parent_id,
                "AliasService": parent_id,
                "Status": Check.PASSING,
            },
        ]
    return sidecar


def _validate_service(spec: dict[str, Any]) -> None:
    if not spec.get("Name"):
        raise BadRequest("Missing service name")
    kind = spec.get("Kind") or "typical"
    if kind not in ServiceInstance.KINDS:
        raise BadRequest(f"Invalid service kind: {kind!r}")
    if not 0 <= spec.get("Port", 0) <= 65535:
        raise BadRequest(f"Invalid service port: {spec['Port']}")
    if kind == "connect-proxy":
        proxy = spec.get("Proxy") or {}
        if not proxy.get("DestinationServiceName"):
            raise BadRequest("Proxy.DestinationServiceName must be set for a connect-proxy")
        if not spec.get("Port"):
            raise BadRequest("Port must be set for a connect-proxy")
    if kind == "mesh-gateway" and not spec.get("Port"):
        raise BadRequest("Port must be set for a mesh-gateway")
    weights = spec.get("Weights") or {}
    if weights and weights.get("Passing", 1) < 1:
        raise BadRequest("Passing weight must be greater than 0")


def _save_instance(
    change: Change, node: Node, spec: dict[str, Any], *, agent_local: bool, parent_id: str = ""
) -> ServiceInstance:
    _validate_service(spec)
    service_id = spec.get("ID") or spec["Name"]
    kind = spec.get("Kind") or "typical"
    proxy = spec.get("Proxy") or {}
    svc = ServiceInstance.objects.filter(node=node, service_id=service_id).first()
    before = shapes.agent_service_json(_with_node(svc, node)) if svc is not None else None
    if svc is not None and svc.name != spec["Name"]:
        # Renaming an instance moves it between services: both lists change.
        change.touch(*service_topics(svc))
    svc = svc or ServiceInstance(node=node, service_id=service_id, create_index=change.index)
    svc.name = spec["Name"]
    svc.kind = kind
    svc.tags = spec.get("Tags", [])
    svc.address = spec.get("Address", "")
    svc.port = spec.get("Port", 0)
    svc.meta = spec.get("Meta", {})
    svc.tagged_addresses = spec.get("TaggedAddresses", {})
    svc.weights = spec.get("Weights") or {"Passing": 1, "Warning": 1}
    svc.enable_tag_override = spec.get("EnableTagOverride", False)
    svc.proxy = proxy
    svc.connect = {k: v for k, v in (spec.get("Connect") or {}).items() if k != "SidecarService"}
    svc.namespace = spec.get("Namespace") or "default"
    svc.parent_service_id = parent_id
    svc.destination_name = (
        proxy.get("DestinationServiceName", "") if kind == "connect-proxy" else ""
    )
    svc.agent_local = agent_local
    svc.modify_index = change.index
    svc.save()
    svc.node = node
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
        Check.objects.filter(node=node, service_id=service_id).update(
            service_name=svc.name, service_tags=svc.tags, modify_index=change.index
        )
    return svc


def register_agent_service(
    node: Node, spec: dict[str, Any], *, replace_existing_checks: bool = False
) -> ServiceInstance:
    """`PUT /v1/agent/service/register`: the service, its checks and its sidecar, atomically."""
    spec = dict(spec)
    _validate_service(spec)
    spec["ID"] = spec.get("ID") or spec["Name"]
    with Change() as change:
        svc = _save_instance(change, node, spec, agent_local=True)
        _register_service_checks(change, node, svc, spec, replace_existing_checks)
        sidecar_spec = (spec.get("Connect") or {}).get("SidecarService")
        if sidecar_spec is not None:
            if spec.get("Kind") not in (None, "", "typical"):
                raise BadRequest("A sidecar can only be registered for a typical service")
            sc = _sidecar_spec(spec, node)
            sidecar = _save_instance(change, node, sc, agent_local=True, parent_id=svc.service_id)
            _register_service_checks(change, node, sidecar, sc, replace_existing_checks)
    return svc


def _require_check_type(spec: dict[str, Any]) -> None:
    """Checks registered through the agent API must say how they are run."""
    if not _check_type(spec):
        raise BadRequest("Invalid check: must provide one of HTTP, TCP, GRPC, TTL or AliasService")


def _register_service_checks(
    change: Change, node: Node, svc: ServiceInstance, spec: dict[str, Any], replace: bool
) -> None:
    specs = _service_check_specs(svc.service_id, spec)
    for s in specs:
        _require_check_type(s.fields)
    keep = {s.check_id for s in specs} | {maintenance_check_id(svc.service_id)}
    for s in specs:
        name = s.fields.get("Name") or f"Service '{svc.name}' check"
        _upsert_check(
            change, node, s.fields, check_id=s.check_id, name=name, svc=svc, agent_local=True
        )
    if replace:
        stale = Check.objects.filter(node=node, service_id=svc.service_id).exclude(
            check_id__in=keep
        )
        if stale.exists():
            stale.delete()
            change.touch(*service_topics(svc), topic.CHECKS)


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
    check_id = maintenance_check_id(service_id)
    with Change() as change:
        if enable:
            _upsert_check(
                change,
                node,
                {
                    "Notes": reason
                    or "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
                },
                check_id=check_id,
                name="Service Maintenance Mode",
                svc=svc,
                agent_local=True,
                status=Check.CRITICAL,
            )
            Check.objects.filter(node=node, check_id=check_id).update(
                status=Check.CRITICAL, type="maintenance"
            )
        else:
            if Check.objects.filter(node=node, check_id=check_id).delete()[0]:
                change.touch(*service_topics(svc), topic.CHECKS)


def set_node_maintenance(node: Node, enable: bool, reason: str = "") -> None:
    with Change() as change:
        if enable:
            _upsert_check(
                change,
                node,
                {
                    "Notes": reason
                    or "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
                },
                check_id=NODE_MAINTENANCE_CHECK_ID,
                name="Node Maintenance Mode",
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
    _require_check_type(spec)
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
        _touch_check(change, check)
        change.audit(
            "check.deregister", "check", f"{node.name}/{check_id}", {"Status": check.status}, None
        )
        check.delete()
        from registry.domain.sessions import invalidate_sessions_for_checks

        invalidate_sessions_for_checks(change, node, check_ids=[check_id])


def _touch_check(change: Change, check: Check) -> None:
    change.touch(topic.CHECKS, topic.node(check.node.name))
    if check.service_id:
        svc = ServiceInstance.objects.filter(node=check.node, service_id=check.service_id).first()
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


def apply_check_result(change: Change, check: Check, status: str, output: str | None) -> Check:
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
        _touch_check(change, check)
    check.save()
    if changed and status == Check.CRITICAL:
        from registry.domain.sessions import invalidate_sessions_for_checks

        invalidate_sessions_for_checks(change, check.node, check_ids=[check.check_id])
    return check


# --- permissions --------------------------------------------------------------------------


Need = tuple[str, str]  # (permission, resource), e.g. ("service:write", "web")


def agent_register_needs(node: Node, spec: dict[str, Any]) -> list[Need]:
    """What `register_agent_service(node, spec)` needs from the caller's token.

    Write on the service, on any other service whose ID it re-uses (it would
    replace it), on a proxy's destination and on a named sidecar.
    """
    name = spec.get("Name", "")
    needs: list[Need] = [("service:write", name)]
    replaced = ServiceInstance.objects.filter(node=node, service_id=spec.get("ID") or name).first()
    if replaced is not None and replaced.name != name:
        needs.append(("service:write", replaced.name))
    dest = (spec.get("Proxy") or {}).get("DestinationServiceName")
    if spec.get("Kind") == "connect-proxy" and dest:
        needs.append(("service:write", dest))
    sidecar = (spec.get("Connect") or {}).get("SidecarService")
    if sidecar is not None and sidecar.get("Name"):
        needs.append(("service:write", sidecar["Name"]))
    return needs


def catalog_register_needs(spec: dict[str, Any]) -> list[Need]:
    """What `catalog_register(spec)` needs from the caller's token.

    node:write when the node is created or any of its fields change; write on
    the service (and on a service whose ID it re-uses, and a proxy's
    destination); node:write for node-level checks and write on the service
    a check is attached to.
    """
    node = spec.get("Node", "")
    existing = Node.objects.filter(name=node).first()
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
        return ServiceInstance.objects.filter(node=existing, service_id=service_id).first()

    service = spec.get("Service") or {}
    service_id = ""
    if service:
        name = service.get("Name", "")
        needs.append(("service:write", name))
        service_id = service.get("ID") or name
        replaced = on_node(service_id)
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


def catalog_register(spec: dict[str, Any]) -> None:
    """`PUT /v1/catalog/register`: node, optional service, optional checks, atomically."""
    if not spec.get("Node"):
        raise BadRequest("Must provide node")
    dc_name = spec.get("Datacenter") or settings.MESH_DC
    with Change() as change:
        node = Node.objects.select_related("datacenter").filter(name=spec["Node"]).first()
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
            svc = _save_instance(change, node, service, agent_local=False)
        checks = ([spec["Check"]] if spec.get("Check") else []) + list(spec.get("Checks") or [])
        for c in checks:
            if not c.get("CheckID") and not c.get("Name"):
                raise BadRequest("Missing check ID or name")
            check_svc = svc
            if c.get("ServiceID"):
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


def aggregate_status(statuses: Iterable[str]) -> str:
    worst = Check.PASSING
    for s in statuses:
        if STATUS_ORDER.get(s, 2) > STATUS_ORDER[worst]:
            worst = s if s in STATUS_ORDER else Check.CRITICAL
    return worst


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
