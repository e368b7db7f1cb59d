"""Who is making the current write, carried to the service layer, and what
its audit entry may never hold.

API entry points (`/v1` endpoints, `/api` views, the UI, gRPC) open an audit
scope with the caller's identity; every `Change` committed inside it writes
its audit entries in the same transaction as the data. Writes made by
background work (check results, expiries) run outside any scope and are not
audited.

Entries are read by anyone with `operator:read`, who must not learn a secret
from them: `redact` is applied to every entry in the one place entries are
written (`registry.txn.Change`). It removes the values of secret keys (ACL
and join-token secrets, CA private keys, cloud credentials: `SECRET_KEYS`,
wherever they are nested), KV values (a size and digest; nothing at all
under `MESH_AUDIT_SENSITIVE_KV_PREFIXES`), the keys each action's `RULES`
entry adds, and `?token=` from the recorded path. An action without a rule
is recorded without its state (fail closed); a test walks every action the
code can record and fails when one has no rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Actor:
    id: str  # an ACL token accessor ID, or "user:<name>" for UI users
    name: str = ""
    via: str = "v1"  # v1 | api | ui | cli


@dataclass
class Scope:
    actor: Actor
    action: str
    method: str = ""
    path: str = ""
    body: Any = None
    recorded: bool = field(default=False)


_current: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("mesh_audit", default=None)


def current() -> Scope | None:
    return _current.get()


@contextlib.contextmanager
def scope(actor: Actor, action: str, method: str = "", path: str = "") -> Iterator[Scope]:
    s = Scope(actor, action, method, path)
    token = _current.set(s)
    try:
        yield s
    finally:
        _current.reset(token)


def note_body(body: Any) -> None:
    """Remember the decoded request body for entries that carry no explicit state."""
    s = _current.get()
    if s is not None and s.body is None:
        s.body = body


def jsonable(value: Any) -> Any:
    """Audit state must be JSON: bytes become a note of their size."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# --- redaction -------------------------------------------------------------------------

REDACTED = "<redacted>"


def _fold(key: object) -> str:
    """Keys compare without case, `_` or `-` (`SecretID`, `secret_id`, `secret-id`)."""
    return str(key).lower().replace("_", "").replace("-", "")


# Keys whose values are secrets wherever they appear in recorded state.
SECRET_KEYS = frozenset(
    _fold(k)
    for k in (
        # ACL tokens (Consul's `SecretID`, the legacy `ID` of a bootstrap answer is never
        # recorded), a service definition's `Token`, join-token secrets and hashes
        "SecretID",
        "Secret",
        "SecretHash",
        "Token",
        "BootstrapSecret",
        # CA private keys (roots' keys never leave registry.ca, but a PUT may carry one)
        "PrivateKey",
        "PrivateKeyPEM",
        "KeyPEM",
        # cloud credentials (cloud accounts: access keys, service-account keys, passwords)
        "Credentials",
        "Credential",
        "SecretAccessKey",
        "SessionToken",
        "ClientSecret",
        "ServiceAccountKey",
        "Password",
        "APIKey",
    )
)

NO_MORE = frozenset[str]()
# Checks (and services with checks) may carry credentials in an HTTP check's
# headers or body (`Authorization: Bearer ...`).
CHECK_DEFINITIONS = frozenset({"header", "body"})
# A KV write's body is the value itself.
KV_BODY = frozenset({"value"})
# A join's request carries the join token (`<id>.<secret>`).
JOIN_REQUEST = frozenset({"jointoken"})
# Peering requests carry the peering token and the stream secrets.
PEERING_SECRETS = frozenset({"peeringtoken", "streamsecret", "establishmentsecret"})

# Every action an entry can be recorded for -> the keys, beyond SECRET_KEYS, whose
# values are secret in its state. NO_MORE means "reviewed: nothing else is secret".
# Actions are `/v1` endpoints (`<module>.<function>`, entries that record the request
# body), `/api` views (`api.<basename>.<action>`, `ca.*`), gRPC calls (`agent.<RPC>`)
# and the domain's own records (`service.register`, ...).
RULES: dict[str, frozenset[str]] = {
    # /v1 endpoints
    "acl.bootstrap": NO_MORE,
    "acl.token_create": NO_MORE,
    "acl.token": NO_MORE,
    "acl.token_clone": NO_MORE,
    "acl.policy_create": NO_MORE,
    "acl.policy": NO_MORE,
    "acl.role_create": NO_MORE,
    "acl.role": NO_MORE,
    "agent.service_register": CHECK_DEFINITIONS,
    "agent.service_deregister": NO_MORE,
    "agent.service_maintenance": NO_MORE,
    "agent.node_maintenance": NO_MORE,
    "agent.check_register": CHECK_DEFINITIONS,
    "agent.check_deregister": NO_MORE,
    "agent.check_pass": NO_MORE,
    "agent.check_warn": NO_MORE,
    "agent.check_fail": NO_MORE,
    "agent.check_update": NO_MORE,
    "catalog.register": CHECK_DEFINITIONS,
    "catalog.deregister": NO_MORE,
    "kv.entry": KV_BODY,
    "txn.txn_write": CHECK_DEFINITIONS | KV_BODY,
    # an event's payload is opaque: recorded as its size only
    "event.fire": frozenset({"payload"}),
    "snapshot.restore": NO_MORE,
    # prepared queries: a query's Token is a secret (SECRET_KEYS); the rest is not
    "query.collection": NO_MORE,
    "query.one": NO_MORE,
    "query.write": NO_MORE,
    "query.delete": NO_MORE,
    "coordinate.update": NO_MORE,
    "operator.agent_reload": NO_MORE,  # the archive's facts (ID, index, table counts), never its rows
    "session.create": NO_MORE,
    "session.destroy": NO_MORE,
    "session.renew": NO_MORE,
    "connect_ca.configuration": NO_MORE,
    "intentions.collection": NO_MORE,
    "intentions.exact": NO_MORE,
    "intentions.by_id": NO_MORE,
    "intentions.authorize": NO_MORE,
    "config.write": NO_MORE,
    "config.entry": NO_MORE,
    "config.discovery_chain": NO_MORE,
    "peering.token": PEERING_SECRETS,
    "peering.establish": PEERING_SECRETS,
    "peering.exchange": PEERING_SECRETS,
    "peering.terminate": PEERING_SECRETS,
    "peering.one": PEERING_SECRETS,
    # /api views
    "api.acltoken.create": NO_MORE,
    "api.acltoken.update": NO_MORE,
    "api.acltoken.partial_update": NO_MORE,
    "api.acltoken.destroy": NO_MORE,
    "api.aclpolicy.create": NO_MORE,
    "api.aclpolicy.update": NO_MORE,
    "api.aclpolicy.partial_update": NO_MORE,
    "api.aclpolicy.destroy": NO_MORE,
    "api.aclrole.create": NO_MORE,
    "api.aclrole.update": NO_MORE,
    "api.aclrole.partial_update": NO_MORE,
    "api.aclrole.destroy": NO_MORE,
    "api.datacenter.create": NO_MORE,
    "api.datacenter.update": NO_MORE,
    "api.datacenter.partial_update": NO_MORE,
    "api.instance.create": CHECK_DEFINITIONS,
    "api.instance.destroy": NO_MORE,
    "api.intention.create": NO_MORE,
    "api.intention.update": NO_MORE,
    "api.intention.destroy": NO_MORE,
    "api.jointoken.create": NO_MORE,
    "api.jointoken.destroy": NO_MORE,
    "api.kv.update": KV_BODY,
    "api.kv.destroy": NO_MORE,
    "api.configentry.update": NO_MORE,
    "api.configentry.destroy": NO_MORE,
    "ca.sign": NO_MORE,
    "ca.rotate": NO_MORE,
    # cloud accounts (clouds/): a create body carries credentials, caught by SECRET_KEYS
    "api.cloudaccount.create": NO_MORE,
    "api.cloudaccount.destroy": NO_MORE,
    "api.cloudaccount.sync": NO_MORE,
    "api.gatewayconfig.apply": NO_MORE,
    # gRPC (agents)
    "agent.Join": JOIN_REQUEST,
    "agent.SignLeaf": NO_MORE,
    "agent.SyncNode": CHECK_DEFINITIONS,
    "agent.UpdateChecks": NO_MORE,
    "agent.StreamProxyConfigs": NO_MORE,
    "agent.ReportTraffic": NO_MORE,
    "agent.StreamEvents": NO_MORE,
    # the domain's records
    "agent.join": NO_MORE,
    "agent.join-token.create": NO_MORE,
    "agent.join-token.revoke": NO_MORE,
    "agent.node.revoke": NO_MORE,
    "agent.scope.refuse": NO_MORE,
    "ca.initialize": NO_MORE,
    "ca.configure": NO_MORE,
    "ca.retire": NO_MORE,
    "node.register": NO_MORE,
    "node.deregister": NO_MORE,
    "service.register": CHECK_DEFINITIONS,
    "service.deregister": CHECK_DEFINITIONS,
    "check.register": CHECK_DEFINITIONS,
    "check.update": CHECK_DEFINITIONS,
    "check.deregister": CHECK_DEFINITIONS,
    "intention.create": NO_MORE,
    "intention.update": NO_MORE,
    "intention.delete": NO_MORE,
    "config.delete": NO_MORE,
    "config.mesh.allow-by-default": NO_MORE,
    "peering.accept": PEERING_SECRETS,
    "peering.active": PEERING_SECRETS,
    "peering.delete": PEERING_SECRETS,
    "peering.terminated": PEERING_SECRETS,
    "kv.set": NO_MORE,
    "kv.delete": NO_MORE,
    "kv.delete-tree": NO_MORE,
    "cloud.sync": CHECK_DEFINITIONS,
    "cloud.account.create": NO_MORE,
    "cloud.account.delete": NO_MORE,
    "cloud.firewall.apply": NO_MORE,
}


def sensitive_kv_prefixes() -> tuple[str, ...]:
    """`MESH_AUDIT_SENSITIVE_KV_PREFIXES`: keys whose values the log never describes."""
    return tuple(settings.MESH_AUDIT_SENSITIVE_KV_PREFIXES)


def kv_value_note(key: object, value: Any) -> str:
    """What the log says about a KV value: never the value itself.

    Under a sensitive prefix, nothing (not even a size or a digest, which
    would let a low-entropy secret be guessed offline); elsewhere its size and
    a short digest, so that an entry still shows whether the value changed.
    """
    if isinstance(key, str) and key.startswith(sensitive_kv_prefixes()):
        return REDACTED
    if value is None:
        return "<empty>"
    raw = value.encode() if isinstance(value, str) else bytes(value)
    return f"<{len(raw)} bytes, sha256:{hashlib.sha256(raw).hexdigest()[:12]}>"


def _scrub(value: Any, secret: frozenset[str]) -> Any:
    if isinstance(value, dict):
        kv_key = value.get("Key")
        out = {}
        for k, v in value.items():
            folded = _fold(k)
            if folded in secret:
                out[str(k)] = REDACTED if v not in (None, "") else v
            elif folded == "value" and "Key" in value:
                out[str(k)] = kv_value_note(kv_key, v)  # a KV entry (or a KV op in a body)
            else:
                out[str(k)] = _scrub(v, secret)
        return out
    if isinstance(value, list | tuple):
        return [_scrub(v, secret) for v in value]
    return value


_warned: set[str] = set()


def redact(action: str, state: Any) -> Any:
    """`state` (an entry's before or after, already JSON) as it may be stored."""
    if state is None:
        return None
    extra = RULES.get(action)
    if extra is None:
        # Fail closed: an action nobody reviewed is recorded, without its state.
        if action not in _warned:
            _warned.add(action)
            log.warning("audit: no redaction rule for action %r; its state is not recorded", action)
        return {"redacted": f"no audit redaction rule for {action!r}"}
    return _scrub(state, SECRET_KEYS | extra)


def redact_path(path: str) -> str:
    """A request path as recorded: never with a `?token=`."""
    from registry.domain.acl import strip_token_param

    return strip_token_param(path)
