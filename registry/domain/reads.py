"""Catalog and health reads in Consul's shapes, filtered by what the caller may see.

Each returns `(index, data)`; the index is the max over the topics the read
depends on, so a blocking query on it wakes exactly when its answer may change.
"""

from __future__ import annotations

from typing import Any

from registry import topics as topic
from registry.domain import rows, shapes
from registry.domain.catalog import checks_for, instances_query
from registry.errors import NotFound
from registry.models import Check, Node, ServiceInstance
from registry.txn import topic_index


def datacenters(origin: str = "") -> list[str]:
    """Datacenter names nearest first from `origin` (the server's own by default),
    by the estimate in `registry.domain.datacenters` (Consul sorts by round trip)."""
    from django.conf import settings

    from registry.domain.datacenters import by_distance

    return [name for name, _ in by_distance(origin or settings.MESH_DC)]


def check_datacenter(dc: str) -> None:
    """404 unless `dc` exists (plain SQL: every catalog and health read asks)."""
    with rows.cursor() as cur:
        cur.execute("SELECT 1 FROM registry_datacenter WHERE name = %s LIMIT 1", [dc])
        if cur.fetchone() is None:
            raise NotFound(f'No path to datacenter "{dc}"')


def meta_match(meta: dict | None, wanted: dict[str, str] | None) -> bool:
    """Consul's `?node-meta=key:value` filters: every pair must match."""
    if not wanted:
        return True
    meta = meta or {}
    return all(meta.get(k) == v for k, v in wanted.items())


def catalog_nodes(authz, dc: str, node_meta: dict | None = None) -> tuple[int, list[dict]]:
    index = topic_index(topic.NODES)
    nodes = Node.objects.select_related("datacenter").filter(datacenter__name=dc)
    return index, [
        shapes.node_json(n)
        for n in nodes
        if authz.node_read(n.name) and meta_match(n.meta, node_meta)
    ]


def catalog_services(authz, dc: str) -> tuple[int, dict[str, list[str]]]:
    index = topic_index(topic.SERVICES)
    out: dict[str, set[str]] = {}
    rows = ServiceInstance.objects.filter(node__datacenter__name=dc).values_list("name", "tags")
    for name, tags in rows:
        out.setdefault(name, set()).update(tags or [])
    return index, {n: sorted(t) for n, t in sorted(out.items()) if authz.service_read(n)}


def _visible(authz, svc: ServiceInstance) -> bool:
    return authz.service_read(svc.name) and authz.node_read(svc.node.name)


def _tag_match(svc: ServiceInstance, tags: list[str]) -> bool:
    have = set(svc.tags or [])
    return all(t in have for t in tags)


def catalog_service(
    authz,
    name: str,
    dc: str,
    tags: list[str],
    *,
    connect: bool = False,
    node_meta: dict | None = None,
) -> tuple[int, list[dict]]:
    index = topic_index(topic.connect(name) if connect else topic.service(name))
    rows = [
        s
        for s in instances_query(name, connect=connect, dc=dc)
        if _visible(authz, s) and _tag_match(s, tags) and meta_match(s.node.meta, node_meta)
    ]
    return index, [shapes.catalog_service_json(s) for s in rows]


def catalog_node(authz, name: str) -> tuple[int, dict | None]:
    index = topic_index(topic.node(name))
    node = Node.objects.select_related("datacenter").filter(name=name).first()
    if node is None or not authz.node_read(name):
        return index, None
    services = {}
    for s in ServiceInstance.objects.filter(node=node).order_by("service_id"):
        s.node = node
        if authz.service_read(s.name):
            services[s.service_id] = shapes.agent_service_json(s, with_index=True)
    return index, {"Node": shapes.node_json(node), "Services": services}


def catalog_node_services(authz, name: str) -> tuple[int, dict | None]:
    index, data = catalog_node(authz, name)
    if data is None:
        return index, None
    return index, {"Node": data["Node"], "Services": list(data["Services"].values())}


def health_service(
    authz,
    name: str,
    dc: str,
    *,
    tags: list[str] = (),  # type: ignore[assignment]
    passing: bool = False,
    connect: bool = False,
    node_meta: dict | None = None,
    require_dc: bool = False,
) -> tuple[int, list[dict[str, Any]]]:
    """`/v1/health/service/:name`: instances with their node and checks.

    One statement reads the index and the rows (`rows.health`); only an empty
    answer asks apart for the index and, with `require_dc` (the `/v1`
    endpoints), whether `dc` exists (404 if not).
    """
    service_topic = topic.connect(name) if connect else topic.service(name)
    index, instances = rows.health(name, dc, service_topic, connect=connect)
    if index is None:
        if require_dc:
            check_datacenter(dc)
        index = topic_index(service_topic)
    tags = list(tags)
    out = []
    nodes_json: dict[int, dict] = {}
    for s in instances:
        if not (_tag_match(s, tags) and _visible(authz, s) and meta_match(s.node.meta, node_meta)):
            continue
        cs = s.checks
        if passing and any(c.status != Check.PASSING for c in cs):
            continue
        node_json = nodes_json.get(s.node_id)
        if node_json is None:
            node_json = nodes_json[s.node_id] = shapes.node_json(s.node)
        out.append(
            {
                "Node": node_json,
                "Service": shapes.agent_service_json(s, with_index=True),
                "Checks": [shapes.check_json(c, s.node.name) for c in cs],
            }
        )
    return index, out


def health_node(authz, name: str) -> tuple[int, list[dict]]:
    index = topic_index(topic.node(name))
    if not authz.node_read(name):
        return index, []
    rows = Check.objects.filter(node__name=name).order_by("check_id")
    return index, [
        shapes.check_json(c, name)
        for c in rows
        if not c.service_name or authz.service_read(c.service_name)
    ]


def health_checks(authz, name: str, dc: str) -> tuple[int, list[dict]]:
    index = topic_index(topic.service(name))
    rows = Check.objects.select_related("node").filter(service_name=name, node__datacenter__name=dc)
    return index, [
        shapes.check_json(c)
        for c in rows
        if authz.service_read(name) and authz.node_read(c.node.name)
    ]


def health_state(authz, state: str, dc: str) -> tuple[int, list[dict]]:
    index = topic_index(topic.CHECKS)
    rows = Check.objects.select_related("node").filter(node__datacenter__name=dc)
    if state != "any":
        rows = rows.filter(status=state)
    return index, [
        shapes.check_json(c)
        for c in rows.order_by("node__name", "check_id")
        if authz.node_read(c.node.name)
        and (not c.service_name or authz.service_read(c.service_name))
    ]


def agent_services(authz, node: Node) -> tuple[int, dict[str, dict]]:
    index = topic_index(topic.node(node.name))
    out = {}
    for s in ServiceInstance.objects.filter(node=node).order_by("service_id"):
        s.node = node
        if authz.service_read(s.name):
            out[s.service_id] = shapes.agent_service_json(s)
    return index, out


def agent_checks(authz, node: Node) -> tuple[int, dict[str, dict]]:
    """The agent's checks the token may see, as Consul filters them: a service's
    check needs `service:read` on the service, a node-level one (`serfHealth`)
    `node:read` on the node (as `/v1/health/node/<node>`)."""
    index = topic_index(topic.node(node.name))
    node_readable = authz.node_read(node.name)
    out = {}
    for c in Check.objects.filter(node=node).order_by("check_id"):
        if c.service_id or c.service_name:
            allowed = authz.service_read(c.service_name or c.service_id)
        else:
            allowed = node_readable
        if allowed:
            out[c.check_id] = shapes.check_json(c, node.name)
    return index, out


def agent_service(authz, node: Node, service_id: str) -> tuple[int, dict]:
    index = topic_index(topic.node(node.name))
    svc = ServiceInstance.objects.filter(node=node, service_id=service_id).first()
    if svc is None or not authz.service_read(svc.name):
        err = NotFound(f"unknown service ID: {service_id}")
        err.index = index  # type: ignore[attr-defined]
        raise err
    svc.node = node
    data = shapes.agent_service_json(svc)
    data["ContentHash"] = format(svc.modify_index, "016x")
    return index, data


def agent_health_by_id(node: Node, service_id: str) -> tuple[str, dict] | None:
    svc = ServiceInstance.objects.filter(node=node, service_id=service_id).first()
    if svc is None:
        return None
    svc.node = node
    checks = checks_for([svc])[svc.pk]
    status = aggregate(c.status for c in checks)
    return status, {
        "AggregatedStatus": status,
        "Service": shapes.agent_service_json(svc),
        "Checks": [shapes.check_json(c, node.name) for c in checks],
    }


def aggregate(statuses) -> str:
    from registry.domain.catalog import aggregate_status

    return aggregate_status(statuses)
