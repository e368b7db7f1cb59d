"""Registry rows in Consul's JSON shapes (field names exactly as Consul's).

The shapes themselves are `meshproto.registration.shapes` (the agent serves
the same); here rows are handed to them. Pure functions of model rows; `/v1` returns them as they are and `?filter=`
runs over them, so a selector like `Service.Meta.version` means what it means
in Consul.
"""

from __future__ import annotations

from typing import Any

from meshproto.registration import shapes as consul
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
        "Meta": dict(node.meta or {}),
        "CreateIndex": node.create_index,
        "ModifyIndex": node.modify_index,
    }


def agent_service_json(svc: ServiceInstance, *, with_index: bool = False) -> dict[str, Any]:
    """A service as `/v1/agent/services` and `/v1/health/service` show it."""
    out = consul.agent_service(
        service_id=svc.service_id,
        name=svc.name,
        kind=svc.kind,
        tags=svc.tags or (),
        address=svc.address,
        port=svc.port,
        meta=svc.meta,
        tagged_addresses=svc.tagged_addresses,
        service_weights=svc.weights,
        enable_tag_override=svc.enable_tag_override,
        service_proxy=svc.proxy,
        connect=svc.connect,
        datacenter=svc.node.datacenter.name,
        namespace=svc.namespace,
    )
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
        "ServiceWeights": consul.weights(svc.weights),
        "ServiceMeta": svc.meta or {},
        "ServicePort": svc.port,
        "ServiceEnableTagOverride": svc.enable_tag_override,
        "ServiceProxy": consul.proxy(svc.kind, svc.proxy),
        "ServiceConnect": svc.connect or {},
        "Namespace": svc.namespace,
        "CreateIndex": svc.create_index,
        "ModifyIndex": svc.modify_index,
    }


def check_json(check: Check, node_name: str | None = None) -> dict[str, Any]:
    """A check as `/v1/agent/checks`, `/v1/health/...` and `/v1/catalog/...` show it."""
    return consul.check(
        node=node_name if node_name is not None else check.node.name,
        check_id=check.check_id,
        name=check.name,
        status=check.status,
        notes=check.notes,
        output=check.output,
        service_id=check.service_id,
        service_name=check.service_name,
        service_tags=check.service_tags or (),
        check_type=check.type,
        definition=check.definition,
        create_index=check.create_index,
        modify_index=check.modify_index,
    )
