"""Who is calling `/api`, and what they may do.

Callers authenticate as on `/v1`: with an ACL token in `X-Consul-Token`,
`Authorization: Bearer <secret>` or `?token=`, resolved by
`registry.domain.acl.resolve_token` (an unknown token is a 403). A browser
logged in to Django (the UI) is mapped to an identity instead: for now a
staff or superuser account is a global-management identity and any other
account is the anonymous token. With no token and no session, the caller is
the anonymous token. With ACLs disabled every caller may do everything.

Views declare the ACL question per action in `acl` (`MeshPermission` asks
it before the action runs); questions that depend on the validated body are
asked in the view with `require()`. List results are restricted with the
`registry.domain.inventory.visible_*` helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from registry.acl_rules import Authorizer
from registry.domain.acl import Identity, resolve_token, secret_from_request
from registry.errors import MeshError

_ACLS_DISABLED = Identity("", Authorizer.management(), "ACLs disabled")


class MeshUser:
    """`request.user` for a token caller: enough of a user for DRF and its templates."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.username = identity.accessor_id or "anonymous"

    def __str__(self) -> str:
        return f"token {self.username}"


def request_token(request: Any) -> str:
    """The secret a request carries, in `/v1`'s order of precedence."""
    return secret_from_request(request)


class MeshTokenAuthentication(BaseAuthentication):
    """Token callers; requests without a token fall through to session auth."""

    def authenticate(self, request: Request) -> tuple[MeshUser, Identity] | None:
        secret = request_token(request._request)
        if not secret:
            return None
        try:
            identity = resolve_token(secret)
        except MeshError as exc:
            # A DRF exception, so DRF marks the request unauthenticated before
            # rendering the error (the browsable renderer reads request.user).
            raise exceptions.PermissionDenied(exc.message) from None
        return MeshUser(identity), identity


def identity_for_user(user: Any) -> Identity:
    """The identity of a Django user logged in to the UI.

    For now staff and superusers manage everything and other users are the
    anonymous token; per-user tokens (`ACLToken.user`) will refine this.
    """
    if user.is_staff or user.is_superuser:
        return Identity(f"user:{user.get_username()}", Authorizer.management(), "UI user")
    return resolve_token(None)


def identity_of(request: Request) -> Identity:
    """The caller's identity (cached on the request)."""
    cached = getattr(request, "_mesh_identity", None)
    if cached is not None:
        return cached
    if not settings.MESH_ACL_ENABLED:
        identity = _ACLS_DISABLED
    elif isinstance(request.auth, Identity):
        identity = request.auth
    elif request.user is not None and getattr(request.user, "is_authenticated", False):
        identity = identity_for_user(request.user)
    else:
        identity = resolve_token(None)
    request._mesh_identity = identity
    return identity


def authz_of(request: Request) -> Authorizer:
    return identity_of(request).authorizer


def require(request: Request, permission: str, resource: str | None = None) -> None:
    """Refuse (403) unless the caller has `permission` ("service:write") on `resource`."""
    check = getattr(authz_of(request), permission.replace(":", "_"))
    allowed = check(resource) if resource is not None else check()
    if not allowed:
        accessor = identity_of(request).accessor_id
        detail = (
            f"Permission denied: token with AccessorID '{accessor}' lacks permission '{permission}'"
        )
        if resource:
            detail += f' on "{resource}"'
        raise exceptions.PermissionDenied(detail)


@dataclass(frozen=True)
class Need:
    """An ACL question: `permission` on the resource `resource(request, view)` names."""

    permission: str
    resource: Callable[[Request, Any], str] | None = None


def kwarg(name: str) -> Callable[[Request, Any], str]:
    """The resource named by a URL keyword (`/api/kv/<key>` -> `key`)."""
    return lambda request, view: view.kwargs.get(name, "")


class MeshPermission(BasePermission):
    """Asks the view's `acl[action]` question; actions without one are open
    (their results are restricted to what the caller may read)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        identity_of(request)  # resolve once, early: a bad session/anonymous setup fails here
        action = getattr(view, "action", None) or (request.method or "get").lower()
        need = getattr(view, "acl", {}).get(action)
        if need is not None:
            resource = need.resource(request, view) if need.resource else None
            require(request, need.permission, resource)
        return True
