"""Signing in to the web UI with an ACL token, kept in the server-side session.

The secret lives only in the session row (the browser holds an opaque,
HttpOnly session cookie, never the token). Every page and action resolves
it again with `registry.domain.acl.resolve_token`, the function `/v1` and
`/api` use, so the UI has exactly that token's rights, and a token that is
deleted or expires signs the browser out on its next request. With ACLs
disabled there is nothing to sign in with: every visitor manages everything,
and every page says so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from registry import audit
from registry.acl_rules import Authorizer
from registry.domain.acl import Identity, resolve_token
from registry.errors import MeshError, NotFound, PermissionDenied

SESSION_KEY = "mesh_ui_token"
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page: the token's identity and what it may do."""

    identity: Identity
    acls_enabled: bool

    @property
    def authz(self) -> Authorizer:
        return self.identity.authorizer

    @property
    def name(self) -> str:
        if not self.acls_enabled:
            return "ACLs disabled"
        return self.identity.description or self.identity.accessor_id

    def require(self, permission: str, resource: str | None = None) -> None:
        """Refuse (403) unless the token has `permission` ("service_write") on `resource`."""
        check = getattr(self.authz, permission)
        if not (check(resource) if resource is not None else check()):
            what = permission.replace("_", ":", 1)
            on = f' on "{resource}"' if resource else ""
            raise PermissionDenied(
                f"Permission denied: token with AccessorID '{self.identity.accessor_id}' "
                f"lacks permission '{what}'{on}"
            )

    def can(self, permission: str, resource: str | None = None) -> bool:
        check = getattr(self.authz, permission)
        return bool(check(resource) if resource is not None else check())


def viewer_of(request: HttpRequest) -> Viewer | None:
    """The signed-in viewer, or None (not signed in, or the token is gone)."""
    if not settings.MESH_ACL_ENABLED:
        return Viewer(resolve_token(None), False)
    secret = request.session.get(SESSION_KEY)
    if not secret:
        return None
    try:
        return Viewer(resolve_token(secret), True)
    except MeshError:
        request.session.flush()
        return None


def sign_in(request: HttpRequest, secret: str) -> Viewer:
    """Check the token and keep it in a fresh session (a new session key: no fixation)."""
    secret = secret.strip()
    if not secret:
        raise PermissionDenied("Enter an ACL token's secret ID")
    identity = resolve_token(secret)  # PermissionDenied("ACL not found") for a bad one
    request.session.cycle_key()
    request.session[SESSION_KEY] = secret
    return Viewer(identity, True)


def sign_out(request: HttpRequest) -> None:
    request.session.flush()


def ui_view(action: str = "") -> Callable:
    """Decorate a UI view: sign-in required, the viewer on `request.viewer`,
    writes (`action` names them in the audit log) run in an audit scope with
    the token's identity, and refusals become the error page with their status
    (403 for a write the token may not make, however the form was forged)."""

    def wrap(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @functools.wraps(view)
        def inner(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            viewer = viewer_of(request)
            if viewer is None:
                if request.headers.get("HX-Request"):
                    response = HttpResponse(status=401)
                    response["HX-Redirect"] = "/ui/login"
                    return response
                return redirect("/ui/login?" + urlencode({"next": request.get_full_path()}))
            request.viewer = viewer  # type: ignore[attr-defined]
            try:
                if request.method in WRITE_METHODS:
                    actor = audit.Actor(
                        viewer.identity.accessor_id or "anonymous",
                        viewer.identity.description,
                        "ui",
                    )
                    name = f"ui.{action or view.__name__}"
                    with audit.scope(actor, name, request.method or "", request.path):
                        return view(request, *args, **kwargs)
                return view(request, *args, **kwargs)
            except (PermissionDenied, NotFound) as err:
                return error_page(request, err.status, err.message)

        return inner

    return wrap


def error_page(request: HttpRequest, status: int, message: str) -> HttpResponse:
    titles = {403: "Not allowed", 404: "Not found"}
    return render(
        request,
        "frontend/error.html",
        {"status": status, "title": titles.get(status, "Error"), "message": message},
        status=status,
    )
