"""`/v1/query/...`: prepared queries, as Consul's (create, list, read, update,
delete, execute, explain)."""

from __future__ import annotations

from django.conf import settings
from django.urls import path

from registry import topics as topic
from registry.domain import queries, reads
from registry.v1.base import RESULTS_FILTERED_HEADER, Ctx, Reply, endpoint


def _manages(ctx: Ctx) -> bool:
    return not settings.MESH_ACL_ENABLED or ctx.authz.is_management()


def _show(ctx: Ctx, q) -> dict:
    return queries.query_json(q, show_token=_manages(ctx))


def _topics(ctx: Ctx, **_kw):
    return [topic.QUERIES], []


@endpoint("GET", "POST", topics=_topics)
def collection(ctx: Ctx) -> Reply:
    """`GET /v1/query` (list) and `POST /v1/query` (create)."""
    if ctx.has("dc"):
        reads.check_datacenter(ctx.dc)
    if ctx.method == "POST":
        spec = queries.parse(ctx.json())
        name = spec.get("Name", "")
        ctx.require(ctx.authz.query_write(name), "query:write", name)
        return Reply({"ID": queries.create(spec).id})
    index = queries.queries_index()
    visible, hidden = [], False
    for q in queries.list_all():
        if ctx.authz.query_read(q.name):
            visible.append(_show(ctx, q))
        else:
            hidden = True
    headers = {RESULTS_FILTERED_HEADER: "true"} if hidden else {}
    return Reply(visible, index, headers=headers, filterable=True)


@endpoint("GET", "PUT", "DELETE", topics=_topics)
def one(ctx: Ctx, query_id: str = "") -> Reply:
    """`GET|PUT|DELETE /v1/query/:uuid`."""
    q = queries.get(query_id)
    if ctx.method == "GET":
        ctx.require(ctx.authz.query_read(q.name), "query:read", q.name)
        return Reply([_show(ctx, q)], queries.queries_index())
    ctx.require(ctx.authz.query_write(q.name), "query:write", q.name)
    if ctx.method == "DELETE":
        queries.delete(q.id)
        return Reply(True)
    spec = queries.parse(ctx.json())
    name = spec.get("Name", "")
    ctx.require(ctx.authz.query_write(name), "query:write", name)
    queries.update(q.id, spec)
    return Reply(True)


@endpoint("GET")
def execute(ctx: Ctx, name: str = "") -> Reply:
    """`GET /v1/query/:uuid_or_name/execute?near=&limit=`."""
    dc = ctx.dc
    if ctx.has("dc"):
        reads.check_datacenter(dc)
    answer = queries.execute(
        ctx.authz, name, dc=dc, near=ctx.param("near"), limit=ctx.int_param("limit")
    )
    return Reply(answer, queries.queries_index())


@endpoint("GET")
def explain(ctx: Ctx, name: str = "") -> Reply:
    """`GET /v1/query/:uuid_or_name/explain`: the query as it would run (templates rendered)."""
    answer = queries.explain(name)
    query_name = answer["Query"]["Name"]
    ctx.require(ctx.authz.query_read(query_name), "query:read", query_name)
    if not _manages(ctx) and answer["Query"]["Token"]:
        answer["Query"]["Token"] = queries.HIDDEN
    return Reply(answer, queries.queries_index())


urlpatterns = [
    path("query", collection),
    path("query/<str:name>/execute", execute),
    path("query/<str:name>/explain", explain),
    path("query/<str:query_id>", one),
]
