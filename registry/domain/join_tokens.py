"""Join tokens: the credential an agent exchanges once for its node identity.

`<id>.<secret>`, the secret stored as its SHA-256; single- or multi-use,
always expiring. Each token carries a scope (`scope.py`-style patterns kept
here): the node name it may join as (any, when empty) and the services a node
that joined with it may register and get leaves for. `registry.domain.enrollment`
uses a token (`consume`) when an agent joins.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone

from meshproto import scope
from registry import topics as topic
from registry.errors import BadRequest, MeshError, NotFound
from registry.models import Datacenter, JoinToken
from registry.txn import Change

log = logging.getLogger(__name__)

MIN_TTL_SECONDS = 1
MAX_TTL_SECONDS = 365 * 24 * 3600
DEFAULT_TTL_SECONDS = 3600
_TOKEN_ID = re.compile(r"^[0-9a-f]{16}$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PATTERN = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,127}\*?)$")
MAX_SCOPE_PATTERNS = 64


class Unauthenticated(MeshError):
    """The caller's credential (a join token) is not valid; the message never says why."""

    status = 401


_REFUSED = "join token is invalid, expired, revoked or used up"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class NewToken:
    """A token just created: the row and the only copy of its secret form."""

    row: JoinToken
    token: str  # `<id>.<secret>`: shown once


def create_token(
    *,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
    max_uses: int = 1,
    description: str = "",
    datacenter: str = "",
    created_by: str = "",
    node_name: str = "",
    services: Sequence[str] = (),
) -> NewToken:
    """A new join token. `max_uses` 0 is unlimited (until it expires or is revoked).

    Every token expires: an unlimited, eternal credential that mints node
    identities is not something to hand out. Its scope: `node_name` (the
    only name it joins, or any when empty) and `services` (what the node may
    register: names, `prefix*` patterns, `*` for any; none by default).
    """
    services = check_scope_patterns(services)
    if node_name and (not isinstance(node_name, str) or not _NODE_NAME.match(node_name)):
        raise BadRequest(f"node: invalid node name {node_name!r}")
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int | float):
        raise BadRequest("ttl: expected a duration")
    if not MIN_TTL_SECONDS <= ttl_seconds <= MAX_TTL_SECONDS:
        raise BadRequest(
            f"ttl must be between {MIN_TTL_SECONDS}s and {MAX_TTL_SECONDS // 86400} days"
        )
    if isinstance(max_uses, bool) or not isinstance(max_uses, int) or max_uses < 0:
        raise BadRequest("uses must be 0 (unlimited) or a positive integer")
    if not isinstance(description, str) or len(description) > 1024:
        raise BadRequest("description must be a string of at most 1024 characters")
    dc = datacenter or settings.MESH_DC
    if dc != settings.MESH_DC and not Datacenter.objects.filter(name=dc).exists():
        raise BadRequest(f'unknown datacenter "{dc}"')
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    now = timezone.now()
    with Change() as w:
        row = JoinToken.objects.create(
            id=token_id,
            secret_hash=_hash(secret),
            description=description,
            datacenter=dc,
            max_uses=max_uses,
            expires_at=now + dt.timedelta(seconds=ttl_seconds),
            created_by=created_by,
            node_name=node_name,
            services=services,
            create_index=w.index,
            modify_index=w.index,
        )
        w.touch(topic.JOIN_TOKENS)
        w.audit("agent.join-token.create", "join-token", token_id, None, token_json(row))
    return NewToken(row, f"{token_id}.{secret}")


def token_state(row: JoinToken, now: dt.datetime | None = None) -> str:
    """active | expired | revoked | used"""
    now = now or timezone.now()
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    if row.max_uses and row.uses >= row.max_uses:
        return "used"
    return "active"


def token_json(row: JoinToken) -> dict[str, Any]:
    """A token as the API shows it (never its secret nor its hash)."""
    return {
        "id": row.id,
        "description": row.description,
        "datacenter": row.datacenter,
        "node_name": row.node_name,
        "services": list(row.services or []),
        "max_uses": row.max_uses,
        "uses": row.uses,
        "state": token_state(row),
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "created_by": row.created_by,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "last_used_by": row.last_used_by,
        "create_index": row.create_index,
        "modify_index": row.modify_index,
    }


def list_tokens() -> list[JoinToken]:
    return list(JoinToken.objects.all())


def revoke_token(token_id: str, *, nodes: bool = False) -> JoinToken:
    """Revoke a token (it stays listed as revoked); revoking twice is a no-op.

    `nodes`: also revoke every node that joined with it
    (`enrollment.revoke_nodes`), even when the token was revoked before.
    """
    from registry.domain import enrollment  # (import cycle: enrollment consumes tokens)

    with Change() as w:
        row = JoinToken.objects.select_for_update().filter(id=token_id).first()
        if row is None:
            raise NotFound(f'join token "{token_id}" not found')
        if nodes:
            enrollment.revoke_nodes(w, row.id)
        if row.revoked_at is None:
            before = token_json(row)
            row.revoked_at = timezone.now()
            row.modify_index = w.index
            row.save(update_fields=["revoked_at", "modify_index"])
            w.touch(topic.JOIN_TOKENS)
            w.audit("agent.join-token.revoke", "join-token", row.id, before, token_json(row))
    return row


def consume(change: Change, token: str, node_name: str) -> JoinToken:
    """Use the token once, inside the join's transaction, or raise Unauthenticated.

    The use is a conditional UPDATE (`uses < max_uses`, not revoked, not
    expired): of two agents racing for a single-use token, the second's
    UPDATE re-reads the row after the first commits and matches nothing.
    """
    token_id, dot, secret = (token or "").strip().partition(".")
    if not dot or not _TOKEN_ID.match(token_id) or not secret:
        log.warning("join refused for node %r: malformed token", node_name)
        raise Unauthenticated(_REFUSED)
    row = JoinToken.objects.filter(id=token_id).first()
    if row is None or not hmac.compare_digest(row.secret_hash, _hash(secret)):
        log.warning("join refused for node %r: unknown token %s", node_name, token_id)
        raise Unauthenticated(_REFUSED)
    now = timezone.now()
    claimed = (
        JoinToken.objects.filter(id=token_id, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .filter(Q(max_uses=0) | Q(uses__lt=F("max_uses")))
        .update(
            uses=F("uses") + 1,
            last_used_at=now,
            last_used_by=node_name,
            modify_index=change.index,
        )
    )
    if not claimed:
        log.warning(
            "join refused for node %r: token %s is %s", node_name, token_id, token_state(row, now)
        )
        raise Unauthenticated(_REFUSED)
    change.touch(topic.JOIN_TOKENS)
    row.refresh_from_db()
    return row


# --- scope -----------------------------------------------------------------------------


def check_scope_patterns(services: Sequence[str]) -> list[str]:
    """Validate a token's service scope: names, `prefix*` patterns or `*` (400 otherwise)."""
    if isinstance(services, str) or not isinstance(services, list | tuple):
        raise BadRequest("services: expected a list of service names or patterns")
    if len(services) > MAX_SCOPE_PATTERNS:
        raise BadRequest(f"services: at most {MAX_SCOPE_PATTERNS} names or patterns")
    out: list[str] = []
    for item in services:
        if not isinstance(item, str) or not _PATTERN.match(item):
            raise BadRequest(
                f"services: invalid service name or pattern {item!r} "
                "(a name, a prefix ending in '*', or '*' for any)"
            )
        if item not in out:
            out.append(item)
    return out


def scope_allows(patterns: Sequence[str], service: str) -> bool:
    """Whether a scope allows a service name (the rule: `meshproto.scope.allows`)."""
    return scope.allows(patterns, service)


# Where `mesh agent` keeps its state and reads its definitions on a host (the
# deploy/ packages' paths), as shown in the command an operator copies.
AGENT_DATA_DIR = "/var/lib/mesh-agent"
AGENT_CONFIG_DIR = "/etc/mesh-agent.d"


def join_address(request_host: str) -> str:
    """The gRPC address to give agents: MESH_GRPC_ADVERTISE_ADDR (a load balancer),
    else the listen address, or for a wildcard listener the host the operator's
    request reached us by (`Host` header)."""
    if not settings.MESH_GRPC_ADDR:
        return ""
    host, port = settings.MESH_GRPC_ADVERTISE_ADDR or settings.MESH_GRPC_ADDR
    if host in ("", "0.0.0.0", "::"):
        host = request_host.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def agent_command(address: str, token: str, pin: str) -> str:
    """The one-line `mesh agent` command that joins a host with `token`."""
    return (
        f"mesh agent -join {address} -join-token {token} -ca-pin {pin} "
        f"-data-dir {AGENT_DATA_DIR} -config-dir {AGENT_CONFIG_DIR}"
    )
