"""Consul's `/v1/peering` endpoints, and the two a peer's servers call.

Operator endpoints (ACL `peering:read` / `peering:write`):
`POST /v1/peering/token`, `POST /v1/peering/establish`, `GET /v1/peerings`,
`GET|DELETE /v1/peering/<name>`.

Server-to-server endpoints (no ACL token: the peering token or the stream
secret is the credential): `POST /v1/peering/exchange` (establishment),
`GET /v1/peering/exported` (the blocking feed of what we export to the
caller) and `POST /v1/peering/terminate` (the peer deleted the peering).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from django.http import HttpRequest, HttpResponse
from django.urls import path

from meshproto.peering import SECRET_HEADER
from registry import db
from registry import topics as topic
from registry.changes import hub
from registry.domain import peering
from registry.errors import MeshError
from registry.v1.base import Ctx, Reply, _blocking_params, _error, _index_headers, endpoint


def _body(ctx: Ctx) -> dict:
    data = ctx.json()
    if not isinstance(data, dict):
        from registry.errors import BadRequest

        raise BadRequest("Request decode failed: the body must be a JSON object")
    return data


@endpoint("POST", batched=False)
def token(ctx: Ctx) -> Reply:
    """`POST /v1/peering/token`: `{"PeerName": ...}` -> `{"PeeringToken": ...}`."""
    ctx.require(ctx.authz.peering_write(), "peering:write")
    return Reply(peering.generate_token(_body(ctx)))


@endpoint("POST", batched=False)
def establish(ctx: Ctx) -> Reply:
    """`POST /v1/peering/establish`: `{"PeerName": ..., "PeeringToken": ...}` -> `{}`."""
    ctx.require(ctx.authz.peering_write(), "peering:write")
    return Reply(peering.establish(_body(ctx)))


_EXPORTS = topic.config_entry("exported-services", "default")


@endpoint("GET", topics=lambda ctx: ([topic.PEERINGS, _EXPORTS], [topic.peered_services("")]))
def peerings(ctx: Ctx) -> Reply:
    """`GET /v1/peerings`: every peering."""
    ctx.require(ctx.authz.peering_read(), "peering:read")
    index, data = peering.list_peerings()
    return Reply(data, index, filterable=True)


def _one_topics(ctx: Ctx, name: str):
    return [topic.peering(name), topic.peered_services(name), _EXPORTS], []


@endpoint("GET", "DELETE", topics=_one_topics, batched=False)
def one(ctx: Ctx, name: str) -> Reply:
    """`GET|DELETE /v1/peering/<name>`."""
    if ctx.method == "DELETE":
        ctx.require(ctx.authz.peering_write(), "peering:write")
        peering.delete(name)
        return Reply({})
    ctx.require(ctx.authz.peering_read(), "peering:read")
    index, data = peering.read(name)
    if data is None:
        return Reply(
            raw=f'Peering not found for "{name}"'.encode(),
            index=index,
            status=404,
            content_type="text/plain; charset=utf-8",
        )
    return Reply(data, index)


@endpoint("POST", batched=False)
def exchange(ctx: Ctx) -> Reply:
    """The dialer's server presents the token and its trust bundle."""
    return Reply(peering.exchange(_body(ctx)))


@endpoint("POST")
def terminate(ctx: Ctx) -> Reply:
    """The peer deleted the peering (authenticated by its stream secret)."""
    peering.terminate(ctx.request.headers.get(SECRET_HEADER, ""))
    return Reply({})


def _feed_state(secret: str) -> tuple[str, int, dict]:
    row = peering.feed_peer(secret)
    index = peering.feed_index(row.name)  # read before the payload: no change slips by
    payload = peering.export_payload(row)
    peering.note_sent(row)
    return row.name, index, payload


async def exported(request: HttpRequest) -> HttpResponse:
    """`GET /v1/peering/exported?index=&hash=&wait=`: what we export to the caller.

    A blocking query over the topics the export depends on; it answers when
    the content differs from `?hash=` (the importer's copy), or at `wait`,
    so an importer that is up to date costs a parked request, not a stream
    of identical answers.
    """
    if request.method != "GET":
        return HttpResponse(b"method not allowed", status=405, headers={"Allow": "GET"})
    ctx = Ctx(request)
    secret = request.headers.get(SECRET_HEADER, "")
    try:
        _, wait = _blocking_params(ctx)
        known = ctx.param("hash")
        deadline = time.monotonic() + wait
        row = await db.run(peering.feed_peer, secret)
        if row.state == row.ESTABLISHING:
            await db.run_write(peering.confirm, secret)
        while True:
            name = (await db.run(peering.feed_peer, secret)).name
            topics = await db.run(peering.feed_topics, name)
            waiter = hub.watch(topics)
            try:
                _, index, payload = await db.run(_feed_state, secret)
                remaining = deadline - time.monotonic()
                if payload["Hash"] != known or remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.future, remaining)
            finally:
                hub.unwatch(waiter)
    except MeshError as exc:
        return _error(exc)
    response = HttpResponse(json.dumps(payload).encode(), content_type="application/json")
    _index_headers(response, index)
    return response


exported.csrf_exempt = True  # type: ignore[attr-defined]

urlpatterns = [
    path("peering/token", token),
    path("peering/establish", establish),
    path("peering/exchange", exchange),
    path("peering/terminate", terminate),
    path("peering/exported", exported),
    path("peerings", peerings),
    path("peering/<str:name>", one),
]
