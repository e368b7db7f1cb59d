"""Static files (Swagger UI, Redoc, the browsable API's) are served by the ASGI app
itself through an async-capable WhiteNoise, so no request is pushed onto a thread."""

from __future__ import annotations

import asyncio
import logging

from django.core.handlers.asgi import ASGIHandler
from django.test import AsyncClient


def test_every_middleware_runs_async_so_blocking_queries_hold_no_thread(caplog, settings):
    # With DEBUG on, Django logs each sync-only middleware it has to wrap.
    settings.DEBUG = True
    with caplog.at_level(logging.DEBUG, logger="django.request"):
        ASGIHandler()
    adapted = [r.getMessage() for r in caplog.records if "adapted for" in r.getMessage()]
    assert adapted == []


def test_a_static_file_streams_from_the_async_path():
    async def fetch():
        r = await AsyncClient().get(
            "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui.css"
        )
        return r, b"".join([chunk async for chunk in r.streaming_content])

    r, body = asyncio.run(fetch())
    assert r.status_code == 200
    assert r["Content-Type"].startswith("text/css")
    assert len(body) == int(r["Content-Length"]) > 1000
