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
    # The peer a service is imported from ("" for our own catalog's services).
    peer: str = ""

    @property
    def worst(self) -> str:
        """The worst health among its instances (passing when it has none)."""
        for status in (Check.CRITICAL, Check.WARNING):
            if self.health.get(status):
                return status
        return Check.PASSING


def summarize_services(instances: QuerySet[ServiceInstance]) -> list[ServiceSummary]:
    """Aggregate (already filtered and ACL-restricted) instances per service name.

    Reads plain columns, not model rows: a page of a large catalog aggregates
    thousands of instances, and building a model (with its JSON fields) for
    each cost most of the time. Health is `instance_status` of each instance's
    checks (its node's and its own), as `checks_for` pairs them.
    """
    rows = list(
        instances.order_by("name", "node__name").values_list(
            "name",
            "tags",
            "kind",
            "node__datacenter__name",
            "modify_index",
            "node_id",
            "service_id",
        )
    )
    node_ids = {r[5] for r in rows}
    node_checks: dict[int, list[str]] = {}
    own_checks: dict[tuple[int, str], list[str]] = {}
    for node_id, service_id, status in Check.objects.filter(node_id__in=node_ids).values_list(
        "node_id", "service_id", "status"
    ):
        if service_id:
            own_checks.setdefault((node_id, service_id), []).append(status)
        else:
            node_checks.setdefault(node_id, []).append(status)
    out: dict[str, ServiceSummary] = {}
    tags: dict[str, set[str]] = {}
    kinds: dict[str, set[str]] = {}
    dcs: dict[str, set[str]] = {}
    for name, svc_tags, kind, dc, modify_index, node_id, service_id in rows:
        s = out.get(name)
        if s is None:
            s = out[name] = ServiceSummary(name)
            tags[name], kinds[name], dcs[name] = set(), set(), set()
        s.instance_count += 1
        tags[name].update(svc_tags or [])
        kinds[name].add(kind)
        dcs[name].add(dc)
        statuses = node_checks.get(node_id, []) + own_checks.get((node_id, service_id), [])
        s.health[aggregate_status(statuses)] += 1
        for status, n in Counter(statuses).items():
            key = status if status in s.checks else Check.CRITICAL
            s.checks[key] += n
        s.modify_index = max(s.modify_index, modify_index)
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


# --- service lists by name (paged before they are summarised) -------------------------

# Where an instance came from: its agent (`agent_local`), a cloud's registry (the
# importer marks `Meta["external-source"]`, Consul's convention), a catalog write,
# or a peer cluster (imported services: `registry.domain.peering.imported_summaries`).
SOURCES = ("agent", "cloud", "catalog", "peer")
LOCAL_SOURCES = ("agent", "cloud", "catalog")
EXTERNAL_SOURCE = "external-source"


def instance_source(svc: ServiceInstance) -> str:
    if (svc.meta or {}).get(EXTERNAL_SOURCE):
        return "cloud"
    return "agent" if svc.agent_local else "catalog"


def filter_source(qs: QuerySet[ServiceInstance], source: str) -> QuerySet[ServiceInstance]:
    """Instances from `source` (one of `SOURCES`; anything else: no filter). No
    instance of our catalog comes from a peer: those are `ImportedService` rows."""
    if source == "peer":
        return qs.none()
    if source == "cloud":
        return qs.filter(meta__has_key=EXTERNAL_SOURCE)
    if source == "agent":
        return qs.filter(agent_local=True).exclude(meta__has_key=EXTERNAL_SOURCE)
    if source == "catalog":
        return qs.filter(agent_local=False).exclude(meta__has_key=EXTERNAL_SOURCE)
    return qs


def worst_status_by_name(instances: QuerySet[ServiceInstance]) -> dict[str, str]:
    """Each service name's worst instance health (see `worst_status_by`)."""
    return worst_status_by(instances, "name")


def instance_status_counts(instances: QuerySet[ServiceInstance], field: str) -> dict[str, dict]:
    """Instances by `field` (a `values_list` path) and health: {key: {status: n}}."""
    out: dict[str, dict] = {}
    for key, status in _instance_statuses(instances, field):
        out.setdefault(key, dict.fromkeys(HEALTH_STATES, 0))[status] += 1
    return out


def worst_status_by(instances: QuerySet[ServiceInstance], field: str) -> dict[str, str]:
    """The worst instance health per `field` value."""
    rank = {Check.PASSING: 0, Check.WARNING: 1, Check.CRITICAL: 2}
    out: dict[str, str] = {}
    for key, status in _instance_statuses(instances, field):
        if rank[status] >= rank.get(out.get(key, ""), -1):
            out[key] = status
    return out


def _instance_statuses(instances: QuerySet[ServiceInstance], field: str):
    """(value of `field`, health) per instance. An instance's health is the worst
    of its checks and its node's (`instance_status`), here computed from the few
    non-passing checks so that 10,000 passing instances cost one narrow scan."""
    bad_node: dict[int, str] = {}
    bad_service: dict[tuple[int, str], str] = {}
    rank = {Check.PASSING: 0, Check.WARNING: 1, Check.CRITICAL: 2}
    for node_id, service_id, status in Check.objects.exclude(status=Check.PASSING).values_list(
        "node_id", "service_id", "status"
    ):
        status = status if status in rank else Check.CRITICAL
        table, key = (bad_service, (node_id, service_id)) if service_id else (bad_node, node_id)
        if rank[status] > rank.get(table.get(key, Check.PASSING), 0):
            table[key] = status
    for key, node_id, service_id in instances.order_by().values_list(
        field, "node_id", "service_id"
    ):
        yield (
            key,
            max(
                (bad_node.get(node_id, Check.PASSING), bad_service.get((node_id, service_id), "")),
                key=lambda s: rank.get(s, -1),
            ),
        )


@dataclass
class ServicePage:
    """One page of service summaries, and how many names matched in all."""

    services: list[ServiceSummary]
    total: int
    health: dict[str, int]  # matching names by their worst instance health


def service_page(
    instances: QuerySet[ServiceInstance],
    *,
    health: str = "",
    offset: int = 0,
    limit: int = 50,
    imported: list[ServiceSummary] = (),  # type: ignore[assignment]
) -> ServicePage:
    """Page service names (already filtered, ACL-restricted instances, and the
    services imported from peers, already summarised) and summarise only that
    page's instances, so the list stays fast with many instances. Rows are by
    name, a local service before the same name imported from peers."""
    worst = worst_status_by_name(instances)
    keyed: dict[tuple[str, str], str] = {(n, ""): s for n, s in worst.items()}
    by_key = {(s.name, s.peer): s for s in imported}
    keyed.update({key: s.worst for key, s in by_key.items()})
    counts = dict.fromkeys(HEALTH_STATES, 0)
    for status in keyed.values():
        counts[status] += 1
    keys = sorted(k for k, s in keyed.items() if not health or s == health)
    page = keys[offset : offset + limit]
    local = [name for name, peer in page if not peer]
    summaries = {
        (s.name, ""): s
        for s in (summarize_services(instances.filter(name__in=local)) if local else [])
    }
    summaries.update({k: by_key[k] for k in page if k[1]})
    return ServicePage([summaries[k] for k in page if k in summaries], len(keys), counts)


# --- service dependencies (declared by sidecar registrations) -------------------------


def _upstream_names(proxy: dict[str, Any]) -> set[str]:
    return {
        u.get("DestinationName", "")
        for u in (proxy or {}).get("Upstreams") or []
        if isinstance(u, dict) and u.get("DestinationName")
    }


def service_edges(authz: Authorizer) -> set[tuple[str, str]]:
    """(caller, callee) for every upstream a visible sidecar declares, both ends visible."""
    rows = visible_instances(authz, ServiceInstance.objects.filter(kind="connect-proxy"))
    edges: set[tuple[str, str]] = set()
    for destination, proxy in rows.values_list("destination_name", "proxy"):
        for upstream in _upstream_names(proxy):
            if authz.service_read(upstream):
                edges.add((destination, upstream))
    return edges


def dependencies(authz: Authorizer, name: str) -> tuple[list[str], list[str]]:
    """(upstreams, downstreams) of service `name` as its and others' sidecars declare them."""
    edges = service_edges(authz)
    return (
        sorted(b for a, b in edges if a == name),
        sorted(a for a, b in edges if b == name),
    )


# --- nodes ----------------------------------------------------------------------------


@dataclass
class NodeSummary:
    """One node as the nodes list shows it: liveness, checks and services."""

    node: Node
    role: str
    last_seen_at: Any = None
    down: bool = False
    joined_with: str = ""
    services: int = 0
    checks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HEALTH_STATES, 0))


def summarize_nodes(nodes: list[Node]) -> list[NodeSummary]:
    """Summaries for one page of nodes (a few queries, whatever the page size)."""
    from django.db.models import Count

    from registry.models.agents import NodeEnrollment

    ids = [n.pk for n in nodes]
    names = [n.name for n in nodes]
    enrolled = {e.node: e for e in NodeEnrollment.objects.filter(node__in=names)}
    services = dict(
        ServiceInstance.objects.filter(node_id__in=ids)
        .values_list("node_id")
        .annotate(n=Count("id"))
        .values_list("node_id", "n")
    )
    checks: dict[int, dict[str, int]] = {}
    for node_id, status, n in (
        Check.objects.filter(node_id__in=ids)
        .values_list("node_id", "status")
        .annotate(n=Count("id"))
        .values_list("node_id", "status", "n")
    ):
        key = status if status in HEALTH_STATES else Check.CRITICAL
        checks.setdefault(node_id, dict.fromkeys(HEALTH_STATES, 0))[key] += n
    out = []
    for n in nodes:
        e = enrolled.get(n.name)
        out.append(
            NodeSummary(
                n,
                (n.meta or {}).get("mesh-role", "") or ("agent" if e else "catalog"),
                e.last_seen_at if e else None,
                bool(e and e.down),
                e.join_token if e else "",
                services.get(n.pk, 0),
                checks.get(n.pk, dict.fromkeys(HEALTH_STATES, 0)),
            )
        )
    return out
