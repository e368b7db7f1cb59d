"""Hot reads in plain SQL, returning light row objects the shape functions accept.

`/v1/health/service/:name` is the most frequent read in a mesh (every
watcher, every DNS-less client); building it through the ORM spends more
time compiling SQL and instantiating models than reading the rows. These
queries are written once here and yield objects with the same attribute
names as the models (`svc.node.datacenter.name`, `check.status`, ...), so
`registry.domain.shapes` stays the one home of Consul's JSON shapes.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from django.db import connection


def _json(value: Any) -> Any:
    # SQLite hands JSON columns back as text, PostgreSQL (jsonb) as objects.
    return json.loads(value) if isinstance(value, str) else value


_INSTANCE_SQL = """
SELECT s.id, s.service_id, s.name, s.kind, s.tags, s.address, s.port, s.meta,
       s.tagged_addresses, s.weights, s.enable_tag_override, s.proxy, s.connect,
       s.namespace, s.destination_name, s.create_index, s.modify_index,
       n.id, n.node_id, n.name, n.address, n.tagged_addresses, n.meta,
       n.create_index, n.modify_index, d.name
FROM registry_serviceinstance s
JOIN registry_node n ON n.id = s.node_id
JOIN registry_datacenter d ON d.id = n.datacenter_id
WHERE {where} AND d.name = %s
ORDER BY n.name, s.service_id
"""

_CHECK_SQL = """
SELECT node_id, service_id, check_id, name, status, notes, output, service_name,
       service_tags, type, definition, interval, timeout, create_index, modify_index
FROM registry_check
WHERE node_id IN ({nodes}) AND (service_id = '' OR service_id IN ({services}))
ORDER BY check_id
"""


def instances(name: str, dc: str, *, connect: bool = False) -> list[SimpleNamespace]:
    """Instances of `name` (or, with `connect`, the proxies for it) in `dc`, with nodes."""
    if connect:  # proxies for the service, and the service itself if Connect-native
        where, params = "(s.destination_name = %s OR s.name = %s)", [name, name, dc]
    else:
        where, params = "s.name = %s", [name, dc]
    with connection.cursor() as cur:
        cur.execute(_INSTANCE_SQL.format(where=where), params)
        rows = cur.fetchall()
    nodes: dict[int, SimpleNamespace] = {}
    out = []
    for r in rows:
        node = nodes.get(r[17])
        if node is None:
            node = nodes[r[17]] = SimpleNamespace(
                pk=r[17], node_id=r[18], name=r[19], address=r[20],
                tagged_addresses=_json(r[21]), meta=_json(r[22]),
                create_index=r[23], modify_index=r[24], datacenter=SimpleNamespace(name=r[25]),
            )  # fmt: skip
        if connect and r[14] != name and not (_json(r[12]) or {}).get("Native"):
            continue
        out.append(
            SimpleNamespace(
                pk=r[0],
                service_id=r[1],
                name=r[2],
                kind=r[3],
                tags=_json(r[4]),
                address=r[5],
                port=r[6],
                meta=_json(r[7]),
                tagged_addresses=_json(r[8]),
                weights=_json(r[9]),
                enable_tag_override=bool(r[10]),
                proxy=_json(r[11]),
                connect=_json(r[12]),
                namespace=r[13],
                destination_name=r[14],
                create_index=r[15],
                modify_index=r[16],
                node=node,
                node_id=node.pk,
            )  # fmt: skip
        )
    return out


def checks(instances: list[SimpleNamespace]) -> dict[int, list[SimpleNamespace]]:
    """Node-level and service checks of each instance (keyed by instance pk), one query."""
    if not instances:
        return {}
    node_ids = sorted({s.node_id for s in instances})
    service_ids = sorted({s.service_id for s in instances})
    sql = _CHECK_SQL.format(
        nodes=", ".join(["%s"] * len(node_ids)), services=", ".join(["%s"] * len(service_ids))
    )
    with connection.cursor() as cur:
        cur.execute(sql, [*node_ids, *service_ids])
        rows = cur.fetchall()
    by_node: dict[int, list[SimpleNamespace]] = {}
    by_service: dict[tuple[int, str], list[SimpleNamespace]] = {}
    for r in rows:
        c = SimpleNamespace(
            node_id=r[0], service_id=r[1], check_id=r[2], name=r[3], status=r[4], notes=r[5],
            output=r[6], service_name=r[7], service_tags=_json(r[8]), type=r[9],
            definition=_json(r[10]), interval=r[11], timeout=r[12],
            create_index=r[13], modify_index=r[14],
        )  # fmt: skip
        if c.service_id:
            by_service.setdefault((c.node_id, c.service_id), []).append(c)
        else:
            by_node.setdefault(c.node_id, []).append(c)
    return {
        s.pk: by_node.get(s.node_id, []) + by_service.get((s.node_id, s.service_id), [])
        for s in instances
    }
