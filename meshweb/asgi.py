"""The ASGI application: Django for HTTP, plus meshweb's lifespan.

Startup (run by `mesh server` under uvicorn) binds the change hub to the
server's loop and starts what lives beside the HTTP API in one process: the
Redis change listener (with `REDIS_URL`), the DNS interface and, in the
embedded default, the background task loop.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "meshweb.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_app = get_asgi_application()

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
