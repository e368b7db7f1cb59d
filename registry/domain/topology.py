"""The service graph the topology page draws: services, and the calls between them
that are declared (a sidecar's upstreams) or named by an intention, each decided
by the same `IntentionIndex` the sidecars enforce (allowed, denied, or L7).

Restricted to what the caller's token may read; `focus` keeps the services
whose names contain it and their direct neighbours, so a 200-service mesh can
be read a part at a time.
"""

from __future__ import annotations

from typing import Any

from registry.acl_rules import Authorizer
from registry.domain import intentions, inventory
from registry.models import Intention, ServiceInstance

WILDCARD = "*"


def graph(authz: Authorizer, focus: str = "") -> dict[str, Any]:
    """{"nodes": [{"id", "health"}], "edges": [{"source", "destination", "declared",
    "decision": "allow"|"deny"|"l7", "intention_id", "default"}]}."""
    qs = inventory.visible_instances(authz, ServiceInstance.objects.exclude(kind="connect-proxy"))
    health = inventory.worst_status_by_name(qs)
    names = set(health)
    pairs = {(a, b): True for a, b in inventory.service_edges(authz) if a in names and b in names}
    for src, dst in (
        Intention.objects.exclude(source_name=WILDCARD)
        .exclude(destination_name=WILDCARD)
        .values_list("source_name", "destination_name")
    ):
        if src in names and dst in names and authz.intention_read(dst):
            pairs.setdefault((src, dst), False)
    if focus:
        hit = {n for n in names if focus.lower() in n.lower()}
        pairs = {p: d for p, d in pairs.items() if p[0] in hit or p[1] in hit}
        names = hit | {n for p in pairs for n in p}
    index = intentions.decision_index.get()
    edges = []
    for (src, dst), declared in sorted(pairs.items()):
        d = index.decide(src, dst)
        kind = "l7" if d.has_l7 else ("allow" if d.allowed else "deny")
        edges.append(
            {
                "source": src,
                "destination": dst,
                "declared": declared,
                "decision": kind,
                "intention_id": d.intention_id or "",
                "default": d.default,
            }
        )
    return {
        "nodes": [{"id": n, "health": health[n]} for n in sorted(names)],
        "edges": edges,
    }
