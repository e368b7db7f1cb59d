"""Response headers for the web UI's pages (`/ui/...`).

A strict Content-Security-Policy: scripts, styles, images and connections
from this origin only, no inline script or style anywhere (the templates
carry none; htmx is configured not to inject its indicator styles), no
framing (`frame-ancestors 'none'` beside Django's `X-Frame-Options: DENY`),
forms posting only back here. Pages are `no-store`: they show what a
signed-in token may see, and must not outlive its session in a cache.
The admin, Swagger UI and Redoc keep their own (inline) pages and headers.
"""

from __future__ import annotations

from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

UI_PREFIX = "/ui/"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
        "base-uri 'none'",
        "object-src 'none'",
    )
)


class UISecurityHeadersMiddleware:
    """Adds the UI's security headers to every `/ui/` response (sync and async:
    no middleware may make an async request hold a thread)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):
        if iscoroutinefunction(self):
            return self._acall(request)
        response = self.get_response(request)
        _maybe_apply(request, response)
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        response = await self.get_response(request)
        _maybe_apply(request, response)
        return response


def _maybe_apply(request: HttpRequest, response: HttpResponse) -> None:
    if request.path.startswith(UI_PREFIX) or request.path == "/":
        apply_headers(response)


def apply_headers(response: HttpResponse) -> None:
    """The headers every UI response carries (also used by the event stream)."""
    response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response["X-Frame-Options"] = "DENY"
    response["X-Content-Type-Options"] = "nosniff"
    response["Referrer-Policy"] = "same-origin"
    response.setdefault("Cache-Control", "no-store")
