"""`/v1/agent/...` as a Consul server agent serves it: for the control plane's own node."""

from __future__ import annotations

from django.conf import settings

from meshproto.registration import rules, shapes
from registry import decode
from registry import topics as topic
from registry.domain import catalog, reads
from registry.errors import BadRequest, NotFound
from registry.models import Check, ServiceInstance
from registry.v1.base import Ctx, Reply, endpoint


def _local_topics(ctx: Ctx, **_):
    return [topic.node(settings.MESH_NODE_NAME)], []


def _coord(node: str) -> dict | None:
    """This server's network coordinate (see `registry.domain.coordinates`), if it has one."""
    from registry.domain.coordinates import coordinates

    found = coordinates([node]).get(node)
    return found.to_json() if found is not None else None


@endpoint("GET")
def self_(ctx: Ctx) -> Reply:
    node = catalog.local_node()
    ctx.require(ctx.authz.agent_read(node.name), "agent:read", node.name)
    host, port = settings.MESH_HTTP_ADDR
    return Reply(
        {
            "Config": {
                "Datacenter": node.datacenter.name,
                "PrimaryDatacenter": settings.MESH_DC,
                "NodeName": node.name,
                "NodeID": node.node_id,
                "Server": True,
                "Revision": "meshweb",
                "Version": shapes.VERSION,
            },
            "DebugConfig": {},
            "Coord": _coord(node.name),
            "Member": _member(node),
            "Stats": {},
            "Meta": node.meta,
            "xDS": None,
        }
    )


def _member(node) -> dict:
    return shapes.member(
        name=node.name,
        addr=node.address,
        port=settings.MESH_HTTP_ADDR[1],
        role="consul",
        datacenter=node.datacenter.name,
        node_id=node.node_id,
    )


@endpoint("GET")
def members(ctx: Ctx) -> Reply:
    from registry.models import Node

    out = []
    for node in (
        Node.objects.select_related("datacenter").filter(meta__has_key="mesh-role").order_by("name")
    ):
        if ctx.authz.node_read(node.name):
            out.append(_member(node))
    return Reply(out)


@endpoint("GET", topics=_local_topics)
def services(ctx: Ctx) -> Reply:
    index, data = reads.agent_services(ctx.authz, catalog.local_node())
    return Reply(data, index, filterable=True)


@endpoint("GET", topics=_local_topics)
def service(ctx: Ctx, service_id: str) -> Reply:
    index, data = reads.agent_service(ctx.authz, catalog.local_node(), service_id)
    return Reply(data, index)


@endpoint("GET", topics=_local_topics)
def checks(ctx: Ctx) -> Reply:
    index, data = reads.agent_checks(ctx.authz, catalog.local_node())
    return Reply(data, index, filterable=True)


@endpoint("PUT")
def service_register(ctx: Ctx) -> Reply:
    spec = ctx.json(decode.AGENT_SERVICE)
    name = spec.get("Name", "")
    if not name:
        raise BadRequest("Missing service name")
    node = catalog.local_node()
    stored = catalog.stored_service(node, spec)
    ctx.require_all(catalog.agent_register_needs(node, spec, stored.instance))
    catalog.register_agent_service(
        node, spec, replace_existing_checks=ctx.flag("replace-existing-checks"), stored=stored
    )
    return Reply(None, raw=b"")


def _service_for_write(ctx: Ctx, service_id: str) -> ServiceInstance:
    node = catalog.local_node()
    svc = ServiceInstance.objects.filter(node=node, service_id=service_id).first()
    if svc is None:
        raise NotFound(
            f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.'
        )
    ctx.require(ctx.authz.service_write(svc.name), "service:write", svc.name)
    return svc


@endpoint("PUT")
def service_deregister(ctx: Ctx, service_id: str) -> Reply:
    _service_for_write(ctx, service_id)
    catalog.deregister_agent_service(catalog.local_node(), service_id)
    return Reply(None, raw=b"")


@endpoint("PUT")
def service_maintenance(ctx: Ctx, service_id: str) -> Reply:
    if not ctx.has("enable"):
        raise BadRequest("Missing value for enable")
    enable = ctx.flag("enable")
    _service_for_write(ctx, service_id)
    catalog.set_service_maintenance(catalog.local_node(), service_id, enable, ctx.param("reason"))
    return Reply(None, raw=b"")


@endpoint("PUT")
def node_maintenance(ctx: Ctx) -> Reply:
    if not ctx.has("enable"):
        raise BadRequest("Missing value for enable")
    node = catalog.local_node()
    ctx.require(ctx.authz.node_write(node.name), "node:write", node.name)
    catalog.set_node_maintenance(node, ctx.flag("enable"), ctx.param("reason"))
    return Reply(None, raw=b"")


def _check_for_write(ctx: Ctx, check_id: str) -> Check:
    node = catalog.local_node()
    check = Check.objects.select_related("node").filter(node=node, check_id=check_id).first()
    if check is None:
        raise NotFound(
            f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
        )
    if check.service_name:
        ctx.require(
            ctx.authz.service_write(check.service_name), "service:write", check.service_name
        )
    else:
        ctx.require(ctx.authz.node_write(node.name), "node:write", node.name)
    return check


@endpoint("PUT")
def check_register(ctx: Ctx) -> Reply:
    spec = ctx.json(decode.AGENT_CHECK)
    node = catalog.local_node()
    if spec.get("ServiceID"):
        svc = ServiceInstance.objects.filter(node=node, service_id=spec["ServiceID"]).first()
        if svc is None:
            raise NotFound(f'ServiceID "{spec["ServiceID"]}" does not exist')
        ctx.require(ctx.authz.service_write(svc.name), "service:write", svc.name)
    else:
        ctx.require(ctx.authz.node_write(node.name), "node:write", node.name)
    catalog.register_agent_check(node, spec)
    return Reply(None, raw=b"")


@endpoint("PUT")
def check_deregister(ctx: Ctx, check_id: str) -> Reply:
    _check_for_write(ctx, check_id)
    catalog.deregister_check(catalog.local_node(), check_id)
    return Reply(None, raw=b"")


def _ttl_update(ctx: Ctx, check_id: str, status: str, output: str | None) -> Reply:
    check = _check_for_write(ctx, check_id)
    if check.type != "ttl":
        raise BadRequest(f'CheckID "{check_id}" does not have associated TTL')
    catalog.update_check_status(check.node, check_id, status, output)
    return Reply(None, raw=b"")


@endpoint("PUT")
def check_pass(ctx: Ctx, check_id: str) -> Reply:
    return _ttl_update(ctx, check_id, Check.PASSING, ctx.param("note"))


@endpoint("PUT")
def check_warn(ctx: Ctx, check_id: str) -> Reply:
    return _ttl_update(ctx, check_id, Check.WARNING, ctx.param("note"))


@endpoint("PUT")
def check_fail(ctx: Ctx, check_id: str) -> Reply:
    return _ttl_update(ctx, check_id, Check.CRITICAL, ctx.param("note"))


@endpoint("PUT")
def check_update(ctx: Ctx, check_id: str) -> Reply:
    body = ctx.json(decode.CHECK_UPDATE)
    status = body.get("Status") or ""
    if status not in (Check.PASSING, Check.WARNING, Check.CRITICAL):
        raise BadRequest(f"Invalid check status: {status!r}")
    output = body.get("Output")
    if output is not None:
        output = rules.truncate_output(output)
    return _ttl_update(ctx, check_id, status, output)


@endpoint("GET")
def health_service_by_id(ctx: Ctx, service_id: str) -> Reply:
    node = catalog.local_node()
    found = reads.agent_health_by_id(node, service_id)
    if found is None:
        return Reply(
            f"ServiceId {service_id} not found",
            raw=f"ServiceId {service_id} not found".encode(),
            status=404,
            content_type="text/plain",
        )
    status, data = found
    ctx.require(
        ctx.authz.service_read(data["Service"]["Service"]),
        "service:read",
        data["Service"]["Service"],
    )
    code = {"passing": 200, "warning": 429, "critical": 503}.get(status, 503)
    return Reply(data, status=code)
