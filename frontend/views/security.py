"""Security: the Connect CA's roots, the active one, rotation (confirmed, with
its progress as leaves move to the new root) and the leaves issued."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.utils import timezone
from django.views.decorators.http import require_POST

from frontend import paging
from frontend.auth import ui_view
from frontend.render import page
from registry.domain import connect_ca, dashboard
from registry.models import IssuedCert


@ui_view()
def security(request: HttpRequest) -> HttpResponse:
    viewer = request.viewer
    viewer.require("operator_read")  # as the CA configuration read
    _index, roots = connect_ca.roots_json()
    leaves = IssuedCert.objects.select_related("root").order_by("not_after")
    if request.GET.get("expired") != "1":
        leaves = leaves.filter(not_after__gt=timezone.now())
    q = request.GET.get("q", "").strip()
    if q:
        leaves = leaves.filter(name__icontains=q)
    query = {k: v for k, v in (("q", q), ("expired", request.GET.get("expired", ""))) if v}
    return page(
        request,
        "frontend/security.html",
        {
            "roots": roots,
            "progress": dashboard.rotation_progress(),
            "page": paging.paginate(request, leaves, query),
            "q": q,
            "can_rotate": viewer.authz.operator_write(),
        },
        section="security",
    )


@ui_view("ca.rotate")
@require_POST
def rotate(request: HttpRequest) -> HttpResponse:
    request.viewer.require("operator_write")
    if request.POST.get("confirm") != "rotate":
        return redirect("/ui/security")
    connect_ca.rotate()
    return redirect("/ui/security")
