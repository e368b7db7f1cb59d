"""Registry rows in Consul's JSON shapes (field names exactly as Consul's).

Pure functions of model rows; `/v1` returns them as they are and `?filter=`
runs over them, so a selector like `Service.Meta.version` means what it means
in Consul.
"""

from __future__ import annotations

from typing import Any

from registry.decode import format_duration
from registry.models import Check, Node, ServiceInstance


def node_json(node: Node) -> dict[str, Any]:
    tagged = {
        "lan": node.address,
        "lan_ipv4": node.address,
        "wan": node.address,
        "wan_ipv4": node.address,
    }
    tagged.update(node.tagged_addresses or {})
    return {
        "ID": node.node_id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter.name,
        "TaggedAddresses": tagged,
        "Meta": node.meta or {},
        "CreateIndex": node.create_index,
        "ModifyIndex": node.modify_index,
    }


def _weights(svc: ServiceInstance) -> dict[str, int]:
    w = svc.weights or {}
    return {"Passing": w.get("Passing", 1), "Warning": w.get("Warning", 1)}


def _proxy(svc: ServiceInstance) -> dict[str, Any]:
    p = dict(svc.proxy or {})
    if svc.kind in ("connect-proxy", "mesh-gateway") or p:
        p.setdefault("MeshGateway", {})
        p.setdefault("Expose", {})
        if svc.kind == "connect-proxy":
            p.setdefault("Upstreams", [])
    return p


def agent_service_json(svc: ServiceInstance, *, with_index: bool = False) -> dict[str, Any]:
    """A service as `/v1/agent/services` and `/v1/health/service` show it."""
    out: dict[str, Any] = {
        "ID": svc.service_id,
        "Service": svc.name,
        "Tags": svc.tags or [],
        "Address": svc.address,
        "TaggedAddresses": svc.tagged_addresses or {},
        "Meta": svc.meta or {},
        "Port": svc.port,
        "Weights": _weights(svc),
        "EnableTagOverride": svc.enable_tag_override,
        "Datacenter": svc.node.datacenter.name,
        "Namespace": svc.namespace,
    }
    if svc.kind != "typical":
        out["Kind"] = svc.kind
    proxy = _proxy(svc)
    if proxy:
        out["Proxy"] = proxy
    if svc.connect:
        out["Connect"] = svc.connect
    if with_index:
        out["CreateIndex"] = svc.create_index
        out["ModifyIndex"] = svc.modify_index
    return out


def catalog_service_json(svc: ServiceInstance) -> dict[str, Any]:
    """A service instance as `/v1/catalog/service/:name` shows it."""
    node = svc.node
    return {
        "ID": node.node_id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter.name,
        "TaggedAddresses": node_json(node)["TaggedAddresses"],
        "NodeMeta": node.meta or {},
        "ServiceKind": "" if svc.kind == "typical" else svc.kind,
        "ServiceID": svc.service_id,
        "ServiceName": svc.name,
        "ServiceTags": svc.tags or [],
        "ServiceAddress": svc.address,
        "ServiceTaggedAddresses": svc.tagged_addresses or {},
        "ServiceWeights": _weights(svc),
        "ServiceMeta": svc.meta or {},
        "ServicePort": svc.port,
        "ServiceEnableTagOverride": svc.enable_tag_override,
        "ServiceProxy": _proxy(svc),
        "ServiceConnect": svc.connect or {},
        "Namespace": svc.namespace,
        "CreateIndex": svc.create_index,
        "ModifyIndex": svc.modify_index,
    }


def check_json(check: Check, node_name: str | None = None) -> dict[str, Any]:
    d = check.definition or {}
    definition: dict[str, Any] = {}
    for key in (
        "HTTP",
        "Method",
        "Header",
        "Body",
        "TCP",
        "GRPC",
        "GRPCUseTLS",
        "TLSServerName",
        "TLSSkipVerify",
    ):
        if d.get(key):
            definition[key] = d[key]
    for key in ("Interval", "Timeout", "TTL", "DeregisterCriticalServiceAfter"):
        if d.get(key):
            definition[key] = format_duration(d[key])
    return {
        "Node": node_name if node_name is not None else check.node.name,
        "CheckID": check.check_id,
        "Name": check.name,
        "Status": check.status,
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": check.service_id,
        "ServiceName": check.service_name,
        "ServiceTags": check.service_tags or [],
        "Type": check.type,
        "Interval": format_duration(check.interval) if check.interval else "",
        "Timeout": format_duration(check.timeout) if check.timeout else "",
        "ExposedPort": 0,
        "Definition": definition,
        "Namespace": "default",
        "CreateIndex": check.create_index,
        "ModifyIndex": check.modify_index,
    }
