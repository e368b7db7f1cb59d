"""Nodes and agents, the "Add a host" page (a join token and the command to run)
and the join tokens, listed and revocable."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from frontend import installs, paging
from frontend.auth import ui_view
from frontend.render import page
from meshproto.durations import parse_duration
from registry.api.filtersets import NodeFilterSet
from registry.domain import enrollment, inventory, join_tokens
from registry.errors import BadRequest, MeshError, NotFound
from registry.models import Check, Datacenter, Node, ServiceInstance
from registry.models.agents import JoinToken

FILTERS = ("q", "datacenter")


@ui_view()
def node_list(request: HttpRequest) -> HttpResponse:
    authz = request.viewer.authz
    query = paging.filters(request, FILTERS)
    qs = inventory.visible_nodes(authz, Node.objects.select_related("datacenter"))
    qs = NodeFilterSet(query, queryset=qs).qs.order_by("name")
    pg = paging.paginate(request, qs, query)
    return page(
        request,
        "frontend/nodes.html",
        {
            "page": pg,
            "rows": inventory.summarize_nodes(pg.rows),
            "query": query,
            "datacenters": Datacenter.objects.values_list("name", flat=True),
            "can_add": authz.acl_write(),
        },
        section="nodes",
    )


@ui_view()
def node_detail(request: HttpRequest, name: str) -> HttpResponse:
    viewer = request.viewer
    viewer.require("node_read", name)
    node = Node.objects.select_related("datacenter").filter(name=name).first()
    if node is None:
        raise NotFound(f'Node "{name}" not found')
    checks = inventory.visible_checks(viewer.authz, Check.objects.filter(node=node))
    services = inventory.visible_instances(
        viewer.authz, ServiceInstance.objects.filter(node=node).order_by("name", "service_id")
    )
    return page(
        request,
        "frontend/node.html",
        {
            "node": node,
            "summary": inventory.summarize_nodes([node])[0],
            "checks": checks.order_by("check_id"),
            "services": services,
            "meta": sorted((node.meta or {}).items()),
        },
        section="nodes",
    )


@ui_view("join-token.create")
@require_http_methods(["GET", "POST"])
def add_host(request: HttpRequest) -> HttpResponse:
    viewer = request.viewer
    values = {
        "description": "",
        "datacenter": "",
        "ttl": "1h",
        "uses": "1",
        "node": "",
        "services": "*",
    }
    created, errors = None, {}
    if request.method == "POST":
        viewer.require("acl_write")
        values = {k: request.POST.get(k, v).strip() for k, v in values.items()}
        try:
            try:
                ttl = parse_duration(values["ttl"])
            except (BadRequest, ValueError) as err:
                raise BadRequest(f"ttl: {getattr(err, 'message', err)}") from None
            try:
                uses = int(values["uses"] or "0")
            except ValueError:
                raise BadRequest("uses must be 0 (unlimited) or a positive integer") from None
            new = join_tokens.create_token(
                ttl_seconds=ttl,
                max_uses=uses,
                description=values["description"],
                datacenter=values["datacenter"],
                created_by=viewer.identity.accessor_id or "anonymous",
                node_name=values["node"],
                services=[s.strip() for s in values["services"].split(",") if s.strip()],
            )
            address = join_tokens.join_address(request.get_host())
            created = {
                "row": new.row,
                "token": new.token,
                "command": join_tokens.agent_command(address, new.token, enrollment.ca_pin()),
                "install": installs.install_line(request, new.token),
            }
        except MeshError as err:
            if err.status == 403:
                raise
            field = next((f for f in values if err.message.lower().startswith(f)), "form")
            errors[field] = err.message
    return page(
        request,
        "frontend/add_host.html",
        {
            "values": values,
            "errors": errors,
            "created": created,
            "can_create": viewer.authz.acl_write(),
            "datacenters": Datacenter.objects.values_list("name", flat=True),
        },
        section="nodes",
        status=400 if errors else 200,
    )


@ui_view()
def join_token_list(request: HttpRequest) -> HttpResponse:
    viewer = request.viewer
    viewer.require("acl_read")
    rows = JoinToken.objects.order_by("-create_index")
    pg = paging.paginate(request, rows, {})
    return page(
        request,
        "frontend/join_tokens.html",
        {
            "page": pg,
            "rows": [join_tokens.token_json(r) for r in pg.rows],
            "can_revoke": viewer.authz.acl_write(),
        },
        section="nodes",
    )


@ui_view("join-token.revoke")
@require_POST
def join_token_revoke(request: HttpRequest, token_id: str) -> HttpResponse:
    request.viewer.require("acl_write")
    join_tokens.revoke_token(token_id, nodes=request.POST.get("nodes") == "yes")
    return redirect("/ui/nodes/join-tokens")
