"""The ASGI application: `/v1` on a lean async path, everything else through
Django's WSGI handler on a bounded thread pool, plus meshweb's lifespan.

Why two paths: `/v1` views are async (a thousand blocking queries must cost
little), see `meshweb.fastpath`. The REST API, docs and UI views are sync
(DRF); Django's ASGI handler would start a new thread for every such
request, so they run on a fixed pool of threads instead (a2wsgi).

Startup (run by `mesh server` under uvicorn) binds the change hub to the
server's loop and starts what lives beside the HTTP API in one process: the
Redis change listener (with `REDIS_URL`), the DNS interface, the gRPC server
for agents and, in the embedded default, the background task loop.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "meshweb.settings")

from a2wsgi import WSGIMiddleware  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402

django_app = WSGIMiddleware(get_wsgi_application(), workers=settings.MESH_API_THREADS)

from meshweb.fastpath import handle_v1  # noqa: E402  (needs Django set up)


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        from meshweb.lifespan import lifespan

        await lifespan(scope, receive, send)
        return
    if scope["type"] == "http" and scope["path"].startswith("/v1/"):
        await handle_v1(scope, receive, send)
        return
    await django_app(scope, receive, send)
