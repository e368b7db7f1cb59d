"""What DNS reads from the catalog, as plain data for `registry.dns.answers`.

Synchronous ORM code, run on the database pool (`registry.db.run`). Each read
is one or two queries: the rows (with node and datacenter joined) and, for
services, their checks through `checks_for`. Names match case-insensitively,
as DNS names do. What the caller may see is decided by the DNS token
(`dns_identity()`: MESH_ACL_DNS_TOKEN, the token made at bootstrap, or the
anonymous token; with ACLs disabled everything), as Consul answers DNS with
its `acl.tokens.dns`.
"""

from __future__ import annotations

from django.conf import settings
from django.db.models import Q

from registry.acl_rules import Authorizer
from registry.dns.answers import Endpoint, NodeInfo, PtrName, QueryAnswer
from registry.dns.names import (
    Lookup,
    NodeLookup,
    PtrLookup,
    QueryLookup,
    ServiceLookup,
    ZoneLookup,
)
from registry.domain.acl import dns_identity
from registry.domain.catalog import aggregate_status, checks_for
from registry.errors import PermissionDenied
from registry.models import Node, ServiceInstance


def _authorizer() -> Authorizer | None:
    try:
        return dns_identity().authorizer
    except PermissionDenied:
        return None  # an unusable anonymous token sees nothing


def _node_info(node: Node) -> NodeInfo:
    meta = tuple(sorted((str(k), str(v)) for k, v in (node.meta or {}).items()))
    return NodeInfo(node.name, node.address, node.datacenter.name, meta)


def _int(value, default: int = 1) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def service_endpoints(lookup: ServiceLookup) -> list[Endpoint]:
    """Every instance of the service in the dc that the anonymous token may read.

    Health and tags are left to the answer builder, which knows DNS's rules.
    """
    authz = _authorizer()
    if authz is None:
        return []
    qs = ServiceInstance.objects.select_related("node__datacenter").filter(
        node__datacenter__name__iexact=lookup.dc
    )
    if lookup.connect:
        qs = qs.filter(
            Q(destination_name__iexact=lookup.service)
            | Q(name__iexact=lookup.service, connect__Native=True)
        )
    else:
        qs = qs.filter(name__iexact=lookup.service)
    instances = [s for s in qs if authz.service_read(s.name) and authz.node_read(s.node.name)]
    checks = checks_for(instances)
    nodes: dict[int, NodeInfo] = {}
    out = []
    for s in instances:
        node = nodes.get(s.node_id)
        if node is None:
            node = nodes[s.node_id] = _node_info(s.node)
        weights = s.weights or {}
        out.append(
            Endpoint(
                node=node,
                address=s.address or "",
                port=s.port,
                tags=tuple(str(t) for t in s.tags or ()),
                status=aggregate_status(c.status for c in checks.get(s.pk, [])),
                weight_passing=_int(weights.get("Passing", 1)),
                weight_warning=_int(weights.get("Warning", 1)),
            )
        )
    return out


def query_answer(lookup: QueryLookup) -> QueryAnswer | None:
    """Run the prepared query named in the lookup, as the DNS token (None: no such query)."""
    from meshproto.durations import parse_duration
    from registry.domain import queries
    from registry.errors import MeshError

    authz = _authorizer()
    if authz is None:
        return None
    try:
        result = queries.execute(authz, lookup.name, dc=lookup.dc)
    except MeshError:
        return None
    endpoints = []
    for entry in result["Nodes"]:
        node, svc = entry["Node"], entry["Service"]
        meta = tuple(sorted((str(k), str(v)) for k, v in (node.get("Meta") or {}).items()))
        weights = svc.get("Weights") or {}
        endpoints.append(
            Endpoint(
                node=NodeInfo(node["Node"], node["Address"], node["Datacenter"], meta),
                address=svc.get("Address") or "",
                port=svc.get("Port") or 0,
                tags=tuple(str(t) for t in svc.get("Tags") or ()),
                status=aggregate_status(c["Status"] for c in entry["Checks"]),
                weight_passing=_int(weights.get("Passing", 1)),
                weight_warning=_int(weights.get("Warning", 1)),
            )
        )
    ttl = None
    if result["DNS"]["TTL"]:
        ttl = int(parse_duration(result["DNS"]["TTL"]))
    return QueryAnswer(endpoints, result["Datacenter"], ttl)


def node_info(lookup: NodeLookup) -> NodeInfo | None:
    authz = _authorizer()
    node = (
        Node.objects.select_related("datacenter")
        .filter(name__iexact=lookup.node, datacenter__name__iexact=lookup.dc)
        .first()
    )
    if node is None or authz is None or not authz.node_read(node.name):
        return None
    return _node_info(node)


def ptr_names(ip: str) -> list[PtrName]:
    """What `ip` is the address of: the nodes first, else service instances."""
    authz = _authorizer()
    if authz is None:
        return []
    nodes = Node.objects.select_related("datacenter").filter(address=ip).order_by("name")[:10]
    found = [PtrName("node", n.name, n.datacenter.name) for n in nodes if authz.node_read(n.name)]
    if found:
        return found
    services = (
        ServiceInstance.objects.select_related("node__datacenter")
        .filter(address=ip)
        .order_by("name")[:10]
    )
    return [
        PtrName("service", s.name, s.node.datacenter.name)
        for s in services
        if authz.service_read(s.name) and authz.node_read(s.node.name)
    ]


def name_servers() -> list[NodeInfo]:
    """The zone's name servers: this server's own node."""
    node = Node.objects.select_related("datacenter").filter(name=settings.MESH_NODE_NAME).first()
    return [] if node is None else [_node_info(node)]


def needs_read(lookup: Lookup) -> bool:
    return isinstance(lookup, ServiceLookup | QueryLookup | NodeLookup | PtrLookup | ZoneLookup)


def read(lookup: Lookup) -> object:
    """The data `answers.answer` needs for `lookup` (None when it needs none)."""
    if isinstance(lookup, ServiceLookup):
        return service_endpoints(lookup)
    if isinstance(lookup, NodeLookup):
        return node_info(lookup)
    if isinstance(lookup, QueryLookup):
        return query_answer(lookup)
    if isinstance(lookup, PtrLookup):
        return ptr_names(lookup.ip)
    if isinstance(lookup, ZoneLookup):
        return name_servers()
    return None
