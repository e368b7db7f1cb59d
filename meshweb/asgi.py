"""The ASGI application: `/v1` on a lean async path, everything else through
Django's WSGI handler on a bounded thread pool, plus meshweb's lifespan.

Why two paths: `/v1` views are async (a thousand blocking queries must cost
little), see `meshweb.fastpath`. The REST API, docs and UI views are sync
(DRF); Django's ASGI handler would start a new thread for every such
request, so they run on a fixed pool of threads instead (a2wsgi).

Django's WSGI side reads exactly `Content-Length` bytes of a body, so a
chunked body (no length) would read as empty and a `PUT` would store `null`;
`django_with_length` reads such a body first (bounded by MESH_MAX_BODY_SIZE)
and hands it on with its length, so every body path reads chunked bodies.

Startup (run by `mesh server` under uvicorn) binds the change hub to the
server's loop and starts what lives beside the HTTP API in one process: the
Redis change listener (with `REDIS_URL`), the DNS interface, the gRPC server
for agents and, in the embedded default, the background task loop.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "meshweb.settings")

from a2wsgi import WSGIMiddleware  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402

django_app = WSGIMiddleware(get_wsgi_application(), workers=settings.MESH_API_THREADS)

from frontend import events as ui_events  # noqa: E402  (needs Django set up)
from meshweb import health  # noqa: E402
from meshweb.fastpath import handle_v1, read_body  # noqa: E402  (needs Django set up)


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def django_with_length(scope, receive, send) -> None:
    """Django's app, given every request body with a Content-Length."""
    if (
        scope["type"] != "http"
        or _header(scope, b"content-length") is not None
        or _header(scope, b"transfer-encoding") is None
    ):
        await django_app(scope, receive, send)
        return
    body, too_large = await read_body(receive, settings.MESH_MAX_BODY_SIZE)
    if body is None:
        return  # the client went away
    if too_large:
        message = f"Request body too large, max size: {settings.MESH_MAX_BODY_SIZE} bytes"
        payload = json.dumps({"error": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        return
    data = body.getvalue()
    headers = [(k, v) for k, v in scope["headers"] if k != b"transfer-encoding"]
    headers.append((b"content-length", str(len(data)).encode()))
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": data, "more_body": False}
        return await receive()  # after the body: only a disconnect can come

    await django_app({**scope, "headers": headers}, replay, send)


def _has_nul(scope) -> bool:
    """A NUL in the path or query: PostgreSQL text cannot hold one, so every
    lookup with it would fail deep in the database (a 500)."""
    return "\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")


async def _refuse_nul(scope, send) -> None:
    message = "Invalid request: the URL contains a NUL character (%00)"
    if scope["path"].startswith("/v1/"):
        body, kind = message.encode(), b"text/plain; charset=utf-8"  # Consul's plain text
    else:
        body, kind = json.dumps({"error": message}).encode(), b"application/json"
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        from meshweb.lifespan import lifespan

        await lifespan(scope, receive, send)
        return
    if scope["type"] == "http" and _has_nul(scope):
        await _refuse_nul(scope, send)
        return
    if scope["type"] == "http" and scope["path"].startswith("/v1/"):
        await handle_v1(scope, receive, send)
        return
    if scope["type"] == "http" and scope["path"] in health.PATHS:
        await health.handle(scope, receive, send)
        return
    if scope["type"] == "http" and scope["path"] == ui_events.PATH:
        # The UI's live-update stream lives on the loop, beside the change hub.
        await ui_events.handle(scope, receive, send)
        return
    await django_with_length(scope, receive, send)
