"""`/v1/internal/ui/services`: one summary row per service, in the shape Consul's own UI reads."""

from __future__ import annotations

from typing import Any

from registry import topics as topic
from registry.domain.catalog import checks_for, instances_query
from registry.models import Check
from registry.txn import topic_index


def services_summary(authz, dc: str) -> tuple[int, list[dict[str, Any]]]:
    """Every service in `dc` the caller may read: instances, nodes, tags and check counts
    (each instance's own checks and its node's, as Consul counts them)."""
    index = max(topic_index(topic.SERVICES, topic.CHECKS, topic.NODES), 1)
    instances = [
        s
        for s in instances_query(dc=dc)
        if authz.service_read(s.name) and authz.node_read(s.node.name)
    ]
    checks = checks_for(instances)
    proxied = {
        s.proxy.get("DestinationServiceName")
        for s in instances
        if s.kind == "connect-proxy" and s.proxy
    }
    rows: dict[str, dict[str, Any]] = {}
    for s in instances:
        row = rows.get(s.name)
        if row is None:
            row = rows[s.name] = {
                "Kind": "" if s.kind == "typical" else s.kind,
                "Name": s.name,
                "Datacenter": dc,
                "Tags": [],
                "Nodes": [],
                "InstanceCount": 0,
                "ChecksPassing": 0,
                "ChecksWarning": 0,
                "ChecksCritical": 0,
                "ExternalSources": [],
                "ConnectedWithProxy": s.name in proxied,
                "ConnectedWithGateway": False,
                "GatewayConfig": {},
                "TransparentProxy": False,
                "ConnectNative": bool((s.connect or {}).get("Native")),
                "Namespace": "default",
                "Partition": "default",
            }
        row["InstanceCount"] += 1
        for t in s.tags or []:
            if t not in row["Tags"]:
                row["Tags"].append(t)
        if s.node.name not in row["Nodes"]:
            row["Nodes"].append(s.node.name)
        source = (s.meta or {}).get("external-source")
        if source and source not in row["ExternalSources"]:
            row["ExternalSources"].append(source)
        for c in checks.get(s.pk, []):
            key = {
                Check.PASSING: "ChecksPassing",
                Check.WARNING: "ChecksWarning",
            }.get(c.status, "ChecksCritical")
            row[key] += 1
    return index, [rows[name] for name in sorted(rows)]
