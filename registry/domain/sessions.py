"""Sessions: leases on a node and its checks that hold KV locks.

A session ends when it is destroyed, its TTL lapses, its node is removed or
one of its checks goes critical; its locks are then released (behavior
`release`) or its locked keys deleted (behavior `delete`), and those keys
cannot be acquired again for the session's lock-delay.

TTL: like Consul, a session is invalidated once 2 x TTL has passed since it
was created or last renewed (Consul's docs: "sessions may not be reaped for
up to double this TTL"; its server arms the timer at TTL x 2). `expires_at`
holds that deadline and `expire_sessions()` (run by the background tick)
ends what has passed it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from meshproto import durations
from registry import topics as topic
from registry.decode import format_duration, parse_duration
from registry.domain.kv import apply_lock_delay, key_topic
from registry.errors import BadRequest, NotFound
from registry.models import Check, KVEntry, Node, Session
from registry.txn import Change, topic_index

SERF_CHECK_ID = "serfHealth"
BEHAVIORS = ("release", "delete")
DEFAULT_LOCK_DELAY_NS = 15_000_000_000
MAX_LOCK_DELAY_NS = 60_000_000_000  # Consul's structs.MaxLockDelay
SESSION_TTL_MAX_SECONDS = 86400.0
TTL_MULTIPLIER = 2  # Consul's structs.SessionTTLMultiplier
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


# --- ending sessions (also called by the catalog) ------------------------------------------


def _end_session(change: Change, session: Session) -> None:
    # Re-read under lock: the caller may hold a row loaded before an earlier
    # writer ended this session, and ending it twice must be a no-op.
    if Session.objects.select_for_update().filter(pk=session.pk).first() is None:
        return
    locked = list(KVEntry.objects.filter(session=session))
    keys = [entry.key for entry in locked]
    change.touch(*(key_topic(k) for k in keys))
    if session.behavior == "delete":
        KVEntry.objects.filter(pk__in=[e.pk for e in locked]).delete()
    else:
        KVEntry.objects.filter(pk__in=[e.pk for e in locked]).update(
            session=None, modify_index=change.index
        )
    apply_lock_delay(keys, session.lock_delay)
    change.touch(topic.SESSIONS, topic.session(session.id), topic.node_sessions(session.node.name))
    session.delete()


def invalidate_sessions_for_checks(
    change: Change,
    node: Node,
    *,
    check_ids: Iterable[str] = (),
    service_ids: Iterable[str] = (),
) -> int:
    """End the node's sessions bound to any of these checks (or services' checks)."""
    check_ids, service_ids = set(check_ids), set(service_ids)
    ended = 0
    for session in Session.objects.select_related("node").filter(node=node):
        node_hit = check_ids & set(session.node_checks or [])
        svc_hit = any(
            (sc.get("ID") in check_ids) or (sc.get("ID") in service_ids)
            for sc in (session.service_checks or [])
        )
        if node_hit or svc_hit:
            _end_session(change, session)
            ended += 1
    return ended


def destroy_node_sessions(change: Change, node: Node) -> None:
    for session in Session.objects.select_related("node").filter(node=node):
        _end_session(change, session)


def end_session(change: Change, session: Session) -> None:
    """Destroy a session, releasing (or deleting) what it locks."""
    _end_session(change, session)


# --- shapes ---------------------------------------------------------------------------------


def session_json(session: Session) -> dict[str, Any]:
    """A session as `/v1/session/info|list|node|renew` show it."""
    return {
        "ID": session.id,
        "Name": session.name,
        "Node": session.node.name,
        "LockDelay": session.lock_delay,
        "Behavior": session.behavior,
        "TTL": session.ttl,
        "NodeChecks": list(session.node_checks or []),
        "ServiceChecks": [
            {"ID": sc.get("ID", ""), "Namespace": sc.get("Namespace", "")}
            for sc in session.service_checks
        ]
        if session.service_checks
        else None,
        "CreateIndex": session.create_index,
        "ModifyIndex": session.modify_index,
    }


# --- input ------------------------------------------------------------------------------------


def lock_delay_ns(value: Any) -> int:
    """Consul's LockDelay: a duration string or integer nanoseconds.

    As Consul's HTTP layer does, a value under 1000 ns is taken as seconds
    (users send `5` or `"5ns"` meaning 5 s).
    """
    if value is None:
        return DEFAULT_LOCK_DELAY_NS
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadRequest("Request decode failed: LockDelay: expected a duration")
    try:
        ns = durations.parse_ns(value, allow_negative=True)
    except durations.DurationError as exc:
        raise BadRequest(f"Request decode failed: LockDelay: {exc}") from None
    if ns < 0:
        raise BadRequest("Request decode failed: LockDelay: must not be negative")
    if ns < 1000:
        ns *= 1_000_000_000
    if ns > MAX_LOCK_DELAY_NS:
        raise _lock_delay_too_long(value)
    return ns


def _lock_delay_too_long(value: Any) -> BadRequest:
    return BadRequest(
        f"Request decode failed: LockDelay: {value!r} is longer than the maximum of "
        f"{format_duration(MAX_LOCK_DELAY_NS / 1e9)}"
    )


def ttl_seconds(ttl: str) -> float:
    """Validate a session TTL ("" or "0s" for none) against Consul's bounds."""
    if not ttl:
        return 0.0
    try:
        seconds = parse_duration(ttl)
    except ValueError:
        raise BadRequest(
            f"Session TTL '{ttl}' invalid: use a duration with a unit, such as \"30s\""
        ) from None
    low, high = float(settings.MESH_SESSION_TTL_MIN), SESSION_TTL_MAX_SECONDS
    if seconds != 0 and not low <= seconds <= high:
        raise BadRequest(
            f"Invalid Session TTL '{ttl}', must be between "
            f"[{format_duration(low)}={format_duration(high)}]"
        )
    return seconds


def _session_check_ids(spec: dict[str, Any]) -> list[str]:
    """The node checks a session binds.

    `NodeChecks` (Consul 1.7+) and the deprecated `Checks` are merged; with
    neither, the node's `serfHealth`. Sending `Checks: []` or `NodeChecks: []`
    binds no node check, as in Consul.
    """
    if "NodeChecks" not in spec and "Checks" not in spec:
        return [SERF_CHECK_ID]
    merged: list[str] = []
    for cid in list(spec.get("NodeChecks") or []) + list(spec.get("Checks") or []):
        if cid not in merged:
            merged.append(cid)
    return merged


def _expiry(ttl: float, now: datetime | None = None) -> datetime | None:
    if not ttl:
        return None
    return (now or timezone.now()) + timedelta(seconds=ttl * TTL_MULTIPLIER)


def validate_session_id(session_id: str) -> str:
    if not session_id:
        raise BadRequest("Missing session")
    if not _UUID.match(session_id):
        raise BadRequest(f"Invalid session ID {session_id!r}: must be a UUID")
    return session_id.lower()


# --- writes -------------------------------------------------------------------------------------


def create_session(spec: dict[str, Any], node_name: str) -> Session:
    """`PUT /v1/session/create`: validate everything, then write one session.

    `spec` holds the decoded body's fields that were present (Name,
    LockDelay, Behavior, TTL, NodeChecks, Checks, ServiceChecks); `node_name`
    is the body's Node or the server's own node.
    """
    behavior = spec.get("Behavior") or "release"
    if behavior not in BEHAVIORS:
        raise BadRequest(f"Invalid Behavior setting '{behavior}'")
    ttl = spec.get("TTL") or ""
    ttl_s = ttl_seconds(ttl)
    delay = lock_delay_ns(spec.get("LockDelay"))
    node_checks = _session_check_ids(spec)
    service_checks = []
    for i, sc in enumerate(spec.get("ServiceChecks") or []):
        if not sc.get("ID"):
            raise BadRequest(f"Request decode failed: ServiceChecks[{i}].ID is required")
        service_checks.append({"ID": sc["ID"], "Namespace": sc.get("Namespace") or ""})
    with Change() as change:
        node = Node.objects.filter(name=node_name).first()
        if node is None:
            raise BadRequest("Missing node registration")
        statuses = dict(Check.objects.filter(node=node).values_list("check_id", "status"))
        for cid in node_checks + [sc["ID"] for sc in service_checks]:
            if cid not in statuses:
                raise BadRequest(f"Missing check '{cid}' registration")
            if statuses[cid] == Check.CRITICAL:
                raise BadRequest(f"Check '{cid}' is in critical state")
        session = Session.objects.create(
            id=str(uuid.uuid4()),
            name=spec.get("Name") or "",
            node=node,
            node_checks=node_checks,
            service_checks=service_checks,
            lock_delay=delay,
            behavior=behavior,
            ttl=ttl,
            expires_at=_expiry(ttl_s),
            create_index=change.index,
            modify_index=change.index,
        )
        change.touch(topic.SESSIONS, topic.session(session.id), topic.node_sessions(node.name))
    return session


def find_session(session_id: str) -> Session | None:
    return Session.objects.select_related("node").filter(id=session_id.lower()).first()


def destroy_session(session_id: str) -> bool:
    """`PUT /v1/session/destroy/<id>`: end it; destroying what is gone is a no-op."""
    with Change() as change:
        session = find_session(session_id)
        if session is not None:
            _end_session(change, session)
    return True


def renew_session(session_id: str) -> Session:
    """`PUT /v1/session/renew/<id>`: push the TTL deadline forward.

    Not a catalog write (Consul only resets a timer): no index moves and no
    watcher wakes, so a heartbeat costs one UPDATE.
    """
    session = find_session(session_id)
    if session is not None and session.ttl:
        expires = _expiry(ttl_seconds_stored(session.ttl))
        # Conditional on the row still existing: a reaper that ended it first wins.
        if Session.objects.filter(pk=session.pk).update(expires_at=expires) == 0:
            session = None
        else:
            session.expires_at = expires
    if session is None:
        raise NotFound(f"Session id '{session_id}' not found")
    return session


def ttl_seconds_stored(ttl: str) -> float:
    """A stored TTL in seconds (validated when the session was created)."""
    try:
        return parse_duration(ttl)
    except ValueError:
        return 0.0


def expire_sessions(now: datetime | None = None) -> int:
    """End every session whose TTL deadline (2 x TTL after its last renewal) has passed.

    Idempotent and safe to run concurrently: the sessions are re-read under
    the write's lock, so one renewed or ended meanwhile is left alone. All
    lapsed sessions end in one `Change`. Returns how many ended.
    """
    now = now or timezone.now()
    due = list(Session.objects.filter(expires_at__lt=now).values_list("id", flat=True)[:1000])
    if not due:
        return 0  # the every-second tick costs one indexed SELECT
    ended = 0
    with Change() as change:
        for session in (
            Session.objects.select_related("node").filter(id__in=due, expires_at__lt=now).order_by()
        ):
            _end_session(change, session)
            ended += 1
    return ended


# --- reads ---------------------------------------------------------------------------------------


def _visible(authz, sessions: Iterable[Session]) -> tuple[list[dict[str, Any]], bool]:
    sessions = list(sessions)
    shown = [session_json(s) for s in sessions if authz.session_read(s.node.name)]
    return shown, len(shown) != len(sessions)


def session_info(authz, session_id: str) -> tuple[int, list[dict[str, Any]], bool]:
    """`GET /v1/session/info/<id>`: `[session]`, or `[]` if unknown or not readable."""
    index = max(topic_index(topic.session(session_id.lower())), 1)
    session = find_session(session_id)
    shown, filtered = _visible(authz, [session] if session else [])
    return index, shown, filtered


def list_sessions(authz) -> tuple[int, list[dict[str, Any]], bool]:
    index = max(topic_index(topic.SESSIONS), 1)
    rows = Session.objects.select_related("node").order_by("id")  # Consul lists by ID
    return (index, *_visible(authz, rows))


def node_sessions(authz, node_name: str) -> tuple[int, list[dict[str, Any]], bool]:
    index = max(topic_index(topic.node_sessions(node_name)), 1)
    rows = Session.objects.select_related("node").filter(node__name=node_name)
    return (index, *_visible(authz, rows.order_by("id")))
