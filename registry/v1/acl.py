"""`/v1/acl/...`: bootstrap, tokens, policies and roles, as Consul's ACL HTTP API.

Every endpoint answers 401 "ACL support disabled" while ACLs are off. All but
bootstrap and token/self need acl:read (reads) or acl:write (writes). Reads
are blocking-capable on the `acl` topic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.urls import path

from registry import topics as topic
from registry.decode import Anything, Bool, ListOf, Seconds, Str, Struct
from registry.domain import acl
from registry.errors import BadRequest, MeshError
from registry.v1.base import Ctx, Reply, endpoint

POLICY_LINK = Struct({"ID": Str, "Name": Str})
ROLE_LINK = Struct({"ID": Str, "Name": Str})
SERVICE_IDENTITY = Struct({"ServiceName": Str, "Datacenters": ListOf(Str)})
NODE_IDENTITY = Struct({"NodeName": Str, "Datacenter": Str})
TOKEN = Struct(
    {
        "AccessorID": Str,
        "SecretID": Str,
        "Description": Str,
        "Policies": ListOf(POLICY_LINK),
        "Local": Bool,
        "ExpirationTime": Str,
        "ExpirationTTL": Seconds,
        "Roles": ListOf(ROLE_LINK),
        # Not supported here; refused when non-empty rather than silently dropped.
        "ServiceIdentities": ListOf(Anything),
        "NodeIdentities": ListOf(Anything),
        "TemplatedPolicies": ListOf(Anything),
        "AuthMethod": Str,
        "Rules": Str,
        "Type": Str,
    }
)
POLICY = Struct(
    {"ID": Str, "Name": Str, "Description": Str, "Rules": Str, "Datacenters": ListOf(Str)}
)
ROLE = Struct(
    {
        "ID": Str,
        "Name": Str,
        "Description": Str,
        "Policies": ListOf(POLICY_LINK),
        "ServiceIdentities": ListOf(SERVICE_IDENTITY),
        "NodeIdentities": ListOf(NODE_IDENTITY),
        # Consul's templated policies are not supported; refused when non-empty.
        "TemplatedPolicies": ListOf(Anything),
    }
)
BOOTSTRAP = Struct({"BootstrapSecret": Str})


def _acl_topics(ctx: Ctx, **_):
    return [topic.ACL], []


def _read(ctx: Ctx) -> int:
    """Common preamble of ACL reads: enabled, acl:read, and the index to answer with."""
    acl.ensure_enabled()
    ctx.require(ctx.authz.acl_read(), "acl:read")
    return acl.acl_index()


def _write(ctx: Ctx) -> None:
    acl.ensure_enabled()
    ctx.require(ctx.authz.acl_write(), "acl:write")


def _with_index(exc: MeshError, index: int) -> MeshError:
    exc.index = index  # type: ignore[attr-defined]  # read by base._blocking for X-Consul-Index
    return exc


def _read_one(ctx: Ctx, found: Callable[[], dict]) -> Reply:
    """An ACL read of one object; a miss (404) still carries the ACL index."""
    index = _read(ctx)
    try:
        return Reply(found(), index)
    except MeshError as exc:
        raise _with_index(exc, index) from None


def _token_args(spec: dict, *, create: bool) -> dict:
    """Map a decoded token body to `acl.create_token` / `acl.update_token` arguments."""
    for field, what in (
        ("ServiceIdentities", "Service identities"),
        ("NodeIdentities", "Node identities"),
        ("TemplatedPolicies", "Templated policies"),
    ):
        if spec.get(field):
            raise BadRequest(
                f"{what} on tokens are not supported; link a role that has them instead"
            )
    if spec.get("Rules"):
        raise BadRequest("Rules cannot be specified for this token")
    if spec.get("Type"):
        raise BadRequest("Type cannot be specified for this token")
    if spec.get("AuthMethod"):
        raise BadRequest("AuthMethod field is disallowed outside of login")
    args = {
        "description": spec.get("Description", ""),
        "policies": spec.get("Policies", []),
        "roles": spec.get("Roles", []),
        "secret_id": spec.get("SecretID", ""),
        "expiration_ttl": spec.get("ExpirationTTL", 0.0),
        "expiration_time": (
            acl.parse_time(spec["ExpirationTime"]) if spec.get("ExpirationTime") else None
        ),
        "local": spec.get("Local", False if create else None),
    }
    if create:
        args["accessor_id"] = spec.get("AccessorID", "")
    return args


# -- bootstrap ------------------------------------------------------------------------


@endpoint("PUT")
def bootstrap(ctx: Ctx) -> Reply:
    acl.ensure_enabled()
    body = ctx.json(BOOTSTRAP, required=False)
    token, secret = acl.bootstrap(body.get("BootstrapSecret") or None)
    # Consul adds the legacy `ID` (the secret) beside the token's fields.
    return Reply({"ID": secret, **acl.token_json(token, secret=secret)})


# -- tokens ---------------------------------------------------------------------------


@endpoint("PUT")
def token_create(ctx: Ctx) -> Reply:
    _write(ctx)
    spec = ctx.json(TOKEN, required=False)
    token, secret = acl.create_token(**_token_args(spec, create=True))
    return Reply(acl.token_json(token, secret=secret))


@endpoint("GET", "PUT", "DELETE", topics=_acl_topics)
def token(ctx: Ctx, accessor_id: str) -> Reply:
    if ctx.method == "GET":
        return _read_one(ctx, lambda: acl.token_json(acl.get_token(accessor_id)))
    _write(ctx)
    if ctx.method == "DELETE":
        return Reply(acl.delete_token(accessor_id, caller_accessor=ctx.identity.accessor_id))
    spec = ctx.json(TOKEN, required=False)
    if spec.get("AccessorID") and spec["AccessorID"] != accessor_id:
        raise BadRequest("Token Accessor ID in URL and payload do not match")
    updated = acl.update_token(accessor_id, **_token_args(spec, create=False))
    # A caller who sent the (matching) secret may see it again.
    return Reply(acl.token_json(updated, secret=spec.get("SecretID") or None))


@endpoint("GET", topics=_acl_topics)
def token_self(ctx: Ctx) -> Reply:
    """The caller's own token: no ACL needed beyond holding its secret."""
    acl.ensure_enabled()
    ctx.identity  # noqa: B018 - resolves the token: unknown or expired -> 403 "ACL not found"
    index = acl.acl_index()
    try:
        found = acl.get_token_by_secret(ctx.token)
    except MeshError as exc:
        raise _with_index(exc, index) from None
    return Reply(acl.token_json(found, secret=ctx.token or acl.ANONYMOUS_SECRET), index)


@endpoint("GET", topics=_acl_topics)
def tokens(ctx: Ctx) -> Reply:
    index = _read(ctx)
    # Auth methods and token service identities do not exist here: no token matches them.
    if ctx.param("authmethod") or ctx.param("servicename"):
        return Reply([], index, filterable=True)
    rows = acl.list_tokens(policy=ctx.param("policy"), role=ctx.param("role"))
    return Reply([acl.token_json(t) for t in rows], index, filterable=True)


@endpoint("PUT")
def token_clone(ctx: Ctx, accessor_id: str) -> Reply:
    _write(ctx)
    spec = ctx.json(TOKEN, required=False)
    cloned, secret = acl.clone_token(accessor_id, description=spec.get("Description", ""))
    return Reply(acl.token_json(cloned, secret=secret))


# -- policies and roles: one shape of endpoints for both ------------------------------


@dataclass(frozen=True)
class _Objects:
    """How `/v1/acl/policy...` and `/v1/acl/role...` differ: body, wording, domain calls."""

    noun: str
    schema: Struct
    args: Callable[[dict], dict]
    create: Callable[..., Any]
    update: Callable[..., Any]
    delete: Callable[[str], bool]
    get: Callable[[str], Any]
    to_json: Callable[[Any], dict]


def _create(ctx: Ctx, kind: _Objects) -> Reply:
    _write(ctx)
    spec = ctx.json(kind.schema)
    if spec.get("ID"):
        raise BadRequest(f"Cannot specify the ID when creating a new {kind.noun}")
    return Reply(kind.to_json(kind.create(**kind.args(spec))))


def _one(ctx: Ctx, kind: _Objects, obj_id: str) -> Reply:
    """GET, PUT or DELETE one policy or role by ID."""
    if ctx.method == "GET":
        return _read_one(ctx, lambda: kind.to_json(kind.get(obj_id)))
    _write(ctx)
    if ctx.method == "DELETE":
        return Reply(kind.delete(obj_id))
    spec = ctx.json(kind.schema)
    if spec.get("ID") and spec["ID"] != obj_id:
        raise BadRequest(f"{kind.noun.capitalize()} ID in URL and payload do not match")
    return Reply(kind.to_json(kind.update(obj_id, **kind.args(spec))))


# -- policies -------------------------------------------------------------------------


def _policy_args(spec: dict) -> dict:
    return {
        "name": spec.get("Name", ""),
        "description": spec.get("Description", ""),
        "rules": spec.get("Rules", ""),
        "datacenters": spec.get("Datacenters", []),
    }


POLICIES = _Objects(
    noun="policy",
    schema=POLICY,
    args=_policy_args,
    create=acl.create_policy,
    update=acl.update_policy,
    delete=acl.delete_policy,
    get=acl.get_policy,
    to_json=acl.policy_json,
)


@endpoint("PUT")
def policy_create(ctx: Ctx) -> Reply:
    return _create(ctx, POLICIES)


@endpoint("GET", "PUT", "DELETE", topics=_acl_topics)
def policy(ctx: Ctx, policy_id: str) -> Reply:
    return _one(ctx, POLICIES, policy_id)


@endpoint("GET", topics=_acl_topics)
def policy_by_name(ctx: Ctx, name: str) -> Reply:
    return _read_one(ctx, lambda: acl.policy_json(acl.get_policy_by_name(name)))


@endpoint("GET", topics=_acl_topics)
def policies(ctx: Ctx) -> Reply:
    index = _read(ctx)
    return Reply(
        [acl.policy_json(p, stub=True) for p in acl.list_policies()], index, filterable=True
    )


# -- roles ----------------------------------------------------------------------------


def _role_args(spec: dict) -> dict:
    if spec.get("TemplatedPolicies"):
        raise BadRequest("Templated policies are not supported; use service identities")
    return {
        "name": spec.get("Name", ""),
        "description": spec.get("Description", ""),
        "policies": spec.get("Policies", []),
        "service_identities": spec.get("ServiceIdentities", []),
        "node_identities": spec.get("NodeIdentities", []),
    }


ROLES = _Objects(
    noun="role",
    schema=ROLE,
    args=_role_args,
    create=acl.create_role,
    update=acl.update_role,
    delete=acl.delete_role,
    get=acl.get_role,
    to_json=acl.role_json,
)


@endpoint("PUT")
def role_create(ctx: Ctx) -> Reply:
    return _create(ctx, ROLES)


@endpoint("GET", "PUT", "DELETE", topics=_acl_topics)
def role(ctx: Ctx, role_id: str) -> Reply:
    return _one(ctx, ROLES, role_id)


@endpoint("GET", topics=_acl_topics)
def role_by_name(ctx: Ctx, name: str) -> Reply:
    return _read_one(ctx, lambda: acl.role_json(acl.get_role_by_name(name)))


@endpoint("GET", topics=_acl_topics)
def roles(ctx: Ctx) -> Reply:
    index = _read(ctx)
    rows = acl.list_roles(policy=ctx.param("policy"))
    return Reply([acl.role_json(r) for r in rows], index, filterable=True)


urlpatterns = [
    path("acl/bootstrap", bootstrap),
    path("acl/token", token_create),
    path("acl/token/self", token_self),
    path("acl/token/<str:accessor_id>/clone", token_clone),
    path("acl/token/<str:accessor_id>", token),
    path("acl/tokens", tokens),
    path("acl/policy", policy_create),
    path("acl/policy/name/<str:name>", policy_by_name),
    path("acl/policy/<str:policy_id>", policy),
    path("acl/policies", policies),
    path("acl/role", role_create),
    path("acl/role/name/<str:name>", role_by_name),
    path("acl/role/<str:role_id>", role),
    path("acl/roles", roles),
]
