"""Consul's registration rules, as pure functions of decoded definitions.

The one home of what a registration means, for the control plane
(`registry.domain.catalog`, `registry.domain.node_sync`) and the agent
(`agents.state`) alike:

- which definitions are refused, and with which message (`validate_service`,
  `check_kind`, `check_status`);
- how inline checks get their IDs: `service:<id>`, or `service:<id>:<n>`
  when a service declares several (`service_checks`);
- how `Connect.SidecarService` expands: `<id>-sidecar-proxy`, a port from
  21000-21255, the proxy pointed at its service, a TCP and an alias check
  (`sidecar_id`, `free_sidecar_port`, `expand_sidecar`);
- maintenance mode as a critical `_service_maintenance:<id>` or
  `_node_maintenance` check (`maintenance_check`).

Input is what `meshproto.registration.decode` returns (Consul's field names,
durations as Go strings). Errors are `RuleError`; adapters map it (a 400).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)
STATUS_ORDER = {PASSING: 0, WARNING: 1, CRITICAL: 2}
SIDECAR_PORT_RANGE = range(21000, 21256)
SERVICE_KINDS = (
    "typical",
    "connect-proxy",
    "mesh-gateway",
    "terminating-gateway",
    "ingress-gateway",
)
CHECK_KINDS = ("http", "tcp", "grpc", "ttl", "alias")
MAINTENANCE_PREFIX = "_service_maintenance:"
NODE_MAINTENANCE_CHECK_ID = "_node_maintenance"
# The fields of a check that are not part of how it runs (its `Definition`).
CHECK_META_FIELDS = ("CheckID", "Name", "Notes", "Status", "ServiceID", "Node", "Output", "Type")
MAX_OUTPUT = 4096  # bytes of a check's output kept, as Consul's agent keeps


class RuleError(ValueError):
    """A registration Consul would refuse; `str()` is the message an API answers with."""


# --- checks ------------------------------------------------------------------------------


def check_kind(spec: Mapping[str, Any]) -> str:
    """How a check runs (http, tcp, grpc, ttl, alias), or "" when the definition says
    nothing about it. Raises RuleError for a check that cannot run as given."""
    kinds = [
        k
        for k, present in (
            ("http", spec.get("HTTP")),
            ("tcp", spec.get("TCP")),
            ("grpc", spec.get("GRPC")),
            ("ttl", spec.get("TTL") not in (None, "", "0s", 0)),
            ("alias", spec.get("AliasService") or spec.get("AliasNode")),
            ("script", spec.get("ScriptArgs")),
        )
        if present
    ]
    if len(kinds) > 1:
        raise RuleError(
            f"Invalid check: only one of HTTP, TCP, GRPC, TTL, alias may be set (got {', '.join(kinds)})"
        )
    if not kinds:
        return ""
    kind = kinds[0]
    if kind == "script":
        raise RuleError(
            "Invalid check: script checks are not supported (use HTTP, TCP, GRPC or TTL)"
        )
    if kind in ("http", "tcp", "grpc") and spec.get("Interval") in (None, "", "0s", 0):
        raise RuleError(f"Invalid check: {kind.upper()} checks must have an Interval")
    if kind == "http" and not str(spec["HTTP"]).startswith(("http://", "https://")):
        raise RuleError(
            f"Invalid check: HTTP must be an http:// or https:// URL, got {spec['HTTP']!r}"
        )
    if kind == "tcp" and ":" not in spec["TCP"]:
        raise RuleError(f"Invalid check: TCP must be host:port, got {spec['TCP']!r}")
    return kind


def require_check_kind(spec: Mapping[str, Any]) -> str:
    """`check_kind`, for checks that must say how they run (the agent API's, inline ones)."""
    kind = check_kind(spec)
    if not kind:
        raise RuleError("Invalid check: must provide one of HTTP, TCP, GRPC, TTL or AliasService")
    return kind


def check_status(status: str | None) -> str:
    """A check's initial status: as given if valid, else critical (Consul's default)."""
    if status and status not in STATUS_ORDER:
        raise RuleError(f"Invalid check status: {status!r} (use passing, warning or critical)")
    return status or CRITICAL


def truncate_output(output: str) -> str:
    """A check's output as stored: at most MAX_OUTPUT characters, saying how much was cut."""
    if len(output) <= MAX_OUTPUT:
        return output
    return output[:MAX_OUTPUT] + f" ... (captured {MAX_OUTPUT} of {len(output)} bytes)"


def check_definition(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a check spec that says how it runs (what is stored as its definition)."""
    return {k: v for k, v in spec.items() if k not in CHECK_META_FIELDS}


def aggregate_status(statuses: Iterable[str]) -> str:
    """The worst of `statuses` (an unknown one counts as critical)."""
    worst = PASSING
    for s in statuses:
        if STATUS_ORDER.get(s, 2) > STATUS_ORDER[worst]:
            worst = s if s in STATUS_ORDER else CRITICAL
    return worst


@dataclass(frozen=True)
class InlineCheck:
    """A check declared inside a service definition, with the ID Consul gives it."""

    check_id: str
    name: str
    spec: dict[str, Any]


def inline_checks(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A definition's `Check` and `Checks`, in Consul's order (numbered together)."""
    return ([spec["Check"]] if spec.get("Check") else []) + list(spec.get("Checks") or [])


def service_checks(
    service_id: str, service_name: str, spec: Mapping[str, Any]
) -> list[InlineCheck]:
    """The inline checks of a service, with their IDs and names; each must say how it runs."""
    checks = inline_checks(spec)
    out = []
    for i, c in enumerate(checks, start=1):
        require_check_kind(c)
        default_id = f"service:{service_id}" if len(checks) == 1 else f"service:{service_id}:{i}"
        name = c.get("Name") or f"Service '{service_name}' check"
        out.append(InlineCheck(c.get("CheckID") or default_id, name, dict(c)))
    return out


# --- services ----------------------------------------------------------------------------


def validate_service(spec: Mapping[str, Any]) -> None:
    """Refuse a service definition Consul would refuse (its checks included)."""
    if not spec.get("Name"):
        raise RuleError("Missing service name")
    kind = spec.get("Kind") or "typical"
    if kind not in SERVICE_KINDS:
        raise RuleError(f"Invalid service kind: {kind!r}")
    if not 0 <= spec.get("Port", 0) <= 65535:
        raise RuleError(f"Invalid service port: {spec['Port']}")
    if kind == "connect-proxy":
        proxy = spec.get("Proxy") or {}
        if not proxy.get("DestinationServiceName"):
            raise RuleError("Proxy.DestinationServiceName must be set for a connect-proxy")
        if not spec.get("Port"):
            raise RuleError("Port must be set for a connect-proxy")
    if kind == "mesh-gateway" and not spec.get("Port"):
        raise RuleError("Port must be set for a mesh-gateway")
    weights = spec.get("Weights") or {}
    if weights and weights.get("Passing", 1) < 1:
        raise RuleError("Passing weight must be greater than 0")
    for c in inline_checks(spec):
        require_check_kind(c)
        check_status(c.get("Status"))
    sidecar = (spec.get("Connect") or {}).get("SidecarService")
    if sidecar is not None:
        if kind != "typical":
            raise RuleError("A sidecar can only be registered for a typical service")
        if sidecar.get("Kind") not in (None, "", "connect-proxy"):
            raise RuleError("Invalid SidecarService: Kind must be connect-proxy")
        for i, up in enumerate((sidecar.get("Proxy") or {}).get("Upstreams") or []):
            where = f"Connect.SidecarService.Proxy.Upstreams[{i}]"
            if not up.get("DestinationName"):
                raise RuleError(f"{where}: missing DestinationName")
            if not up.get("LocalBindPort") and not up.get("LocalBindSocketPath"):
                raise RuleError(f"{where}: missing LocalBindPort")


def service_id(spec: Mapping[str, Any]) -> str:
    """A service's ID: its `ID`, else its name."""
    return spec.get("ID") or spec["Name"]


def sidecar_id(parent: Mapping[str, Any]) -> str | None:
    """The ID of the sidecar a definition declares (`<id>-sidecar-proxy`), or None."""
    sidecar = (parent.get("Connect") or {}).get("SidecarService")
    if sidecar is None:
        return None
    return sidecar.get("ID") or f"{parent.get('ID') or parent.get('Name')}-sidecar-proxy"


def free_sidecar_port(used: Iterable[int]) -> int:
    """The first port of 21000-21255 not in `used`."""
    taken = set(used)
    for port in SIDECAR_PORT_RANGE:
        if port not in taken:
            return port
    raise RuleError("No free sidecar port in 21000-21255 on this node")


def expand_sidecar(parent: Mapping[str, Any], port: int) -> dict[str, Any]:
    """`Connect.SidecarService` of a validated definition as Consul's agent registers it.

    `port` is used when the sidecar names none (the caller keeps a sidecar's
    port across registrations and picks free ones with `free_sidecar_port`).
    """
    sidecar = copy.deepcopy(dict(parent["Connect"]["SidecarService"]))
    parent_id = service_id(parent)
    sidecar["Kind"] = "connect-proxy"
    sidecar["ID"] = sidecar.get("ID") or f"{parent_id}-sidecar-proxy"
    sidecar["Name"] = sidecar.get("Name") or f"{parent['Name']}-sidecar-proxy"
    if not sidecar.get("Tags") and parent.get("Tags"):
        sidecar["Tags"] = list(parent["Tags"])
    if not sidecar.get("Meta") and parent.get("Meta"):
        sidecar["Meta"] = dict(parent["Meta"])
    if not sidecar.get("Port"):
        sidecar["Port"] = port
    proxy = dict(sidecar.get("Proxy") or {})
    proxy["DestinationServiceName"] = parent["Name"]
    proxy["DestinationServiceID"] = parent_id
    proxy.setdefault("LocalServiceAddress", "127.0.0.1")
    if not proxy.get("LocalServicePort"):
        proxy["LocalServicePort"] = parent.get("Port", 0)
    if proxy.get("Upstreams"):
        proxy["Upstreams"] = [
            {"DestinationType": "service", "LocalBindAddress": "127.0.0.1", **u}
            for u in proxy["Upstreams"]
        ]
    sidecar["Proxy"] = proxy
    if not inline_checks(sidecar):
        address = sidecar.get("Address") or parent.get("Address") or "127.0.0.1"
        sidecar["Checks"] = [
            {
                "CheckID": f"service:{sidecar['ID']}:1",
                "Name": "Connect Sidecar Listening",
                "TCP": f"{address}:{sidecar['Port']}",
                "Interval": "10s",
            },
            {
                "CheckID": f"service:{sidecar['ID']}:2",
                "Name": "Connect Sidecar Aliasing " + parent_id,
                "AliasService": parent_id,
            },
        ]
    return sidecar


# --- maintenance -------------------------------------------------------------------------


def maintenance_check_id(service_id: str) -> str:
    """`_service_maintenance:<id>`, or `_node_maintenance` for the node ("")."""
    return MAINTENANCE_PREFIX + service_id if service_id else NODE_MAINTENANCE_CHECK_ID


def is_maintenance(check_id: str) -> bool:
    return check_id == NODE_MAINTENANCE_CHECK_ID or check_id.startswith(MAINTENANCE_PREFIX)


def maintenance_check(service_id: str, reason: str = "") -> dict[str, Any]:
    """The critical check that puts a service (or, with "", the node) in maintenance."""
    what = "service" if service_id else "node"
    return {
        "CheckID": maintenance_check_id(service_id),
        "Name": "Service Maintenance Mode" if service_id else "Node Maintenance Mode",
        "Notes": reason
        or f"Maintenance mode is enabled for this {what}, but no reason was provided. This is a default message.",
        "Status": CRITICAL,
        "ServiceID": service_id,
    }
