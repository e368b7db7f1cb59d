"""A compiled discovery chain laid out for drawing: router -> splitters -> resolvers -> targets.

Presentation only (the chain itself is compiled by `meshproto.discovery_chain`):
the nodes in columns by type, each with its outgoing edges and their labels.
"""

from __future__ import annotations

from typing import Any

COLUMNS = ("router", "splitter", "resolver", "target")


def _route_label(route: dict[str, Any]) -> str:
    http = ((route.get("Definition") or {}).get("Match") or {}).get("HTTP") or {}
    parts = []
    for key in ("PathExact", "PathPrefix", "PathRegex"):
        if http.get(key):
            parts.append(f"{key.removeprefix('Path').lower()} {http[key]}")
    if http.get("Methods"):
        parts.append(" ".join(http["Methods"]))
    for header in http.get("Header") or []:
        parts.append(f"header {header.get('Name', '')}")
    return ", ".join(parts) or "default"


def layout(chain: dict[str, Any]) -> dict[str, Any]:
    """{"columns": [(type, [node, ...]), ...], "protocol", "start"}; each node has
    `key`, `label` and `edges` [(label, next key)]."""
    columns: dict[str, list[dict[str, Any]]] = {c: [] for c in COLUMNS}
    for key, node in sorted((chain.get("Nodes") or {}).items()):
        kind = node.get("Type", "")
        edges: list[tuple[str, str]] = []
        if kind == "router":
            edges = [(_route_label(r), r.get("NextNode", "")) for r in node.get("Routes", [])]
        elif kind == "splitter":
            edges = [(f"{s.get('Weight', 0):g}%", s.get("NextNode", "")) for s in node["Splits"]]
        elif kind == "resolver":
            resolver = node.get("Resolver") or {}
            edges = [("", "target:" + resolver.get("Target", ""))]
            for tid in (resolver.get("Failover") or {}).get("Targets", []):
                edges.append(("failover", "target:" + tid))
        columns.setdefault(kind, []).append(
            {"key": key, "label": node.get("Name", key), "edges": edges}
        )
    for tid in sorted(chain.get("Targets") or {}):
        columns["target"].append({"key": "target:" + tid, "label": tid, "edges": []})
    return {
        "columns": [(c, columns[c]) for c in COLUMNS if columns[c]],
        "protocol": chain.get("Protocol", ""),
        "start": chain.get("StartNode", ""),
    }
