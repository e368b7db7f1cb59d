"""Every `/api` error is JSON: `{"error": "<message>"}` with the right status.

Domain errors (`registry.errors.MeshError`) keep their status and message;
validation errors (400) name each field (`"fields": {"port": ["..."]}` and a
one-line summary in `error`); other DRF and Django errors keep their status.
What escapes DRF (a bug, a refused request before the view) reaches Django's
error handlers, which `meshweb.urls` points here: JSON under `/api`, Django's
own pages elsewhere (the UI).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions
from rest_framework.response import Response

from registry.errors import MeshError


def _flatten(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested error detail as `{"checks[0].interval": ["..."]}`."""
    out: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            if key == "non_field_errors":
                name = prefix or "body"
            elif isinstance(key, int) or (prefix and str(key).isdigit()):
                name = f"{prefix}[{key}]"  # an item of a list field
            else:
                name = f"{prefix}.{key}" if prefix else str(key)
            out.update(_flatten(value, name))
    elif isinstance(detail, list):
        if all(not isinstance(v, (dict, list)) for v in detail):
            out[prefix or "body"] = [str(v) for v in detail]
        else:
            for i, value in enumerate(detail):
                if value:
                    out.update(_flatten(value, f"{prefix}[{i}]"))
    else:
        out[prefix or "body"] = [str(detail)]
    return out


def validation_body(detail: Any) -> dict[str, Any]:
    fields = _flatten(detail)
    summary = "; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in fields.items())
    return {"error": f"Invalid request: {summary}", "fields": fields}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER for `/api`."""
    if isinstance(exc, MeshError):
        return Response({"error": exc.message}, status=exc.status)
    if isinstance(exc, Http404):
        message = str(exc) or "Not found"
        return Response({"error": message}, status=404)
    if isinstance(exc, DjangoPermissionDenied):
        return Response({"error": str(exc) or "Permission denied"}, status=403)
    if isinstance(exc, exceptions.ValidationError):
        return Response(validation_body(exc.detail), status=400)
    if isinstance(exc, exceptions.ParseError):
        body: dict[str, Any] = {"error": f"Invalid request body: {exc.detail}"}
        field = getattr(exc, "field", None)  # registry.api.parsers.BodyParseError
        if field:
            body["fields"] = {field: [exc.reason]}
        return Response(body, status=400)
    if isinstance(exc, exceptions.APIException):
        headers = {}
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        if getattr(exc, "wait", None):
            headers["Retry-After"] = str(exc.wait)
        detail = exc.detail
        message = detail if isinstance(detail, str) else str(detail)
        return Response({"error": message}, status=exc.status_code, headers=headers)
    return None


def not_found(request, *args: Any, **kwargs: Any) -> JsonResponse:
    """`/api/<anything unknown>`: a JSON 404 rather than Django's HTML page."""
    hint = ""
    if not request.path.endswith("/"):
        hint = f" (paths end with a slash: {request.path}/)"
    return JsonResponse({"error": f"Not found: {request.path}{hint}"}, status=404)


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith(("/api/", "/v1/")) or request.path == "/api"


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's handler400 (a suspicious or malformed request)."""
    if _is_api(request):
        return JsonResponse(
            {"error": f"Bad request: {exception}" if str(exception) else "Bad request"}, status=400
        )
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's handler403."""
    if _is_api(request):
        return JsonResponse({"error": str(exception) or "Permission denied"}, status=403)
    return defaults.permission_denied(request, exception)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's handler404."""
    if _is_api(request):
        return JsonResponse({"error": f"Not found: {request.path}"}, status=404)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    """Django's handler500: the traceback is in the log (django.request), never the body."""
    if _is_api(request):
        return JsonResponse({"error": "Internal server error"}, status=500)
    return defaults.server_error(request)
