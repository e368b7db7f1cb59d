"""ACL tokens and policies: lists, a token created with its secret shown once,
policies written with their rules checked by the same parser the API uses,
deletes confirmed. Reads need `acl:read`, writes `acl:write` (as `/v1/acl`)."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from frontend import paging
from frontend.auth import ui_view
from frontend.render import page
from meshproto.durations import DurationError, parse_duration
from registry.domain import acl
from registry.errors import BadRequest, MeshError


def _acl_page(request: HttpRequest, context: dict, status: int = 200) -> HttpResponse:
    return page(request, "frontend/acl.html", context, section="acl", status=status)


@ui_view("acl.edit")
@require_http_methods(["GET", "POST"])
def acl_index(request: HttpRequest) -> HttpResponse:
    viewer = request.viewer
    if not settings.MESH_ACL_ENABLED:
        return _acl_page(request, {"disabled": True})
    viewer.require("acl_read")
    created, errors, values, status = None, {}, {}, 200
    if request.method == "POST":
        viewer.require("acl_write")
        what = request.POST.get("what", "")
        values = {k: request.POST.get(k, "") for k in ("description", "ttl", "name", "rules")}
        try:
            if what == "token":
                ttl = 0.0
                if values["ttl"].strip():
                    try:
                        ttl = parse_duration(values["ttl"].strip())
                    except DurationError as err:
                        raise BadRequest(f"ttl: {err}") from None
                token, secret = acl.create_token(
                    description=values["description"],
                    policies=[{"ID": p} for p in request.POST.getlist("policy")],
                    expiration_ttl=ttl,
                )
                created = {"token": token, "secret": secret}
                values = {}
            elif what == "policy":
                acl.create_policy(
                    name=values["name"].strip(),
                    description=values["description"],
                    rules=values["rules"],
                )
                return redirect("/ui/acl")
            else:
                raise BadRequest("Nothing to create")
        except MeshError as err:
            if err.status == 403:
                raise
            errors[what or "form"] = err.message
            status = err.status
    tokens = acl.list_tokens()
    pg = paging.paginate(request, tokens, {})
    return _acl_page(
        request,
        {
            "disabled": False,
            "page": pg,
            "tokens": pg.rows,
            "policies": acl.list_policies(),
            "can_write": viewer.authz.acl_write(),
            "created": created,
            "errors": errors,
            "values": values,
            "me": viewer.identity.accessor_id,
        },
        status,
    )


@ui_view("acl.token.delete")
@require_POST
def token_delete(request: HttpRequest, accessor_id: str) -> HttpResponse:
    viewer = request.viewer
    viewer.require("acl_write")
    acl.delete_token(accessor_id, caller_accessor=viewer.identity.accessor_id)
    return redirect("/ui/acl")


@ui_view("acl.policy.delete")
@require_POST
def policy_delete(request: HttpRequest, policy_id: str) -> HttpResponse:
    request.viewer.require("acl_write")
    acl.delete_policy(policy_id)
    return redirect("/ui/acl")
