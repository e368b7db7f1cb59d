"""Reading the audit log: filtered pages of entries, and who last changed a thing.

Entries are written by `registry.txn.Change` (already redacted); reading them
needs `operator:read` (as `/api/audit/`). `last_change` answers a narrower
question an editor whose compare-and-set failed must be told — who saved the
object in between — and so shows only the actor's name, the path they used
and when, never the entry's state.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from registry.acl_rules import Authorizer
from registry.errors import PermissionDenied
from registry.models import AuditEntry


def entries(authz: Authorizer, accessor: str = "") -> QuerySet[AuditEntry]:
    """Every entry, newest first, for a caller with operator:read."""
    if not authz.operator_read():
        who = f"token with AccessorID '{accessor}'" if accessor else "token"
        raise PermissionDenied(f"Permission denied: {who} lacks permission 'operator:read'")
    return AuditEntry.objects.order_by("-index", "-id")


def last_change(resource_type: str, resource_id: str) -> dict[str, Any] | None:
    """Who last wrote or deleted this resource, how and when (None: never audited)."""
    row = (
        AuditEntry.objects.filter(resource_type=resource_type, resource_id=resource_id)
        .order_by("-index", "-id")
        .first()
    )
    if row is None:
        return None
    return {"actor": row.actor_name or row.actor, "via": row.via, "at": row.at, "index": row.index}
