"""Operator and agent odds and ends Consul clients call: autopilot health, the "raft"
configuration (the server processes as they are), the host, reload, the streamed
log monitor, the UI's service summary and `/v1/status/peers`."""

from __future__ import annotations

import asyncio
import json

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import path

from registry import db, monitor
from registry import topics as topic
from registry.domain import catalog, reads, servers, ui_services
from registry.errors import BadRequest, MeshError
from registry.txn import current_index
from registry.v1.base import Ctx, Reply, _error, endpoint


@endpoint("GET")
def autopilot_health(ctx: Ctx) -> Reply:
    """`GET /v1/operator/autopilot/health` (`operator:read`): 200 healthy, 429 not."""
    ctx.require(ctx.authz.operator_read(), "operator:read")
    health = servers.autopilot_health(current_index())
    return Reply(health, status=200 if health["Healthy"] else 429)


@endpoint("GET")
def raft_configuration(ctx: Ctx) -> Reply:
    """`GET /v1/operator/raft/configuration` (`operator:read`)."""
    ctx.require(ctx.authz.operator_read(), "operator:read")
    index = current_index()
    return Reply(servers.raft_configuration(index), index)


@endpoint("GET")
def status_peers(ctx: Ctx) -> Reply:
    """`GET /v1/status/peers`: the HTTP address of every live server process."""
    return Reply(servers.peers())


def _agent_node(ctx: Ctx) -> str:
    return catalog.local_node().name


@endpoint("GET")
def agent_host(ctx: Ctx) -> Reply:
    """`GET /v1/agent/host` (`operator:read`): the machine this server process runs on."""
    ctx.require(ctx.authz.operator_read(), "operator:read")
    return Reply(servers.host_info())


@endpoint("PUT")
def agent_reload(ctx: Ctx) -> Reply:
    """`PUT /v1/agent/reload` (`agent:write`): drop this process's cached reads.

    The control plane's configuration is its environment, fixed for the
    process's life; what can be reloaded is what it keeps in memory: resolved
    tokens, cached answers, the local node. The next requests read them anew.
    """
    node = _agent_node(ctx)
    ctx.require(ctx.authz.agent_write(node), "agent:write", node)
    from registry.domain import acl, intentions, proxycfg
    from registry.v1 import base

    with acl._cache_lock:
        acl._cache.clear()
    with base.read_cache._lock:
        base.read_cache._entries.clear()
    catalog.forget_local_node()
    proxycfg.forget_shared_reads()
    intentions.reset_caches()
    return Reply(raw=b"", content_type="text/plain")


@endpoint(
    "GET",
    topics=lambda ctx: ([topic.SERVICES, topic.CHECKS, topic.NODES], []),
)
def ui_services_list(ctx: Ctx) -> Reply:
    """`GET /v1/internal/ui/services`: one summary per service, Consul's UI shape."""
    dc = ctx.dc
    if ctx.has("dc"):
        reads.check_datacenter(dc)
    index, data = ui_services.services_summary(ctx.authz, dc)
    return Reply(data, index, filterable=True)


def _check_monitor(ctx: Ctx) -> None:
    node = _agent_node(ctx)
    ctx.require(ctx.authz.agent_read(node), "agent:read", node)


async def agent_monitor(request: HttpRequest) -> HttpResponse:
    """`GET /v1/agent/monitor?loglevel=&logjson` (`agent:read`): log lines as they are written."""
    if request.method != "GET":
        return HttpResponse(
            f"method {request.method} not allowed".encode(),
            status=405,
            content_type="text/plain; charset=utf-8",
            headers={"Allow": "GET"},
        )
    ctx = Ctx(request)
    try:
        await db.run(_check_monitor, ctx)
        try:
            stream = monitor.open_stream(ctx.param("loglevel", "info"), ctx.has("logjson"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    except MeshError as exc:
        return _error(exc)

    async def lines():
        try:
            yield b""  # the headers go out at once
            while True:
                try:
                    line = await asyncio.wait_for(stream.queue.get(), 30.0)
                except TimeoutError:
                    continue
                if stream.dropped:
                    note = f"[monitor: {stream.dropped} lines dropped, the reader was too slow]"
                    stream.dropped = 0
                    yield (
                        json.dumps({"@message": note}) if stream.as_json else note
                    ).encode() + b"\n"
                yield line.encode() + b"\n"
        finally:
            monitor.close_stream(stream)

    return StreamingHttpResponse(lines(), content_type="text/plain; charset=utf-8")


agent_monitor.csrf_exempt = True

urlpatterns = [
    path("operator/autopilot/health", autopilot_health),
    path("operator/raft/configuration", raft_configuration),
    path("agent/host", agent_host),
    path("agent/reload", agent_reload),
    path("agent/monitor", agent_monitor),
    path("internal/ui/services", ui_services_list),
]
