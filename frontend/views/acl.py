"""ACL tokens, policies and roles: lists, a token created with its secret shown
once (and edited: description, policies, roles), policies written with their
rules checked by the same parser the API uses, roles with policies and service
or node identities, deletes confirmed. Reads need `acl:read`, writes
`acl:write` (as `/v1/acl`)."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from frontend import forms, paging
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
                    roles=[{"ID": r} for r in request.POST.getlist("role")],
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
            "roles": acl.list_roles(),
            "tab": "tokens",
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


def _role_values(request: HttpRequest) -> dict:
    return {
        "name": request.POST.get("name", "").strip(),
        "description": request.POST.get("description", ""),
        "services": request.POST.get("services", ""),
        "nodes": request.POST.get("nodes", ""),
        "policy_ids": request.POST.getlist("policy"),
    }


def _save_role(values: dict, role_id: str = "") -> None:
    args = {
        "name": values["name"],
        "description": values["description"],
        "policies": [{"ID": p} for p in values["policy_ids"]],
        "service_identities": forms.service_identity_lines(values["services"]),
        "node_identities": forms.node_identity_lines(values["nodes"]),
    }
    if role_id:
        acl.update_role(role_id, **args)
    else:
        acl.create_role(**args)


# Most specific first: identity messages also mention a "name".
ROLE_FIELDS = (
    ("services", ("Service identit",)),
    ("nodes", ("Node identit",)),
    ("policies", ("ACL policy",)),
    ("name", ("Name",)),
)


@ui_view("acl.role.edit")
@require_http_methods(["GET", "POST"])
def role_list(request: HttpRequest) -> HttpResponse:
    """The Roles tab: every role, and a form to create one."""
    viewer = request.viewer
    if not settings.MESH_ACL_ENABLED:
        return _acl_page(request, {"disabled": True})
    viewer.require("acl_read")
    errors, values, status = {}, {"policy_ids": []}, 200
    if request.method == "POST":
        viewer.require("acl_write")
        values = _role_values(request)
        try:
            _save_role(values)
            return redirect("/ui/acl/roles")
        except MeshError as err:
            if err.status == 403:
                raise
            errors[forms.field_for(err.message, ROLE_FIELDS) or "form"] = err.message
            status = err.status
    return page(
        request,
        "frontend/acl_roles.html",
        {
            "tab": "roles",
            "roles": acl.list_roles(),
            "policies": acl.list_policies(),
            "can_write": viewer.authz.acl_write(),
            "errors": errors,
            "values": values,
        },
        section="acl",
        status=status,
    )


@ui_view("acl.role.edit")
@require_http_methods(["GET", "POST"])
def role_edit(request: HttpRequest, role_id: str) -> HttpResponse:
    """One role's form: its policies and identities, saved through `acl.update_role`."""
    viewer = request.viewer
    viewer.require("acl_read")
    role = acl.get_role(role_id)
    errors, status = {}, 200
    if request.method == "POST":
        viewer.require("acl_write")
        values = _role_values(request)
        try:
            _save_role(values, role_id)
            return redirect("/ui/acl/roles")
        except MeshError as err:
            if err.status == 403:
                raise
            errors[forms.field_for(err.message, ROLE_FIELDS) or "form"] = err.message
            status = err.status
    else:
        values = {
            "name": role.name,
            "description": role.description,
            "services": forms.identity_text(role.service_identities, "ServiceName", "Datacenters"),
            "nodes": forms.identity_text(role.node_identities, "NodeName", "Datacenter"),
            "policy_ids": [p.id for p in role.policies.all()],
        }
    return page(
        request,
        "frontend/acl_role_edit.html",
        {
            "role": role,
            "policies": acl.list_policies(),
            "tokens": acl.list_tokens(role=role_id),
            "can_write": viewer.authz.acl_write(),
            "errors": errors,
            "values": values,
        },
        section="acl",
        status=status,
    )


@ui_view("acl.role.delete")
@require_POST
def role_delete(request: HttpRequest, role_id: str) -> HttpResponse:
    request.viewer.require("acl_write")
    acl.delete_role(role_id)
    return redirect("/ui/acl/roles")


@ui_view("acl.token.edit")
@require_http_methods(["GET", "POST"])
def token_edit(request: HttpRequest, accessor_id: str) -> HttpResponse:
    """A token's description, policies and roles (its secret is never shown again)."""
    viewer = request.viewer
    viewer.require("acl_read")
    token = acl.get_token(accessor_id)
    error, status = "", 200
    values = {
        "description": token.description,
        "policy_ids": [p.id for p in token.policies.all()],
        "role_ids": [r.id for r in token.roles.all()],
    }
    if request.method == "POST":
        viewer.require("acl_write")
        values = {
            "description": request.POST.get("description", ""),
            "policy_ids": request.POST.getlist("policy"),
            "role_ids": request.POST.getlist("role"),
        }
        try:
            acl.update_token(
                accessor_id,
                description=values["description"],
                policies=[{"ID": p} for p in values["policy_ids"]],
                roles=[{"ID": r} for r in values["role_ids"]],
            )
            return redirect("/ui/acl")
        except MeshError as err:
            if err.status == 403:
                raise
            error, status = err.message, err.status
    return page(
        request,
        "frontend/acl_token_edit.html",
        {
            "token": token,
            "policies": acl.list_policies(),
            "roles": acl.list_roles(),
            "can_write": viewer.authz.acl_write(),
            "error": error,
            "values": values,
        },
        section="acl",
        status=status,
    )
