"""`/v1/event/...`: fire user events and list the recent ones, as Consul's."""

from __future__ import annotations

from django.urls import path

from registry import topics as topic
from registry.domain import events, reads
from registry.v1.base import RESULTS_FILTERED_HEADER, Ctx, Reply, endpoint


def _dc(ctx: Ctx) -> str:
    if ctx.has("dc"):
        reads.check_datacenter(ctx.dc)
    return ctx.dc


@endpoint("PUT")
def fire(ctx: Ctx, name: str = "") -> Reply:
    """`PUT /v1/event/fire/:name?node=&service=&tag=`; the body is the payload."""
    dc = _dc(ctx)
    events.validate_name(name)
    ctx.require(ctx.authz.event_write(name), "event:write", name)
    event = events.fire(
        name,
        ctx.body_bytes(),
        dc=dc,
        node_filter=ctx.param("node"),
        service_filter=ctx.param("service"),
        tag_filter=ctx.param("tag"),
    )
    return Reply(events.event_json(event))


@endpoint("GET", topics=lambda ctx: ([topic.EVENTS], []))
def list_(ctx: Ctx) -> Reply:
    """`GET /v1/event/list?name=&node=&service=&tag=`, blocking on new events."""
    index, data, filtered = events.list_events(
        ctx.authz,
        dc=_dc(ctx),
        name=ctx.param("name"),
        node=ctx.param("node"),
        service=ctx.param("service"),
        tag=ctx.param("tag"),
    )
    headers = {RESULTS_FILTERED_HEADER: "true"} if filtered else {}
    return Reply(data, index, headers=headers, filterable=True)


urlpatterns = [
    path("event/fire/", fire),
    path("event/fire/<path:name>", fire),
    path("event/list", list_),
]
