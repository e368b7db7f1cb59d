"""Services and checks in Consul's JSON shapes, as `/v1/agent/...`, `/v1/health/...`
and `/v1/catalog/...` show them (field names exactly as Consul's).

Pure functions of plain values: the control plane calls them with its rows
(`registry.domain.shapes`), the agent with its local state
(`agents.http_api`), so a service looks the same whichever of them answers.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from meshproto import durations

# What a check's `Definition` shows (the rest of its definition is not echoed back).
SHOWN_DEFINITION = (
    "HTTP",
    "Method",
    "Header",
    "Body",
    "TCP",
    "GRPC",
    "GRPCUseTLS",
    "TLSServerName",
    "TLSSkipVerify",
)
SHOWN_DURATIONS = ("Interval", "Timeout", "TTL", "DeregisterCriticalServiceAfter")
VERSION = "1.17.0"  # the Consul version the API speaks (what clients check features by)


def weights(value: Mapping[str, Any] | None) -> dict[str, int]:
    w = value or {}
    return {"Passing": w.get("Passing", 1), "Warning": w.get("Warning", 1)}


def proxy(kind: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    """A service's `Proxy` with the empty members Consul always shows for proxies."""
    p = dict(value or {})
    if kind in ("connect-proxy", "mesh-gateway") or p:
        p.setdefault("MeshGateway", {})
        p.setdefault("Expose", {})
        if kind == "connect-proxy":
            p.setdefault("Upstreams", [])
    return p


def agent_service(
    *,
    service_id: str,
    name: str,
    kind: str = "",
    tags: Sequence[str] = (),
    address: str = "",
    port: int = 0,
    meta: Mapping[str, str] | None = None,
    tagged_addresses: Mapping[str, Any] | None = None,
    service_weights: Mapping[str, Any] | None = None,
    enable_tag_override: bool = False,
    service_proxy: Mapping[str, Any] | None = None,
    connect: Mapping[str, Any] | None = None,
    datacenter: str,
    namespace: str = "",
) -> dict[str, Any]:
    """A service as `/v1/agent/services` and `/v1/health/service` show it."""
    kind = kind or "typical"
    out: dict[str, Any] = {
        "ID": service_id,
        "Service": name,
        "Tags": list(tags or []),
        "Address": address or "",
        "TaggedAddresses": dict(tagged_addresses or {}),
        "Meta": dict(meta or {}),
        "Port": int(port or 0),
        "Weights": weights(service_weights),
        "EnableTagOverride": bool(enable_tag_override),
        "Datacenter": datacenter,
        "Namespace": namespace or "default",
    }
    if kind != "typical":
        out["Kind"] = kind
    p = proxy(kind, service_proxy)
    if p:
        out["Proxy"] = p
    if connect:
        out["Connect"] = dict(connect)
    return out


def agent_service_from_definition(definition: Mapping[str, Any], datacenter: str) -> dict[str, Any]:
    """`agent_service` of a decoded definition (ID set, sidecar expanded apart)."""
    connect = {k: v for k, v in (definition.get("Connect") or {}).items() if k != "SidecarService"}
    return agent_service(
        service_id=definition["ID"],
        name=definition["Name"],
        kind=definition.get("Kind") or "",
        tags=definition.get("Tags") or (),
        address=definition.get("Address") or "",
        port=definition.get("Port") or 0,
        meta=definition.get("Meta"),
        tagged_addresses=definition.get("TaggedAddresses"),
        service_weights=definition.get("Weights"),
        enable_tag_override=definition.get("EnableTagOverride", False),
        service_proxy=definition.get("Proxy"),
        connect=connect,
        datacenter=datacenter,
        namespace=definition.get("Namespace") or "",
    )


def _go(value: Any) -> str:
    # Rows stored before durations were kept as Go strings hold seconds.
    if not value:
        return ""
    try:
        return _go_cached(value)
    except TypeError:  # unhashable: not a duration a definition holds, computed as is
        return _go_text(value)


def _go_text(value: Any) -> str:
    secs = durations.seconds(value) if value else 0.0
    return durations.format_duration(secs) if secs else ""


# A check's durations repeat across every check of a catalog ("10s", "30s"):
# every health read shows them, so each distinct one is formatted once.
_go_cached = functools.lru_cache(maxsize=1024, typed=True)(_go_text)


def check(
    *,
    node: str,
    check_id: str,
    name: str,
    status: str,
    notes: str = "",
    output: str = "",
    service_id: str = "",
    service_name: str = "",
    service_tags: Sequence[str] = (),
    check_type: str = "",
    definition: Mapping[str, Any] | None = None,
    create_index: int = 0,
    modify_index: int = 0,
) -> dict[str, Any]:
    """A check as `/v1/agent/checks`, `/v1/health/...` and `/v1/catalog/...` show it."""
    d = definition or {}
    shown: dict[str, Any] = {}
    interval = timeout = ""
    if d:
        shown = {k: d[k] for k in SHOWN_DEFINITION if d.get(k)}
        for k in SHOWN_DURATIONS:
            go = _go(d.get(k))
            if go:
                shown[k] = go
        interval, timeout = _go(d.get("Interval")), _go(d.get("Timeout"))
    return {
        "Node": node,
        "CheckID": check_id,
        "Name": name,
        "Status": status,
        "Notes": notes,
        "Output": output,
        "ServiceID": service_id,
        "ServiceName": service_name,
        "ServiceTags": list(service_tags or []),
        "Type": check_type,
        "Interval": interval,
        "Timeout": timeout,
        "ExposedPort": 0,
        "Definition": shown,
        "Namespace": "default",
        "CreateIndex": create_index,
        "ModifyIndex": modify_index,
    }


def member(*, name: str, addr: str, port: int, role: str, datacenter: str, node_id: str) -> dict:
    """An agent as `/v1/agent/members` and `/v1/agent/self` show it (`role`: consul or node)."""
    return {
        "Name": name,
        "Addr": addr,
        "Port": port,
        "Tags": {"role": role, "dc": datacenter, "build": f"{VERSION}:meshweb", "id": node_id},
        "Status": 1,
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }
