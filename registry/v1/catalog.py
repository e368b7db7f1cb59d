"""`/v1/catalog/...` and `/v1/health/...`."""

from __future__ import annotations

from registry import decode
from registry import topics as topic
from registry.domain import catalog, coordinates, peering, reads
from registry.errors import BadRequest
from registry.v1.base import Ctx, Reply, endpoint


def _tags(ctx: Ctx) -> list[str]:
    return [t for t in ctx.query.getlist("tag") if t]


def _node_meta(ctx: Ctx) -> dict[str, str]:
    out = {}
    for pair in ctx.query.getlist("node-meta"):
        key, sep, value = pair.partition(":")
        if not sep or not key:
            raise BadRequest(f"Invalid node-meta filter {pair!r}: use key:value")
        out[key] = value
    return out


def _near(ctx: Ctx, data: list, node_of) -> list:
    """`?near=<node>|_agent`: sort by estimated round trip from that node (coordinates)."""
    near = ctx.param("near")
    return coordinates.sort_near(near, data, node_of) if near else data


def _t(ctx: Ctx, *exact: str) -> tuple[list[str], list[str]]:
    """A read's topics; a `?near=` answer also changes when coordinates do."""
    return [*exact, *([topic.COORDINATES] if ctx.has("near") else [])], []


def _peer(ctx: Ctx) -> str:
    """`?peer=`: read what that peer exports to us instead of our own catalog."""
    return ctx.param("peer")


def _svc_topics(ctx: Ctx, name: str, connect: bool = False):
    if _peer(ctx):
        return [topic.peered_service(_peer(ctx), name), topic.peering(_peer(ctx))], []
    return _t(ctx, topic.connect(name) if connect else topic.service(name))


def _dc(ctx: Ctx) -> str:
    dc = ctx.dc
    reads.check_datacenter(dc)
    return dc


# -- catalog -----------------------------------------------------------------------


@endpoint("PUT", "POST")
def register(ctx: Ctx) -> Reply:
    spec = ctx.json(decode.CATALOG_REGISTER)
    if "NodeMeta" not in spec and ctx.has("node-meta"):
        # py-consul sends catalog.register(node_meta=...) as ?node-meta=k:v.
        spec["NodeMeta"] = _node_meta(ctx)
    stored = catalog.stored_for_catalog(spec)
    ctx.require_all(catalog.catalog_register_needs(spec, stored))
    catalog.catalog_register(spec, stored)
    return Reply(True)


@endpoint("PUT", "POST")
def deregister(ctx: Ctx) -> Reply:
    spec = ctx.json(decode.CATALOG_DEREGISTER)
    if not spec.get("Node"):
        raise BadRequest("Must provide node")
    if spec.get("ServiceID"):
        from registry.models import ServiceInstance

        svc = ServiceInstance.objects.filter(
            node__name=spec["Node"], service_id=spec["ServiceID"]
        ).first()
        ctx.require(
            svc is None or ctx.authz.service_write(svc.name),
            "service:write",
            svc.name if svc else "",
        )
    else:
        ctx.require(ctx.authz.node_write(spec["Node"]), "node:write", spec["Node"])
    catalog.catalog_deregister(spec)
    return Reply(True)


@endpoint("GET")
def datacenters(ctx: Ctx) -> Reply:
    return Reply(reads.datacenters())


def _nodes_topics(ctx: Ctx):
    return _t(ctx, topic.NODES)


@endpoint("GET", topics=_nodes_topics)
def nodes(ctx: Ctx) -> Reply:
    index, data = reads.catalog_nodes(ctx.authz, _dc(ctx), _node_meta(ctx))
    return Reply(_near(ctx, data, lambda n: n["Node"]), index, filterable=True)


@endpoint(
    "GET",
    topics=lambda ctx: (
        [topic.peered_services(_peer(ctx)), topic.peering(_peer(ctx))]
        if _peer(ctx)
        else [topic.SERVICES],
        [],
    ),
)
def services(ctx: Ctx) -> Reply:
    if _peer(ctx):
        index, data = peering.peer_services(ctx.authz, _peer(ctx))
        return Reply(data, index)
    index, data = reads.catalog_services(ctx.authz, _dc(ctx))
    return Reply(data, index, filterable=False)


@endpoint("GET", topics=_svc_topics)
def service(ctx: Ctx, name: str) -> Reply:
    if _peer(ctx):
        index, data = peering.peer_catalog(ctx.authz, _peer(ctx), name, _tags(ctx))
        return Reply(data, index, filterable=True)
    index, data = reads.catalog_service(
        ctx.authz, name, _dc(ctx), _tags(ctx), node_meta=_node_meta(ctx)
    )
    return Reply(_near(ctx, data, lambda e: e["Node"]), index, filterable=True)


@endpoint("GET", topics=lambda ctx, name: _t(ctx, topic.connect(name)))
def connect(ctx: Ctx, name: str) -> Reply:
    index, data = reads.catalog_service(
        ctx.authz, name, _dc(ctx), _tags(ctx), connect=True, node_meta=_node_meta(ctx)
    )
    return Reply(_near(ctx, data, lambda e: e["Node"]), index, filterable=True)


@endpoint("GET", topics=lambda ctx, name: ([topic.node(name)], []))
def node(ctx: Ctx, name: str) -> Reply:
    index, data = reads.catalog_node(ctx.authz, name)
    if data is None:
        return Reply(None, index, status=404)
    return Reply(data, index)


@endpoint("GET", topics=lambda ctx, name: ([topic.node(name)], []))
def node_services(ctx: Ctx, name: str) -> Reply:
    index, data = reads.catalog_node_services(ctx.authz, name)
    if data is None:
        return Reply(None, index, status=404)
    return Reply(data, index)


# -- health ---------------------------------------------------------------------------


@endpoint("GET", topics=lambda ctx, name: ([topic.node(name)], []))
def health_node(ctx: Ctx, name: str) -> Reply:
    index, data = reads.health_node(ctx.authz, name)
    return Reply(data, index, filterable=True)


@endpoint("GET", topics=lambda ctx, name: _t(ctx, topic.service(name)))
def health_checks(ctx: Ctx, name: str) -> Reply:
    index, data = reads.health_checks(ctx.authz, name, _dc(ctx))
    return Reply(_near(ctx, data, lambda c: c["Node"]), index, filterable=True)


def _health_filters(ctx: Ctx) -> dict:
    """`?tag=`, `?passing` and `?node-meta=` of a health read. A datacenter that
    does not exist answers 404 before any of them is refused (the read itself
    checks it only when it finds nothing, saving a statement per read)."""
    try:
        return {"tags": _tags(ctx), "passing": ctx.flag("passing"), "node_meta": _node_meta(ctx)}
    except BadRequest:
        reads.check_datacenter(ctx.dc)
        raise


@endpoint("GET", topics=_svc_topics)
def health_service(ctx: Ctx, name: str) -> Reply:
    if _peer(ctx):
        index, data = peering.peer_health(
            ctx.authz, _peer(ctx), name, tags=_tags(ctx), passing=ctx.flag("passing")
        )
        return Reply(data, index, filterable=True)
    index, data = reads.health_service(
        ctx.authz, name, ctx.dc, require_dc=True, **_health_filters(ctx)
    )
    return Reply(_near(ctx, data, lambda e: e["Node"]["Node"]), index, filterable=True)


@endpoint("GET", topics=lambda ctx, name: _svc_topics(ctx, name, connect=True))
def health_connect(ctx: Ctx, name: str) -> Reply:
    if _peer(ctx):
        index, data = peering.peer_health(
            ctx.authz, _peer(ctx), name, tags=_tags(ctx), passing=ctx.flag("passing")
        )
        return Reply(data, index, filterable=True)
    index, data = reads.health_service(
        ctx.authz, name, ctx.dc, connect=True, require_dc=True, **_health_filters(ctx)
    )
    return Reply(_near(ctx, data, lambda e: e["Node"]["Node"]), index, filterable=True)


_STATES = {"any", "passing", "warning", "critical"}


@endpoint("GET", topics=lambda ctx, state: _t(ctx, topic.CHECKS))
def health_state(ctx: Ctx, state: str) -> Reply:
    if state not in _STATES:
        raise BadRequest(f"Invalid state: {state!r} (use any, passing, warning or critical)")
    index, data = reads.health_state(ctx.authz, state, _dc(ctx))
    return Reply(_near(ctx, data, lambda c: c["Node"]), index, filterable=True)
