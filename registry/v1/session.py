"""`/v1/session/...`: create, destroy, renew and read sessions, as Consul's."""

from __future__ import annotations

from django.urls import path

from registry import topics as topic
from registry.decode import Anything, ListOf, Str, Struct
from registry.domain import catalog, reads, sessions
from registry.v1.base import RESULTS_FILTERED_HEADER, Ctx, Reply, endpoint

SESSION_CREATE = Struct(
    {
        "Name": Str,
        "Node": Str,
        "LockDelay": Anything,  # a duration string or nanoseconds: see sessions.lock_delay_ns
        "Behavior": Str,
        "TTL": Str,
        "NodeChecks": ListOf(Str),
        "Checks": ListOf(Str),  # deprecated since Consul 1.7, still accepted
        "ServiceChecks": ListOf(Struct({"ID": Str, "Namespace": Str})),
    }
)


def _check_dc(ctx: Ctx) -> None:
    """Sessions live in this datacenter; an unknown `?dc=` is Consul's 404."""
    if ctx.has("dc"):
        reads.check_datacenter(ctx.dc)


def _reads(index: int, data: list, filtered: bool) -> Reply:
    headers = {RESULTS_FILTERED_HEADER: "true"} if filtered else {}
    return Reply(data, index, headers=headers)


@endpoint("PUT")
def create(ctx: Ctx) -> Reply:
    _check_dc(ctx)
    spec = ctx.json(SESSION_CREATE, required=False)
    node = spec.get("Node") or catalog.local_node().name
    ctx.require(ctx.authz.session_write(node), "session:write", node)
    return Reply({"ID": sessions.create_session(spec, node).id})


def _authorize_write(ctx: Ctx, session_id: str) -> None:
    found = sessions.find_session(session_id)
    if found is not None:
        node = found.node.name
        ctx.require(ctx.authz.session_write(node), "session:write", node)


@endpoint("PUT")
def destroy(ctx: Ctx, session_id: str = "") -> Reply:
    _check_dc(ctx)
    session_id = sessions.validate_session_id(session_id)
    _authorize_write(ctx, session_id)
    return Reply(sessions.destroy_session(session_id))


@endpoint("PUT")
def renew(ctx: Ctx, session_id: str = "") -> Reply:
    _check_dc(ctx)
    session_id = sessions.validate_session_id(session_id)
    _authorize_write(ctx, session_id)
    return Reply([sessions.session_json(sessions.renew_session(session_id))])


@endpoint("GET", topics=lambda ctx, session_id="": ([topic.session(session_id.lower())], []))
def info(ctx: Ctx, session_id: str = "") -> Reply:
    _check_dc(ctx)
    session_id = sessions.validate_session_id(session_id)
    return _reads(*sessions.session_info(ctx.authz, session_id))


@endpoint("GET", topics=lambda ctx: ([topic.SESSIONS], []))
def list_(ctx: Ctx) -> Reply:
    _check_dc(ctx)
    return _reads(*sessions.list_sessions(ctx.authz))


@endpoint("GET", topics=lambda ctx, node: ([topic.node_sessions(node)], []))
def node(ctx: Ctx, node: str) -> Reply:
    _check_dc(ctx)
    return _reads(*sessions.node_sessions(ctx.authz, node))


urlpatterns = [
    path("session/create", create),
    path("session/destroy/", destroy),
    path("session/destroy/<str:session_id>", destroy),
    path("session/renew/", renew),
    path("session/renew/<str:session_id>", renew),
    path("session/info/", info),
    path("session/info/<str:session_id>", info),
    path("session/list", list_),
    path("session/node/<path:node>", node),
]
