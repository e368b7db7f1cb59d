"""Intentions: list, source x destination matrix, create / edit / delete with L7
permissions, and the "would this call be allowed?" checker — all through
`registry.domain.intentions`, the functions `/v1` and `/api` call."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from frontend import forms, paging
from frontend.auth import ui_view
from frontend.render import page
from registry.domain import intentions
from registry.errors import MeshError
from registry.models import Intention, ServiceInstance

FILTERS = ("source", "destination", "action")
FIELDS = (
    ("permissions", ("Permission", "Path", "Header", "Method", "regex")),
    ("source", ("SourceName", "source")),
    ("destination", ("DestinationName", "destination")),
    ("action", ("Action",)),
    ("description", ("Description",)),
)
MATRIX_LIMIT = 40


def _service_names(request: HttpRequest) -> list[str]:
    authz = request.viewer.authz
    names = ServiceInstance.objects.exclude(kind="connect-proxy").values_list("name", flat=True)
    return sorted(n for n in set(names) if authz.service_read(n))


@ui_view()
def intention_list(request: HttpRequest) -> HttpResponse:
    viewer = request.viewer
    query = paging.filters(request, FILTERS)
    action = query.get("action", "")
    listing = intentions.list_intentions(
        viewer.authz,
        source=query.get("source", ""),
        destination=query.get("destination", ""),
        action="" if action == "l7" else action,
    )
    rows = [r for r in listing.rows if action != "l7" or not r.action]
    pg = paging.paginate(request, rows, query)
    names = _service_names(request)
    return page(
        request,
        "frontend/intentions.html",
        {
            "page": pg,
            "rows": [
                {"row": r, "can_write": viewer.authz.intention_write(r.destination_name)}
                for r in pg.rows
            ],
            "query": query,
            "can_create": any(viewer.authz.intention_write(n) for n in [*names, "*"]),
            "services": names,
        },
        section="intentions",
    )


@ui_view()
def intention_matrix(request: HttpRequest) -> HttpResponse:
    """Each source x destination cell decided by the same IntentionIndex the sidecars use."""
    viewer = request.viewer
    names = _service_names(request)
    q = request.GET.get("q", "").strip()
    if q:
        names = [n for n in names if q.lower() in n.lower()]
    shown = names[:MATRIX_LIMIT]
    cells = []
    for source in shown:
        row = []
        for destination in shown:
            d = intentions.decide(
                viewer.authz,
                ("default", source),
                ("default", destination),
                accessor=viewer.identity.accessor_id,
            )
            kind = "l7" if d.has_l7 else ("allow" if d.allowed else "deny")
            row.append(
                {"destination": destination, "kind": kind, "default": d.default, "reason": d.reason}
            )
        cells.append((source, row))
    return page(
        request,
        "frontend/intention_matrix.html",
        {
            "names": shown,
            "cells": cells,
            "q": q,
            "truncated": len(names) > len(shown),
            "total": len(names),
        },
        section="intentions",
    )


def _spec(post) -> dict:
    action = post.get("action", "")
    spec = {
        "SourceName": post.get("source", "").strip(),
        "DestinationName": post.get("destination", "").strip(),
        "Description": post.get("description", ""),
        "SourceType": "consul",
    }
    permissions = forms.json_field(post.get("permissions", ""), "Permissions")
    if action == "l7" or permissions:
        spec["Permissions"] = permissions or []
        spec["Action"] = ""
    else:
        spec["Action"] = action
    return spec


@ui_view("intention.save")
@require_http_methods(["GET", "POST"])
def intention_edit(request: HttpRequest, intention_id: str = "") -> HttpResponse:
    viewer = request.viewer
    row = intentions.get_by_id(intention_id) if intention_id else None
    if row is not None:
        intentions.require_read(viewer.authz, row, viewer.identity.accessor_id)
    values = {
        "source": row.source_name if row else request.GET.get("source", ""),
        "destination": row.destination_name if row else request.GET.get("destination", ""),
        "action": (row.action or "l7") if row else "allow",
        "description": row.description if row else "",
        "permissions": json.dumps(row.permissions, indent=2) if row and row.permissions else "",
    }
    errors: dict[str, str] = {}
    status = 200
    if request.method == "POST":
        values = {k: request.POST.get(k, "") for k in values}
        try:
            spec = _spec(request.POST)
            accessor = viewer.identity.accessor_id
            if row is None:
                saved = intentions.create(viewer.authz, spec, accessor)
            else:
                saved = intentions.update_by_id(viewer.authz, row.id, spec, accessor)
            return redirect(f"/ui/intentions?destination={saved.destination_name}")
        except MeshError as err:
            if err.status == 403:
                raise
            errors[forms.field_for(err.message, FIELDS) or "form"] = err.message
            status = err.status
    return page(
        request,
        "frontend/intention_form.html",
        {"row": row, "values": values, "errors": errors, "services": _service_names(request)},
        section="intentions",
        status=status,
    )


@ui_view("intention.delete")
@require_POST
def intention_delete(request: HttpRequest, intention_id: str) -> HttpResponse:
    viewer = request.viewer
    intentions.delete_by_id(viewer.authz, intention_id, viewer.identity.accessor_id)
    return redirect("/ui/intentions")


@ui_view()
def intention_check(request: HttpRequest) -> HttpResponse:
    """Would this call be allowed, and by which intention?"""
    viewer = request.viewer
    source = request.GET.get("source", "").strip()
    destination = request.GET.get("destination", "").strip()
    method = request.GET.get("method", "").strip()
    path = request.GET.get("path", "").strip()
    decision, error, matched = None, "", None
    if source and destination:
        try:
            if method or path:
                decision = intentions.decide_request(
                    viewer.authz,
                    ("default", source),
                    ("default", destination),
                    method or "GET",
                    path or "/",
                    accessor=viewer.identity.accessor_id,
                )
            else:
                decision = intentions.decide(
                    viewer.authz,
                    ("default", source),
                    ("default", destination),
                    accessor=viewer.identity.accessor_id,
                )
            if decision.intention_id:
                matched = Intention.objects.filter(id=decision.intention_id).first()
        except MeshError as err:
            error = err.message
    return page(
        request,
        "frontend/intention_check.html",
        {
            "source": source,
            "destination": destination,
            "method": method,
            "path": path,
            "decision": decision,
            "error": error,
            "matched": matched,
            "services": _service_names(request),
        },
        section="intentions",
    )
