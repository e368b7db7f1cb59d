"""ACL tokens, policies and roles, and resolving a request's token to an authorizer.

Token secrets are stored as SHA-256 digests: a secret is shown once, when
its token is created, cloned or bootstrapped, and never again (reads answer
`"SecretID": "<hidden>"`, which is also what Consul shows a caller without
acl:write). Resolved tokens are cached per process until any ACL write bumps
the `acl` topic (or the token expires).

The functions below are the one home of the ACL rules that Consul's ACL
endpoints enforce (names, UUIDs, reserved IDs, expiration bounds, the builtin
policy and the anonymous token); `/v1/acl/...`, the REST API and the CLI call
them and shape the rows with `token_json` / `policy_json` / `role_json`. Every
write is one `Change` touching the `acl` topic.

A token's effective rules are built in one place, `token_authorizer`: its
own policies, its roles' policies, and the templated rules of its roles'
service and node identities (Consul's).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets as _secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote_plus

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from registry import topics as topic
from registry.acl_rules import Authorizer, RulesError, parse_rules
from registry.decode import format_duration
from registry.errors import BadRequest, MeshError, NotFound, PermissionDenied
from registry.models import ACLPolicy, ACLRole, ACLToken
from registry.models.acl import ANONYMOUS_TOKEN_ACCESSOR, GLOBAL_MANAGEMENT_POLICY_ID
from registry.txn import Change, topic_index

ANONYMOUS_SECRET = "anonymous"
GLOBAL_MANAGEMENT_NAME = "global-management"
HIDDEN_SECRET = "<hidden>"
# Consul reserves every UUID that starts like its builtin IDs.
RESERVED_PREFIX = "00000000-0000-0000-0000-0000000000"
# What Consul's builtin global-management policy shows; the authorizer grants
# management by the policy's ID, so this text is informative.
GLOBAL_MANAGEMENT_RULES = """acl = "write"
agent_prefix "" {
  policy = "write"
}
event_prefix "" {
  policy = "write"
}
key_prefix "" {
  policy = "write"
}
keyring = "write"
node_prefix "" {
  policy = "write"
}
operator = "write"
mesh = "write"
peering = "write"
query_prefix "" {
  policy = "write"
}
service_prefix "" {
  policy = "write"
  intentions = "write"
}
session_prefix "" {
  policy = "write"
}
"""
_POLICY_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,128}$")
_ROLE_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,256}$")
# Consul's rule for service and node identity names (lower-case DNS-like labels).
_IDENTITY_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class ACLDisabled(MeshError):
    """ACL endpoints answer 401 while ACLs are off, as Consul does."""

    status = 401

    def __init__(self, message: str = "ACL support disabled") -> None:
        super().__init__(message)


def ensure_enabled() -> None:
    """Refuse ACL management while ACLs are disabled (Consul: 401 "ACL support disabled")."""
    if not settings.MESH_ACL_ENABLED:
        raise ACLDisabled()


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Who is calling: a token's accessor and what it may do (until `expires_at`)."""

    accessor_id: str
    authorizer: Authorizer
    description: str = ""
    expires_at: datetime | None = None


_ALLOW_ALL = Identity("", Authorizer.allow_all(), "ACLs disabled")
_cache: dict[str, tuple[int, Identity]] = {}
_cache_lock = threading.Lock()


def default_authorizer() -> Authorizer:
    return (
        Authorizer.allow_all()
        if settings.MESH_ACL_DEFAULT_POLICY == "allow"
        else Authorizer.deny_all()
    )


def resolve_token(secret: str | None) -> Identity:
    """The identity for a secret; the anonymous token for none. Unknown or expired -> 403."""
    if not settings.MESH_ACL_ENABLED:
        return _ALLOW_ALL
    secret = secret or ANONYMOUS_SECRET
    acl_index = topic_index(topic.ACL)
    with _cache_lock:
        hit = _cache.get(secret)
    if hit is not None and hit[0] == acl_index:
        identity = hit[1]
        # Expiry is not an ACL write, so the cached entry must check it itself.
        if identity.expires_at is not None and identity.expires_at <= timezone.now():
            with _cache_lock:
                _cache.pop(secret, None)
            raise PermissionDenied("ACL not found")
        return identity
    identity = _load_identity(secret)
    with _cache_lock:
        if len(_cache) > 10_000:
            _cache.clear()
        _cache[secret] = (acl_index, identity)
    return identity


def _load_identity(secret: str) -> Identity:
    if secret == ANONYMOUS_SECRET:
        token = ACLToken.objects.filter(accessor_id=ANONYMOUS_TOKEN_ACCESSOR).first()
        if token is None:
            return Identity(ANONYMOUS_TOKEN_ACCESSOR, default_authorizer(), "Anonymous Token")
    else:
        token = _tokens().filter(secret_hash=hash_secret(secret)).first()
        if token is None:
            raise PermissionDenied("ACL not found")
    if _expired(token):
        raise PermissionDenied("ACL not found")
    return Identity(
        token.accessor_id, token_authorizer(token), token.description, token.expiration_time
    )


def service_identity_rules(name: str) -> str:
    """Consul's templated policy for a service identity: write the service and its
    sidecar, read every service and node (what discovery needs)."""
    return (
        f'service "{name}" {{\n  policy = "write"\n}}\n'
        f'service "{name}-sidecar-proxy" {{\n  policy = "write"\n}}\n'
        'service_prefix "" {\n  policy = "read"\n}\n'
        'node_prefix "" {\n  policy = "read"\n}\n'
    )


def node_identity_rules(name: str) -> str:
    """Consul's templated policy for a node identity: write the node, read every service."""
    return (
        f'node "{name}" {{\n  policy = "write"\n}}\nservice_prefix "" {{\n  policy = "read"\n}}\n'
    )


def effective_policies(token: ACLToken) -> list[ACLPolicy]:
    """The policies a token holds: its own and its roles', de-duplicated by ID."""
    out: dict[str, ACLPolicy] = {p.id: p for p in token.policies.all()}
    for role in token.roles.all():
        for p in role.policies.all():
            out.setdefault(p.id, p)
    return list(out.values())


def identity_rules(roles: Iterable[ACLRole], here: str) -> list[str]:
    """The templated rules a token's roles grant in datacenter `here`."""
    out: list[str] = []
    for role in roles:
        for ident in role.service_identities or []:
            dcs = ident.get("Datacenters") or []
            if not dcs or here in dcs:
                out.append(service_identity_rules(ident["ServiceName"]))
        for ident in role.node_identities or []:
            if ident.get("Datacenter") == here:
                out.append(node_identity_rules(ident["NodeName"]))
    return out


def token_authorizer(token: ACLToken) -> Authorizer:
    """What a token may do: the one place its effective rules are built (policies,
    roles' policies, roles' service and node identities)."""
    policies = effective_policies(token)
    if any(p.id == GLOBAL_MANAGEMENT_POLICY_ID for p in policies):
        return Authorizer.management()
    # A policy listing datacenters applies only in those (Consul's policy `Datacenters`).
    here = settings.MESH_DC
    rules = [parse_rules(p.rules) for p in policies if not p.datacenters or here in p.datacenters]
    rules += [parse_rules(text) for text in identity_rules(token.roles.all(), here)]
    return Authorizer.from_rules(rules, default=default_authorizer())


def _expired(token: ACLToken, now: datetime | None = None) -> bool:
    return token.expiration_time is not None and token.expiration_time <= (now or timezone.now())


# --- bootstrap ------------------------------------------------------------------------


def _ensure_builtins(change: Change) -> ACLPolicy:
    policy, created = ACLPolicy.objects.get_or_create(
        id=GLOBAL_MANAGEMENT_POLICY_ID,
        defaults={
            "name": GLOBAL_MANAGEMENT_NAME,
            "description": "Builtin Policy that grants unlimited access",
            "rules": GLOBAL_MANAGEMENT_RULES,
            "create_index": change.index,
            "modify_index": change.index,
        },
    )
    if not ACLToken.objects.filter(accessor_id=ANONYMOUS_TOKEN_ACCESSOR).exists():
        ACLToken.objects.create(
            accessor_id=ANONYMOUS_TOKEN_ACCESSOR,
            secret_hash=hash_secret(ANONYMOUS_SECRET),
            description="Anonymous Token",
            create_index=change.index,
            modify_index=change.index,
        )
    change.touch(topic.ACL)
    return policy


def bootstrapped() -> bool:
    return ACLToken.objects.exclude(accessor_id=ANONYMOUS_TOKEN_ACCESSOR).exists()


def bootstrap(secret: str | None = None) -> tuple[ACLToken, str]:
    """Create the first management token (once). Returns the token and its secret.

    `secret` is Consul's optional `BootstrapSecret` (a UUID).
    """
    if secret and not _UUID.match(secret):
        raise BadRequest("Invalid bootstrap secret: BootstrapSecret must be a UUID")
    with Change() as change:
        # Serialise concurrent bootstraps: the global index row lock is held.
        if bootstrapped():
            raise PermissionDenied(f"ACL bootstrap no longer allowed (reset index: {change.index})")
        policy = _ensure_builtins(change)
        secret = secret or str(uuid.uuid4())
        token = _management_token(change, policy, secret, "Bootstrap Token (Global Management)")
    return token, secret


def ensure_initial_management(secret: str) -> bool:
    """Create the management token with a chosen secret on first start (idempotent)."""
    if ACLToken.objects.filter(secret_hash=hash_secret(secret)).exists():
        return False
    with Change() as change:
        policy = _ensure_builtins(change)
        _management_token(change, policy, secret, "Initial Management Token")
    return True


def _management_token(change: Change, policy: ACLPolicy, secret: str, description: str) -> ACLToken:
    """A new token holding the builtin global-management `policy`, with a chosen secret."""
    token = ACLToken.objects.create(
        accessor_id=str(uuid.uuid4()),
        secret_hash=hash_secret(secret),
        description=description,
        create_index=change.index,
        modify_index=change.index,
    )
    token.policies.add(policy)
    return token


def new_secret() -> str:
    return str(uuid.UUID(bytes=_secrets.token_bytes(16), version=4))


# --- times ---------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_time(text: str, field: str = "ExpirationTime") -> datetime:
    """An RFC 3339 timestamp as Go encodes `time.Time` (nanoseconds truncated to µs)."""
    m = _RFC3339.match(text.strip())
    if not m:
        raise BadRequest(f"Request decode failed: {field}: {text!r} is not an RFC 3339 time")
    date, clock, frac, zone = m.groups()
    frac = ((frac or "") + "000000")[:6]
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        return datetime.fromisoformat(f"{date}T{clock}.{frac}{zone}")
    except ValueError:
        raise BadRequest(
            f"Request decode failed: {field}: {text!r} is not an RFC 3339 time"
        ) from None


def format_time(value: datetime) -> str:
    """A time as Go's RFC3339Nano in UTC ("2024-05-01T10:00:00.123Z")."""
    value = value.astimezone(UTC)
    out = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        out += "." + f"{value.microsecond:06d}".rstrip("0")
    return out + "Z"


def _expiration(now: datetime, ttl: float, at: datetime | None) -> datetime | None:
    """Consul's rules for ExpirationTTL / ExpirationTime on a new token."""
    if ttl < 0:
        raise BadRequest(f"Token Expiration TTL '{format_duration(ttl)}' should be > 0")
    if ttl and at is not None:
        raise BadRequest("Token Expiration TTL and Expiration Time cannot both be set")
    low = float(getattr(settings, "MESH_ACL_TOKEN_MIN_EXPIRATION_SECONDS", 60))
    high = float(getattr(settings, "MESH_ACL_TOKEN_MAX_EXPIRATION_SECONDS", 24 * 3600))
    if ttl > high:
        # Refused before any date arithmetic: 1e30 seconds does not fit a timedelta.
        raise BadRequest(
            f"ExpirationTTL cannot be more than {format_duration(high)} (was {ttl:g}s)"
        )
    if ttl:
        at = now + timedelta(seconds=ttl)
    if at is None:
        return None
    if at < now:
        raise BadRequest("ExpirationTime cannot be before CreateTime")
    expires_in = (at - now).total_seconds()
    if expires_in > high:
        raise BadRequest(
            f"ExpirationTime cannot be more than {format_duration(high)} in the future "
            f"(was {format_duration(round(expires_in, 3))})"
        )
    if expires_in < low:
        raise BadRequest(
            f"ExpirationTime cannot be less than {format_duration(low)} in the future "
            f"(was {format_duration(round(expires_in, 3))})"
        )
    return at


# --- tokens --------------------------------------------------------------------------


def _tokens():
    return ACLToken.objects.prefetch_related("policies", "roles", "roles__policies")


def _is_uuid(value: str) -> bool:
    return bool(_UUID.match(value or ""))


def _in_use(value: str) -> bool:
    """Consul refuses an ID already used as any token's accessor or secret."""
    return (
        ACLToken.objects.filter(accessor_id=value).exists()
        or ACLToken.objects.filter(secret_hash=hash_secret(value)).exists()
    )


def _check_new_id(value: str, field: str) -> None:
    if not _is_uuid(value):
        raise BadRequest(f"Invalid Token: {field} is not a valid UUID")
    if value.lower().startswith(RESERVED_PREFIX):
        raise BadRequest(f'Invalid Token: UUIDs with the prefix "{RESERVED_PREFIX}" are reserved')
    if _in_use(value):
        raise BadRequest(f"Invalid Token: {field} is already in use")


def _links(kind: _Kind, links: Iterable[Mapping[str, str]]) -> list:
    """Resolve `{"ID": ...}` / `{"Name": ...}` links to rows of `kind`, de-duplicated by ID."""
    out: dict[str, Any] = {}
    for link in links:
        obj_id, name = link.get("ID") or "", link.get("Name") or ""
        if kind.link_needs_id_or_name and not obj_id and not name:
            raise BadRequest(f"{kind.title} links must give the {kind.noun}'s ID or Name")
        if obj_id:
            row = kind.model.objects.filter(id=obj_id).first()
            if row is None:
                raise BadRequest(f'No such ACL {kind.noun} with ID "{obj_id}"')
        else:
            row = kind.model.objects.filter(name=name).first()
            if row is None:
                raise BadRequest(f'No such ACL {kind.noun} with name "{name}"')
        out.setdefault(row.id, row)
    return list(out.values())


def _reload(accessor_id: str) -> ACLToken:
    return _tokens().get(accessor_id=accessor_id)


def create_token(
    *,
    description: str = "",
    policies: Iterable[Mapping[str, str]] = (),
    roles: Iterable[Mapping[str, str]] = (),
    local: bool = False,
    accessor_id: str = "",
    secret_id: str = "",
    expiration_ttl: float = 0.0,
    expiration_time: datetime | None = None,
) -> tuple[ACLToken, str]:
    """Create a token (Consul's `PUT /v1/acl/token`). Returns the row and its secret.

    The caller may choose the AccessorID and SecretID (UUIDs, unused, not in
    Consul's reserved range); otherwise they are generated.
    """
    with Change() as change:
        if accessor_id:
            _check_new_id(accessor_id, "AccessorID")
        else:
            accessor_id = str(uuid.uuid4())
        if secret_id:
            _check_new_id(secret_id, "SecretID")
            if secret_id == accessor_id:
                raise BadRequest("Invalid Token: SecretID is already in use")
        else:
            secret_id = new_secret()
        expires = _expiration(timezone.now(), expiration_ttl, expiration_time)
        linked = _links(POLICIES, policies)
        linked_roles = _links(ROLES, roles)
        token = ACLToken.objects.create(
            accessor_id=accessor_id,
            secret_hash=hash_secret(secret_id),
            description=description,
            local=local,
            expiration_time=expires,
            create_index=change.index,
            modify_index=change.index,
        )
        token.policies.set(linked)
        token.roles.set(linked_roles)
        change.touch(topic.ACL)
    return _reload(token.accessor_id), secret_id


def update_token(
    accessor_id: str,
    *,
    description: str = "",
    policies: Iterable[Mapping[str, str]] = (),
    roles: Iterable[Mapping[str, str]] = (),
    local: bool | None = None,
    secret_id: str = "",
    expiration_ttl: float = 0.0,
    expiration_time: datetime | None = None,
) -> ACLToken:
    """Replace a token's description, policies and roles (Consul's `PUT /v1/acl/token/:id`).

    As in Consul the secret, locality and expiry cannot change: giving them is
    allowed only when they match. `local=None` keeps the token's locality.
    """
    if not _is_uuid(accessor_id):
        raise BadRequest("AccessorID is not a valid UUID")
    with Change() as change:
        token = ACLToken.objects.filter(accessor_id=accessor_id).first()
        if token is None or _expired(token):
            raise NotFound(f'Cannot find token "{accessor_id}"')
        if secret_id and hash_secret(secret_id) != token.secret_hash:
            raise BadRequest("Changing a token's SecretID is not permitted")
        if local is not None and local != token.local:
            raise BadRequest(f"Cannot toggle local mode of {accessor_id}")
        if expiration_ttl:
            raise BadRequest(f"Cannot change expiration time of {accessor_id}")
        if expiration_time is not None and expiration_time != token.expiration_time:
            raise BadRequest(f"Cannot change expiration time of {accessor_id}")
        linked = _links(POLICIES, policies)
        linked_roles = _links(ROLES, roles)
        token.description = description
        token.modify_index = change.index
        token.save(update_fields=["description", "modify_index"])
        token.policies.set(linked)
        token.roles.set(linked_roles)
        change.touch(topic.ACL)
    return _reload(accessor_id)


def delete_token(accessor_id: str, *, caller_accessor: str = "") -> bool:
    """Delete a token; deleting one that does not exist succeeds, as in Consul.

    The anonymous token and the caller's own token cannot be deleted.
    """
    if not _is_uuid(accessor_id):
        raise BadRequest("Accessor ID is missing or an invalid UUID")
    if accessor_id == ANONYMOUS_TOKEN_ACCESSOR:
        raise BadRequest("Delete operation not permitted on the anonymous token")
    if caller_accessor and accessor_id == caller_accessor:
        raise BadRequest("Deletion of the request's authorization token is not permitted")
    if not ACLToken.objects.filter(accessor_id=accessor_id).exists():
        return True
    with Change() as change:
        ACLToken.objects.filter(accessor_id=accessor_id).delete()
        change.touch(topic.ACL)
    return True


def clone_token(accessor_id: str, *, description: str = "") -> tuple[ACLToken, str]:
    """A new token (new accessor and secret) with the same policies, locality and expiry."""
    with Change() as change:
        source = _tokens().filter(accessor_id=accessor_id).first()
        if source is None or _expired(source):
            raise NotFound(f'Cannot find token "{accessor_id}"')
        secret = new_secret()
        token = ACLToken.objects.create(
            accessor_id=str(uuid.uuid4()),
            secret_hash=hash_secret(secret),
            description=description or source.description,
            local=source.local,
            expiration_time=source.expiration_time,
            create_index=change.index,
            modify_index=change.index,
        )
        token.policies.set(list(source.policies.all()))
        token.roles.set(list(source.roles.all()))
        change.touch(topic.ACL)
    return _reload(token.accessor_id), secret


def get_token(accessor_id: str) -> ACLToken:
    """A live token by accessor; expired tokens do not exist (404), as in Consul."""
    token = _tokens().filter(accessor_id=accessor_id).first()
    if token is None or _expired(token):
        raise NotFound("ACL not found: requested token does not exist")
    return token


def get_token_by_secret(secret: str | None) -> ACLToken:
    """The live token a secret belongs to (no secret: the anonymous token)."""
    secret = secret or ANONYMOUS_SECRET
    token = _tokens().filter(secret_hash=hash_secret(secret)).first()
    if token is None or _expired(token):
        raise NotFound("Supplied token does not exist")
    return token


def list_tokens(policy: str = "", role: str = "") -> list[ACLToken]:
    """Live tokens by accessor ID (Consul's order), optionally those linking policy ID
    `policy` or role ID `role`."""
    query = _tokens()
    if policy:
        query = query.filter(policies__id=policy)
    if role:
        query = query.filter(roles__id=role)
    now = timezone.now()
    return [t for t in query.order_by("accessor_id") if not _expired(t, now)]


# --- policies and roles: what the two kinds share -------------------------------------


@dataclass(frozen=True)
class _Kind:
    """What tells ACL policies and roles apart in the lookups, checks and writes they share.

    `link_needs_id_or_name` and the two duplicate-name messages keep Consul's
    own wording, which differs between the kinds.
    """

    model: type[ACLPolicy] | type[ACLRole]
    noun: str
    name_pattern: re.Pattern[str]
    name_taken: str
    name_taken_on_update: str
    link_needs_id_or_name: bool
    rows: Callable[[], QuerySet]

    @property
    def title(self) -> str:
        return self.noun.capitalize()


POLICIES = _Kind(
    model=ACLPolicy,
    noun="policy",
    name_pattern=_POLICY_NAME,
    name_taken='Invalid Policy: A Policy with Name "{name}" already exists',
    name_taken_on_update='Invalid Policy: A policy with name "{name}" already exists',
    link_needs_id_or_name=False,
    rows=lambda: ACLPolicy.objects.all(),
)
ROLES = _Kind(
    model=ACLRole,
    noun="role",
    name_pattern=_ROLE_NAME,
    name_taken='Invalid Role: A Role with Name "{name}" already exists',
    name_taken_on_update='Invalid Role: A Role with Name "{name}" already exists',
    link_needs_id_or_name=True,
    rows=lambda: ACLRole.objects.prefetch_related("policies"),
)


def _validate_name(kind: _Kind, name: str) -> None:
    if not name:
        raise BadRequest(f"Invalid {kind.title}: no Name is set")
    if not kind.name_pattern.match(name):
        raise BadRequest(
            f"Invalid {kind.title}: invalid Name. "
            "Only alphanumeric characters, '-' and '_' are allowed"
        )


def _check_id(kind: _Kind, obj_id: str) -> None:
    if not _is_uuid(obj_id):
        raise BadRequest(f"{kind.title} ID invalid UUID")


def _create(
    kind: _Kind, name: str, fields: Mapping[str, Any], policies: Iterable[Mapping[str, str]] | None
) -> Any:
    """Create a row of `kind` under a unique name; `policies` (roles only) are its links."""
    with Change() as change:
        if kind.model.objects.filter(name=name).exists():
            raise BadRequest(kind.name_taken.format(name=name))
        linked = _links(POLICIES, policies) if policies is not None else None
        row = kind.model.objects.create(
            id=str(uuid.uuid4()),
            name=name,
            create_index=change.index,
            modify_index=change.index,
            **fields,
        )
        if linked is not None:
            row.policies.set(linked)
        change.touch(topic.ACL)
    return row


def _update(
    kind: _Kind,
    obj_id: str,
    name: str,
    fields: Mapping[str, Any],
    policies: Iterable[Mapping[str, str]] | None,
    guard: Callable[[Any], None] | None = None,
) -> Any:
    """Replace the fields of an existing row of `kind`; `guard` may refuse the change."""
    with Change() as change:
        row = kind.model.objects.filter(id=obj_id).first()
        if row is None:
            raise NotFound(f"Cannot find {kind.noun} {obj_id}")
        if name != row.name and kind.model.objects.filter(name=name).exists():
            raise BadRequest(kind.name_taken_on_update.format(name=name))
        if guard is not None:
            guard(row)
        linked = _links(POLICIES, policies) if policies is not None else None
        row.name = name
        for field_name, value in fields.items():
            setattr(row, field_name, value)
        row.modify_index = change.index
        row.save()
        if linked is not None:
            row.policies.set(linked)
        change.touch(topic.ACL)
    return row


def _delete(kind: _Kind, obj_id: str) -> bool:
    """Delete a row (its links from tokens go with it); a missing one succeeds, as in Consul."""
    if not kind.model.objects.filter(id=obj_id).exists():
        return True
    with Change() as change:
        kind.model.objects.filter(id=obj_id).delete()
        change.touch(topic.ACL)
    return True


def _get(kind: _Kind, **lookup: str) -> Any:
    row = kind.rows().filter(**lookup).first()
    if row is None:
        raise NotFound(f"ACL not found: requested {kind.noun} does not exist")
    return row


# --- policies ------------------------------------------------------------------------


def _validate_policy(name: str, rules: str, datacenters: Iterable[str]) -> None:
    _validate_name(POLICIES, name)
    if any(not dc for dc in datacenters):
        raise BadRequest("Invalid Policy: Datacenters must not contain an empty name")
    try:
        parse_rules(rules)
    except RulesError as exc:
        raise BadRequest(str(exc)) from None


def create_policy(
    *, name: str, description: str = "", rules: str = "", datacenters: Iterable[str] = ()
) -> ACLPolicy:
    """Create a policy (Consul's `PUT /v1/acl/policy`); names are unique."""
    datacenters = list(datacenters)
    _validate_policy(name, rules, datacenters)
    fields = {"description": description, "rules": rules, "datacenters": datacenters}
    return _create(POLICIES, name, fields, None)


def update_policy(
    policy_id: str,
    *,
    name: str,
    description: str = "",
    rules: str = "",
    datacenters: Iterable[str] = (),
) -> ACLPolicy:
    """Replace a policy's fields (Consul's `PUT /v1/acl/policy/:id`).

    The builtin global-management policy keeps its rules and datacenters
    (it may be renamed or described, as in Consul).
    """
    datacenters = list(datacenters)
    _check_id(POLICIES, policy_id)
    _validate_policy(name, rules, datacenters)

    def keep_builtin(policy: ACLPolicy) -> None:
        if policy.id != GLOBAL_MANAGEMENT_POLICY_ID:
            return
        if datacenters:
            raise BadRequest(
                "Changing the Datacenters of the builtin global-management policy is not permitted"
            )
        if rules != policy.rules:
            raise BadRequest(
                "Changing the Rules for the builtin global-management policy is not permitted"
            )

    fields = {"description": description, "rules": rules, "datacenters": datacenters}
    return _update(POLICIES, policy_id, name, fields, None, guard=keep_builtin)


def delete_policy(policy_id: str) -> bool:
    """Delete a policy (its links from tokens go with it); a missing one succeeds, as in Consul."""
    if policy_id == GLOBAL_MANAGEMENT_POLICY_ID:
        raise BadRequest("Delete operation not permitted on the builtin global-management policy")
    return _delete(POLICIES, policy_id)


def get_policy(policy_id: str) -> ACLPolicy:
    return _get(POLICIES, id=policy_id)


def get_policy_by_name(name: str) -> ACLPolicy:
    return _get(POLICIES, name=name)


def list_policies() -> list[ACLPolicy]:
    """Every policy, by ID (Consul's order: the builtin one first)."""
    return list(POLICIES.rows().order_by("id"))


# --- roles ---------------------------------------------------------------------------


def _service_identities(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check Consul's `ServiceIdentities` and store them in its shape (de-duplicated)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name = (item.get("ServiceName") or "").strip()
        if not name:
            raise BadRequest("Invalid Role: Service identity is missing the service name field")
        if len(name) > 256 or not _IDENTITY_NAME.match(name):
            raise BadRequest(f"Invalid Role: Service identity has an invalid name: {name!r}")
        dcs = [str(dc) for dc in item.get("Datacenters") or []]
        if any(not dc for dc in dcs):
            raise BadRequest("Invalid Role: Service identity Datacenters must not be empty names")
        entry = out.setdefault(name, {"ServiceName": name})
        if dcs:
            entry["Datacenters"] = sorted({*entry.get("Datacenters", []), *dcs})
    return list(out.values())


def _node_identities(items: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Check Consul's `NodeIdentities` (name and datacenter both required)."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for item in items:
        name = (item.get("NodeName") or "").strip()
        dc = (item.get("Datacenter") or "").strip()
        if not name:
            raise BadRequest("Invalid Role: Node identity is missing the node name field")
        if len(name) > 256 or not _IDENTITY_NAME.match(name):
            raise BadRequest(f"Invalid Role: Node identity has an invalid name: {name!r}")
        if not dc:
            raise BadRequest("Invalid Role: Node identity is missing the datacenter field")
        out.setdefault((name, dc), {"NodeName": name, "Datacenter": dc})
    return list(out.values())


def _role_fields(
    name: str,
    description: str,
    service_identities: Iterable[Mapping[str, Any]],
    node_identities: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """A role's checked fields (the name is checked, not returned)."""
    _validate_name(ROLES, name)
    return {
        "description": description,
        "service_identities": _service_identities(service_identities),
        "node_identities": _node_identities(node_identities),
    }


def create_role(
    *,
    name: str,
    description: str = "",
    policies: Iterable[Mapping[str, str]] = (),
    service_identities: Iterable[Mapping[str, Any]] = (),
    node_identities: Iterable[Mapping[str, Any]] = (),
) -> ACLRole:
    """Create a role (Consul's `PUT /v1/acl/role`); names are unique."""
    fields = _role_fields(name, description, service_identities, node_identities)
    return get_role(_create(ROLES, name, fields, policies).id)


def update_role(
    role_id: str,
    *,
    name: str,
    description: str = "",
    policies: Iterable[Mapping[str, str]] = (),
    service_identities: Iterable[Mapping[str, Any]] = (),
    node_identities: Iterable[Mapping[str, Any]] = (),
) -> ACLRole:
    """Replace a role's fields (Consul's `PUT /v1/acl/role/:id`); its tokens follow at once."""
    _check_id(ROLES, role_id)
    fields = _role_fields(name, description, service_identities, node_identities)
    _update(ROLES, role_id, name, fields, policies)
    return get_role(role_id)


def delete_role(role_id: str) -> bool:
    """Delete a role (its links from tokens go with it); a missing one succeeds, as in Consul."""
    return _delete(ROLES, role_id)


def get_role(role_id: str) -> ACLRole:
    return _get(ROLES, id=role_id)


def get_role_by_name(name: str) -> ACLRole:
    return _get(ROLES, name=name)


def list_roles(policy: str = "") -> list[ACLRole]:
    """Every role by ID (Consul's order), optionally those linking policy ID `policy`."""
    query = ROLES.rows()
    if policy:
        query = query.filter(policies__id=policy)
    return list(query.order_by("id"))


def acl_index() -> int:
    """The X-Consul-Index of ACL reads."""
    return topic_index(topic.ACL)


# --- Consul's JSON shapes ------------------------------------------------------------


def _hash(*parts: Any) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return base64.b64encode(digest).decode()


def token_json(token: ACLToken, *, secret: str | None = None) -> dict[str, Any]:
    """A token as Consul's API shows it; the secret only when the caller has it."""
    policies = sorted(token.policies.all(), key=lambda p: p.id)
    out: dict[str, Any] = {
        "AccessorID": token.accessor_id,
        "SecretID": secret if secret else HIDDEN_SECRET,
        "Description": token.description,
    }
    if policies:
        out["Policies"] = [{"ID": p.id, "Name": p.name} for p in policies]
    roles = sorted(token.roles.all(), key=lambda r: r.id)
    if roles:
        out["Roles"] = [{"ID": r.id, "Name": r.name} for r in roles]
    out["Local"] = token.local
    if token.expiration_time is not None:
        out["ExpirationTime"] = format_time(token.expiration_time)
    out["CreateTime"] = format_time(token.create_time)
    out["Hash"] = _hash(
        token.secret_hash,
        token.description,
        [p.id for p in policies],
        [r.id for r in roles],
        token.local,
        out.get("ExpirationTime"),
    )
    out["CreateIndex"] = token.create_index
    out["ModifyIndex"] = token.modify_index
    return out


def policy_json(policy: ACLPolicy, *, stub: bool = False) -> dict[str, Any]:
    """A policy as Consul's API shows it; `stub` leaves out Rules (the list shape)."""
    out: dict[str, Any] = {
        "ID": policy.id,
        "Name": policy.name,
        "Description": policy.description,
    }
    if not stub:
        out["Rules"] = policy.rules
    out["Datacenters"] = list(policy.datacenters or []) or None
    out["Hash"] = _hash(policy.name, policy.description, policy.rules, policy.datacenters)
    out["CreateIndex"] = policy.create_index
    out["ModifyIndex"] = policy.modify_index
    return out


def role_json(role: ACLRole) -> dict[str, Any]:
    """A role as Consul's API shows it (empty lists left out, as Consul's `omitempty`)."""
    policies = sorted(role.policies.all(), key=lambda p: p.id)
    out: dict[str, Any] = {"ID": role.id, "Name": role.name, "Description": role.description}
    if policies:
        out["Policies"] = [{"ID": p.id, "Name": p.name} for p in policies]
    if role.service_identities:
        out["ServiceIdentities"] = [dict(i) for i in role.service_identities]
    if role.node_identities:
        out["NodeIdentities"] = [dict(i) for i in role.node_identities]
    out["Hash"] = _hash(
        role.name,
        role.description,
        [p.id for p in policies],
        role.service_identities,
        role.node_identities,
    )
    out["CreateIndex"] = role.create_index
    out["ModifyIndex"] = role.modify_index
    return out


__all__ = [
    "ACLDisabled",
    "Identity",
    "RulesError",
    "bootstrap",
    "bootstrapped",
    "clone_token",
    "create_policy",
    "create_role",
    "create_token",
    "delete_policy",
    "delete_role",
    "delete_token",
    "ensure_enabled",
    "ensure_initial_management",
    "get_policy",
    "get_policy_by_name",
    "get_role",
    "get_role_by_name",
    "get_token",
    "get_token_by_secret",
    "hash_secret",
    "list_policies",
    "list_roles",
    "list_tokens",
    "policy_json",
    "resolve_token",
    "role_json",
    "token_json",
    "update_policy",
    "update_role",
    "update_token",
]


def allowed(authz: Authorizer, permission: str, resource: str | None = None) -> bool:
    """Ask an authorizer a question spelled as Consul spells it ("service:write", "web")."""
    check = getattr(authz, permission.replace(":", "_"), None)
    if check is None:
        raise ValueError(f"unknown permission {permission!r}")
    return bool(check(resource) if resource is not None else check())


TOKEN_PARAM = "token"


def secret_from_request(request: Any) -> str:
    """The token a request carries: `X-Consul-Token`, then `Authorization: Bearer`, then `?token=`."""
    token = request.headers.get("X-Consul-Token", "")
    if not token:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
    if not token:
        token = request.GET.get(TOKEN_PARAM, "")
    return token


def strip_token_param(url: str) -> str:
    """`url` (a path or an absolute URL) without any `?token=`: a URL we build or
    record from a request (a page link, an audit entry's path) never echoes a secret."""
    base, sep, query = url.partition("?")
    if not sep:
        return url
    fragment = ""
    if "#" in query:
        query, _, fragment = query.partition("#")
        fragment = "#" + fragment
    kept = [p for p in query.split("&") if p and unquote_plus(p.partition("=")[0]) != TOKEN_PARAM]
    return base + ("?" + "&".join(kept) if kept else "") + fragment


DNS_POLICY_NAME = "builtin-dns-read"
DNS_POLICY_RULES = 'node_prefix "" { policy = "read" }\nservice_prefix "" { policy = "read" }\n'


def create_dns_token(path) -> str:
    """Make a read-only token for DNS lookups and keep its secret at `path`.

    Called when `mesh server` bootstraps ACLs itself, so that
    `dig web.service.consul` answers out of the box under default deny
    (Consul needs an operator to set `acl.tokens.dns` for that).
    """
    policy = ACLPolicy.objects.filter(name=DNS_POLICY_NAME).first() or create_policy(
        name=DNS_POLICY_NAME,
        description="Read services and nodes: what DNS answers",
        rules=DNS_POLICY_RULES,
    )
    _token, secret = create_token(
        description="DNS lookups (made at bootstrap)", policies=[{"ID": policy.id}]
    )
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret


def dns_identity() -> Identity:
    """Who DNS answers as: MESH_ACL_DNS_TOKEN, else the bootstrap-made DNS token, else anonymous."""
    secret = settings.MESH_ACL_DNS_TOKEN
    if not secret:
        path = settings.DATA_DIR / "dns-token"
        if path.exists():
            secret = path.read_text().strip()
    return resolve_token(secret or None)
