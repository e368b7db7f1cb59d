"""Consul's Connect CA endpoints: `/v1/connect/ca/...` and `/v1/agent/connect/ca/...`."""

from __future__ import annotations

import asyncio
import contextlib
import time

from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.utils import timezone

from registry import db
from registry.changes import hub
from registry.domain import connect_ca
from registry.errors import MeshError

# The leaf endpoint's blocking loop reuses the shared plumbing's parameter
# parsing and rendering (its waits also end when the cached leaf is due for
# renewal, which no topic announces, so it cannot use `endpoint(topics=...)`).
from registry.v1.base import Ctx, Reply, _blocking_params, _error, _render, endpoint


def _roots_topics(ctx: Ctx, **_):
    return [connect_ca.TOPIC_ROOTS], []


def _roots(ctx: Ctx) -> Reply:
    if ctx.flag("pem"):
        index, bundle = connect_ca.roots_pem()
        return Reply(
            None, index, raw=bundle.encode(), content_type="application/pem-certificate-chain"
        )
    index, data = connect_ca.roots_json()
    return Reply(data, index)


@endpoint("GET", topics=_roots_topics)
def roots(ctx: Ctx) -> Reply:
    """The trust bundle: no ACL needed (as Consul)."""
    return _roots(ctx)


@endpoint("GET", topics=_roots_topics)
def agent_roots(ctx: Ctx) -> Reply:
    return _roots(ctx)


@endpoint("GET", "PUT", topics=lambda ctx, **_: ([connect_ca.TOPIC_CONFIG], []), batched=False)
def configuration(ctx: Ctx) -> Reply:
    if ctx.method == "PUT":
        ctx.require(ctx.authz.operator_write(), "operator:write")
        connect_ca.set_configuration(ctx.json())
        return Reply(None, raw=b"")
    ctx.require(ctx.authz.operator_read(), "operator:read")
    index, data = connect_ca.configuration_json()
    return Reply(data, index)


def _leaf(ctx: Ctx, service: str) -> Reply:
    leaf = connect_ca.agent_leaf(ctx.identity, service)
    return Reply(leaf.json(), leaf.leaf.index)


async def leaf(request: HttpRequest, service: str) -> HttpResponse:
    """`GET /v1/agent/connect/ca/leaf/:service`, blocking-query capable: with
    `?index=` it answers when a newer leaf exists (renewal at half-life, a
    root rotation) or `wait` passed."""
    if request.method != "GET":
        return HttpResponse(
            f"method {request.method} not allowed".encode(),
            status=405,
            content_type="text/plain; charset=utf-8",
            headers={"Allow": "GET"},
        )
    ctx = Ctx(request)
    topics = (connect_ca.TOPIC_ROOTS, connect_ca.leaf_topic(service))
    try:
        min_index, wait = _blocking_params(ctx)
        deadline = time.monotonic() + wait
        while True:
            waiter = hub.watch(topics) if min_index else None
            try:
                reply = await db.run(_leaf, ctx, service)
                remaining = deadline - time.monotonic()
                if waiter is None or reply.index > min_index or remaining <= 0:
                    return _render(ctx, reply)
                renew_at = connect_ca.leaf_renew_at(service)
                if renew_at is not None:
                    remaining = min(remaining, (renew_at - timezone.now()).total_seconds() + 0.05)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.future, max(remaining, 0.0))
            finally:
                if waiter is not None:
                    hub.unwatch(waiter)
    except MeshError as exc:
        return _error(exc)


leaf.csrf_exempt = True  # type: ignore[attr-defined]

urlpatterns = [
    path("connect/ca/roots", roots),
    path("connect/ca/configuration", configuration),
    path("agent/connect/ca/roots", agent_roots),
    path("agent/connect/ca/leaf/<path:service>", leaf),
]
