"""`GET /v1/agent/metrics` and `GET /v1/agent/health`: the control plane's own state.

Plain async views rather than `endpoint(...)` functions: the values live on
the event loop's thread (the change hub), and the health probe must answer
within a bound even when the database pool is stuck.
"""

from __future__ import annotations

import asyncio
import json

from django.http import HttpRequest, HttpResponse

from registry import db, server_metrics
from registry.domain import catalog
from registry.errors import MeshError
from registry.v1.base import Ctx, _error

HEALTH_DB_TIMEOUT = 2.0


def _allowed(ctx: Ctx) -> None:
    node = catalog.local_node()
    ctx.require(ctx.authz.agent_read(node.name), "agent:read", node.name)


def _method_not_allowed(request: HttpRequest) -> HttpResponse:
    return HttpResponse(
        f"method {request.method} not allowed".encode(),
        status=405,
        content_type="text/plain; charset=utf-8",
        headers={"Allow": "GET"},
    )


async def metrics(request: HttpRequest) -> HttpResponse:
    """Consul's metrics endpoint (needs `agent:read`); `?format=prometheus` for text."""
    if request.method != "GET":
        return _method_not_allowed(request)
    ctx = Ctx(request)
    try:
        await db.run(_allowed, ctx)
    except MeshError as exc:
        return _error(exc)
    values = server_metrics.snapshot()
    if ctx.param("format") == "prometheus":
        return HttpResponse(
            server_metrics.prometheus_text(values).encode(),
            content_type="text/plain; version=0.0.4; charset=utf-8",
        )
    return HttpResponse(
        json.dumps(server_metrics.consul_json(values)).encode(), content_type="application/json"
    )


async def health(request: HttpRequest) -> HttpResponse:
    """200 when the writer runs and the database answers, else 503; no token needed."""
    if request.method != "GET":
        return _method_not_allowed(request)
    error: str | None = None
    try:
        await asyncio.wait_for(db.run(server_metrics.ping_database), HEALTH_DB_TIMEOUT)
    except TimeoutError:
        error = f"no answer within {HEALTH_DB_TIMEOUT:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is the answer
        error = f"{type(exc).__name__}: {exc}".strip()
    state = server_metrics.health(error)
    return HttpResponse(
        json.dumps(state.as_json()).encode(),
        status=200 if state.ok else 503,
        content_type="application/json",
    )
