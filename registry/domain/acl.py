"""ACL tokens and policies, and resolving a request's token to an authorizer.

Token secrets are stored as SHA-256 digests: a secret is shown once, when
its token is created (or bootstrapped), and never again. Resolved tokens are
cached per process until any ACL write bumps the `acl` topic.
"""

from __future__ import annotations

import hashlib
import secrets as _secrets
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.utils import timezone

from registry.acl_rules import Authorizer, RulesError, parse_rules
from registry.domain.txn import Change, topic_index
from registry.errors import BadRequest, NotFound, PermissionDenied
from registry.models import ACLPolicy, ACLToken
from registry.models.acl import ANONYMOUS_TOKEN_ACCESSOR, GLOBAL_MANAGEMENT_POLICY_ID

ANONYMOUS_SECRET = "anonymous"
GLOBAL_MANAGEMENT_NAME = "global-management"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Who is calling: a token's accessor and what it may do."""

    accessor_id: str
    authorizer: Authorizer
    description: str = ""


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
    acl_index = topic_index("acl")
    with _cache_lock:
        hit = _cache.get(secret)
    if hit is not None and hit[0] == acl_index:
        return hit[1]
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
        token = ACLToken.objects.filter(secret_hash=hash_secret(secret)).first()
        if token is None:
            raise PermissionDenied("ACL not found")
    if token.expiration_time and token.expiration_time <= timezone.now():
        raise PermissionDenied("ACL not found")
    return Identity(token.accessor_id, token_authorizer(token), token.description)


def token_authorizer(token: ACLToken) -> Authorizer:
    policies = list(token.policies.all())
    if any(p.id == GLOBAL_MANAGEMENT_POLICY_ID for p in policies):
        return Authorizer.management()
    rules = [parse_rules(p.rules) for p in policies]
    return Authorizer.from_rules(rules, default=default_authorizer())


# --- bootstrap ------------------------------------------------------------------------


def _ensure_builtins(change: Change) -> ACLPolicy:
    policy, created = ACLPolicy.objects.get_or_create(
        id=GLOBAL_MANAGEMENT_POLICY_ID,
        defaults={
            "name": GLOBAL_MANAGEMENT_NAME,
            "description": "Builtin Policy that grants unlimited access",
            "rules": "",
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
    change.touch("acl")
    return policy


def bootstrapped() -> bool:
    return ACLToken.objects.exclude(accessor_id=ANONYMOUS_TOKEN_ACCESSOR).exists()


def bootstrap(secret: str | None = None) -> tuple[ACLToken, str]:
    """Create the first management token (once). Returns the token and its secret."""
    with Change() as change:
        # Serialise concurrent bootstraps: the global index row lock is held.
        if bootstrapped():
            raise PermissionDenied(
                f"ACL bootstrap no longer allowed (reset index: {change.index})"
            )
        policy = _ensure_builtins(change)
        secret = secret or str(uuid.uuid4())
        token = ACLToken.objects.create(
            accessor_id=str(uuid.uuid4()),
            secret_hash=hash_secret(secret),
            description="Bootstrap Token (Global Management)",
            create_index=change.index,
            modify_index=change.index,
        )
        token.policies.add(policy)
    return token, secret


def ensure_initial_management(secret: str) -> bool:
    """Create the management token with a chosen secret on first start (idempotent)."""
    if ACLToken.objects.filter(secret_hash=hash_secret(secret)).exists():
        return False
    with Change() as change:
        policy = _ensure_builtins(change)
        token = ACLToken.objects.create(
            accessor_id=str(uuid.uuid4()),
            secret_hash=hash_secret(secret),
            description="Initial Management Token",
            create_index=change.index,
            modify_index=change.index,
        )
        token.policies.add(policy)
    return True


def new_secret() -> str:
    return str(uuid.UUID(bytes=_secrets.token_bytes(16), version=4))


__all__ = [
    "Identity",
    "RulesError",
    "BadRequest",
    "NotFound",
    "resolve_token",
    "bootstrap",
    "ensure_initial_management",
    "hash_secret",
    "Any",
]
