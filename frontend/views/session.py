"""Sign in with an ACL token, sign out."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from frontend import auth
from registry.errors import MeshError


def _next(request: HttpRequest) -> str:
    target = request.POST.get("next") or request.GET.get("next") or "/ui/"
    ok = url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()})
    return target if ok and target.startswith("/ui/") else "/ui/"


@require_http_methods(["GET", "POST"])
def login(request: HttpRequest) -> HttpResponse:
    if not settings.MESH_ACL_ENABLED:
        return redirect("/ui/")
    error = ""
    if request.method == "POST":
        try:
            auth.sign_in(request, request.POST.get("token", ""))
            return redirect(_next(request))
        except MeshError as err:
            error = "That token is not valid (unknown or expired)." if err.status == 403 else ""
            error = error or err.message
    return render(
        request,
        "frontend/login.html",
        {"error": error, "next": _next(request)},
        status=403 if error else 200,
    )


@require_POST
def logout(request: HttpRequest) -> HttpResponse:
    auth.sign_out(request)
    return redirect("/ui/login")
