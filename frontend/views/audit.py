"""The audit log: filtered by actor, action, object and time, each entry with its
before/after diff. Filters are `/api/audit/`'s FilterSet."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse

from frontend import diffs, paging
from frontend.auth import ui_view
from frontend.render import page
from registry.api.audit import AuditEntryFilterSet
from registry.domain import audit_log

FILTERS = ("actor", "action", "resource_type", "resource_id", "via", "since", "until")


@ui_view()
def audit(request: HttpRequest) -> HttpResponse:
    viewer = request.viewer
    query = paging.filters(request, FILTERS)
    rows = audit_log.entries(viewer.authz, viewer.identity.accessor_id)
    fs = AuditEntryFilterSet(query, queryset=rows)
    errors = {k: " ".join(v) for k, v in fs.errors.items()} if not fs.is_valid() else {}
    pg = paging.paginate(request, fs.qs if not errors else rows.none(), query)
    entries = []
    for e in pg.rows:
        before = json.dumps(e.before, indent=2, sort_keys=True) if e.before is not None else ""
        after = json.dumps(e.after, indent=2, sort_keys=True) if e.after is not None else ""
        entries.append({"e": e, "diff": diffs.line_diff(before, after)})
    return page(
        request,
        "frontend/audit.html",
        {"page": pg, "entries": entries, "query": query, "errors": errors},
        section="audit",
        status=400 if errors else 200,
    )
