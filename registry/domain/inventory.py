"""Catalog reads for the product API and the UI: ACL-restricted querysets and
per-service summaries.

`/v1` reads (reads.py) answer in Consul's shapes; these answer with rows and
plain dataclasses, so DRF can paginate, filter and order in the database. The
visibility rule is the same as reads.py's: an instance is visible with
`service:read` on its name and `node:read` on its node; a check with
`node:read` on its node and, for a service check, `service:read` on its service.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from django.db.models import QuerySet

from registry.acl_rules import Authorizer
from registry.domain import catalog
from registry.domain.catalog import aggregate_status, checks_for
from registry.errors import NotFound
from registry.models import Check, KVEntry, Node, ServiceInstance

HEALTH_STATES = (Check.PASSING, Check.WARNING, Check.CRITICAL)


def sees_everything(authz: Authorizer) -> bool:
    """True when no read can be refused, so querysets need no restriction."""
    return authz.is_management() or authz is Authorizer.allow_all()


def _allowed(qs: QuerySet, field_name: str, check) -> list[str]:
    names = set(qs.order_by().values_list(field_name, flat=True).distinct())
    return [n for n in names if check(n)]


def visible_nodes(authz: Authorizer, qs: QuerySet[Node]) -> QuerySet[Node]:
    if sees_everything(authz):
        return qs
    return qs.filter(name__in=_allowed(qs, "name", authz.node_read))


def visible_instances(
    authz: Authorizer, qs: QuerySet[ServiceInstance]
) -> QuerySet[ServiceInstance]:
    if sees_everything(authz):
        return qs
    # Distinct service and node names are few next to instances: ask per name.
    return qs.filter(
        name__in=_allowed(qs, "name", authz.service_read),
        node__name__in=_allowed(qs, "node__name", authz.node_read),
    )


def visible_checks(authz: Authorizer, qs: QuerySet[Check]) -> QuerySet[Check]:
    if sees_everything(authz):
        return qs
    services = [""] + _allowed(qs.exclude(service_name=""), "service_name", authz.service_read)
    return qs.filter(
        service_name__in=services, node__name__in=_allowed(qs, "node__name", authz.node_read)
    )


def visible_keys(authz: Authorizer, qs: QuerySet[KVEntry]) -> QuerySet[KVEntry]:
    """Entries the caller may read (`key:read` per key)."""
    if sees_everything(authz):
        return qs
    ids = [pk for pk, key in qs.order_by().values_list("pk", "key") if authz.key_read(key)]
    return qs.filter(pk__in=ids)


# --- health ---------------------------------------------------------------------------


def instance_checks(instances: list[ServiceInstance]) -> dict[int, list[Check]]:
    """Each instance's checks: its node's checks and its own (as Consul's health reads)."""
    return checks_for(instances)


def instance_status(checks: list[Check]) -> str:
    """An instance's health: the worst of its checks (passing with none)."""
    return aggregate_status(c.status for c in checks)


@dataclass
class ServiceSummary:
    """One service name across the catalog, as the service list shows it."""

    name: str
    instance_count: int = 0
    tags: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    datacenters: list[str] = field(default_factory=list)
    # Instances by their aggregated status, and checks by status.
    health: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HEALTH_STATES, 0))
    checks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HEALTH_STATES, 0))
    modify_index: int = 0


def summarize_services(instances: QuerySet[ServiceInstance]) -> list[ServiceSummary]:
    """Aggregate (already filtered and ACL-restricted) instances per service name."""
    rows = list(instances.select_related("node__datacenter").order_by("name", "node__name"))
    checks = checks_for(rows)
    out: dict[str, ServiceSummary] = {}
    tags: dict[str, set[str]] = {}
    kinds: dict[str, set[str]] = {}
    dcs: dict[str, set[str]] = {}
    for svc in rows:
        s = out.get(svc.name)
        if s is None:
            s = out[svc.name] = ServiceSummary(svc.name)
            tags[svc.name], kinds[svc.name], dcs[svc.name] = set(), set(), set()
        s.instance_count += 1
        tags[svc.name].update(svc.tags or [])
        kinds[svc.name].add(svc.kind)
        dcs[svc.name].add(svc.node.datacenter.name)
        own = checks[svc.pk]
        s.health[instance_status(own)] += 1
        for status, n in Counter(c.status for c in own).items():
            key = status if status in s.checks else Check.CRITICAL
            s.checks[key] += n
        s.modify_index = max(s.modify_index, svc.modify_index)
    for name, s in out.items():
        s.tags, s.kinds, s.datacenters = sorted(tags[name]), sorted(kinds[name]), sorted(dcs[name])
    return list(out.values())


# --- registration ---------------------------------------------------------------------


def register_instance(spec: dict[str, Any], *, node: str | None = None) -> ServiceInstance:
    """Register a service instance and return it.

    With `node`, `spec` is a `/v1/catalog/register` body (node, service, checks)
    and the instance goes in the catalog; without, `spec` is an agent service
    definition registered on the control plane's own node, whose checks the
    control plane runs. Either way it is the one write `/v1` makes.
    """
    if node is None:
        local = catalog.local_node()
        service_id = catalog.register_agent_service(local, spec).service_id
        node = local.name
    else:
        catalog.catalog_register(spec)
        service_id = spec["Service"]["ID"]
    svc = (
        ServiceInstance.objects.select_related("node__datacenter")
        .filter(node__name=node, service_id=service_id)
        .first()
    )
    if svc is None:  # deregistered again between the write and this read
        raise NotFound(f'Instance "{service_id}" on node "{node}" no longer exists')
    return svc


def deregister_instance(svc: ServiceInstance) -> None:
    """Deregister an instance the way it was registered: an agent-local one
    with its sidecar (as `/v1/agent/service/deregister`), a catalog one alone."""
    if svc.agent_local:
        catalog.deregister_agent_service(svc.node, svc.service_id)
    else:
        catalog.catalog_deregister({"Node": svc.node.name, "ServiceID": svc.service_id})
