"""Sessions: leases on a node and its checks that hold KV locks.

A session ends when it is destroyed, its TTL lapses, its node is removed or
one of its checks goes critical; its locks are then released (behavior
`release`) or its locked keys deleted (behavior `delete`).
"""

from __future__ import annotations

from collections.abc import Iterable

from registry.domain.txn import Change
from registry.models import KVEntry, Node, Session


def _end_session(change: Change, session: Session) -> None:
    locked = KVEntry.objects.filter(session=session)
    for entry in locked:
        change.touch("kv", f"kv:{entry.key}")
    if session.behavior == "delete":
        locked.delete()
    else:
        locked.update(session=None, modify_index=change.index)
    change.touch("sessions", f"session:{session.id}", f"node-sessions:{session.node.name}")
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
