"""`/v1/coordinate/...`: network coordinates, as Consul's."""

from __future__ import annotations

from django.urls import path

from registry import topics as topic
from registry.domain import coordinates, reads
from registry.errors import BadRequest
from registry.v1.base import Ctx, Reply, endpoint


def _topics(ctx: Ctx, **_kw):
    return [topic.COORDINATES, topic.NODES], []


@endpoint("GET")
def datacenters(ctx: Ctx) -> Reply:
    """`GET /v1/coordinate/datacenters`: every datacenter's node coordinates."""
    return Reply(coordinates.datacenter_entries())


@endpoint("GET", topics=_topics)
def nodes(ctx: Ctx) -> Reply:
    """`GET /v1/coordinate/nodes?dc=`: the coordinates of a datacenter's nodes."""
    if ctx.has("dc"):
        reads.check_datacenter(ctx.dc)
    return Reply(coordinates.node_entries(ctx.dc, ctx.authz), coordinates.index(), filterable=True)


@endpoint("GET", topics=_topics)
def node(ctx: Ctx, name: str = "") -> Reply:
    """`GET /v1/coordinate/node/:node`: one node's coordinates (404 when it has none)."""
    if ctx.has("dc"):
        reads.check_datacenter(ctx.dc)
    found = [e for e in coordinates.node_entries(ctx.dc, ctx.authz) if e["Node"] == name]
    if not found:
        return Reply(None, coordinates.index(), status=404)
    return Reply(found, coordinates.index())


@endpoint("PUT")
def update(ctx: Ctx) -> Reply:
    """`PUT /v1/coordinate/update`: set a node's coordinate (`node:write`)."""
    body = ctx.json()
    if not isinstance(body, dict) or not isinstance(body.get("Node"), str) or not body["Node"]:
        raise BadRequest("Missing node: the body needs Node and Coord")
    name = body["Node"]
    ctx.require(ctx.authz.node_write(name), "node:write", name)
    if reads.catalog_node(ctx.authz, name)[1] is None:
        raise BadRequest(f"Unknown node {name!r}")
    coordinates.set_coordinate(name, coordinates.parse_coord(body.get("Coord")))
    return Reply(raw=b"", content_type="text/plain")


urlpatterns = [
    path("coordinate/datacenters", datacenters),
    path("coordinate/nodes", nodes),
    path("coordinate/node/<path:name>", node),
    path("coordinate/update", update),
]
