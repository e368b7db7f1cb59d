"""The mesh at a glance (`mesh connect status`, `GET /api/connect/status/`).

Per service that has sidecars: each sidecar (`connect-proxy` instance), its
node and address, its health — the same rule the config stream uses to
decide whether it is a healthy endpoint (`proxycfg.candidate_status`: the
worst of its checks, its node's, and the fronted app's) — and the config
versions the control plane last pushed to its agent and the agent last
acked. Then the CA roots and the number of intentions.

The push/ack half comes from the caller (`registry.grpc.status.proxy_streams()`
in a server process) because it lives in the streams' memory, not in the
database; this function stays a plain read of rows plus that mapping.

ACLs: a caller learns nothing here it could not read elsewhere with its token.
Sidecars are listed when the token may read the service they front and their
node (as `/v1/health/connect/<service>`); intentions are counted when readable
(`intentions.visible`); the answering server's node name needs `node:read` on
it (else `null`); the CA section (trust domain, root IDs) needs
`operator:read`, as the CA configuration does (else `null`). The trust bundle
itself stays public at `/v1/connect/ca/roots`, as in Consul: clients need it to
verify certificates. The datacenter name is public (`/v1/catalog/datacenters`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Protocol

from django.conf import settings

from registry.acl_rules import Authorizer
from registry.domain import connect_ca, intentions, proxycfg


class StreamView(Protocol):
    """What a config stream knows about one proxy (`registry.grpc.status.StreamedProxy`)."""

    sent_version: int
    acked_version: int
    nacked_version: int
    last_error: str
    compiles: int


def _config_state(
    node: str,
    proxy_id: str,
    streams: Mapping[tuple[str, str], StreamView],
    connected: Collection[str],
) -> dict[str, Any]:
    seen = streams.get((node, proxy_id))
    if seen is None:
        return {
            "stream": "connected" if node in connected else "not connected here",
            "pushed_version": 0,
            "acked_version": 0,
            "nacked_version": 0,
            "error": "",
            "in_sync": False,
            "compiles": 0,
        }
    return {
        "stream": "connected",
        "pushed_version": seen.sent_version,
        "acked_version": seen.acked_version,
        "nacked_version": seen.nacked_version,
        "error": seen.last_error if seen.nacked_version > seen.acked_version else "",
        "in_sync": bool(seen.sent_version) and seen.acked_version == seen.sent_version,
        "compiles": seen.compiles,
    }


def _proxies(
    authz: Authorizer,
    streams: Mapping[tuple[str, str], StreamView],
    connected: Collection[str],
    service: str,
) -> dict[str, list[dict[str, Any]]]:
    from registry.models import ServiceInstance

    qs = ServiceInstance.objects.select_related("node__datacenter").filter(
        kind="connect-proxy", node__datacenter__name=settings.MESH_DC
    )
    if service:
        qs = qs.filter(destination_name=service)
    rows = [
        r
        for r in qs.order_by("destination_name", "node__name", "service_id")
        if authz.service_read(r.destination_name or r.name) and authz.node_read(r.node.name)
    ]
    # Candidates: the instances with their checks and their fronted apps' checks.
    candidates = proxycfg._candidates(rows)  # noqa: SLF001 - one home for "a healthy endpoint"
    by_service: dict[str, list[dict[str, Any]]] = {}
    for row, candidate in zip(rows, candidates, strict=True):
        checks = [*candidate.entry.get("Checks", ()), *candidate.destination_checks]
        by_service.setdefault(row.destination_name or row.name, []).append(
            {
                "proxy_id": row.service_id,
                "node": row.node.name,
                "address": row.address or row.node.address,
                "port": row.port,
                "health": proxycfg.candidate_status(candidate),
                "checks": [
                    {
                        "check_id": c.get("CheckID", ""),
                        "status": c.get("Status", ""),
                        "service_id": c.get("ServiceID", ""),
                    }
                    for c in checks
                ],
                "config": _config_state(row.node.name, row.service_id, streams, connected),
            }
        )
    return by_service


def _roots() -> dict[str, Any]:
    _index, data = connect_ca.roots_json()
    return {
        "trust_domain": data["TrustDomain"],
        "active_root_id": data["ActiveRootID"],
        "roots": [
            {
                "id": r["ID"],
                "name": r["Name"],
                "active": r["Active"],
                "not_before": r["NotBefore"],
                "not_after": r["NotAfter"],
                "rotated_out_at": r["RotatedOutAt"],
            }
            for r in data["Roots"]
        ],
    }


def _intention_counts(authz: Authorizer) -> dict[str, int]:
    actions = list(intentions.visible(authz).values_list("action", flat=True))
    return {
        "total": len(actions),
        "allow": actions.count("allow"),
        "deny": actions.count("deny"),
        "l7": sum(1 for a in actions if not a),
    }


def connect_status(
    authz: Authorizer,
    streams: Mapping[tuple[str, str], StreamView],
    connected: Collection[str],
    *,
    service: str = "",
) -> dict[str, Any]:
    """The status document: `services` (each with its `proxies`), `ca`, `intentions`.

    `streams` maps (node, proxy_id) to what the answering process's config
    stream for that proxy pushed and heard; `connected` names the nodes with
    a stream open on it. `service` limits the list to one service.
    """
    proxies = _proxies(authz, streams, connected, service)
    server = settings.MESH_NODE_NAME
    return {
        "datacenter": settings.MESH_DC,
        "server": server if authz.node_read(server) else None,
        "services": [{"service": name, "proxies": rows} for name, rows in sorted(proxies.items())],
        "ca": _roots() if authz.operator_read() else None,
        "intentions": _intention_counts(authz),
    }
