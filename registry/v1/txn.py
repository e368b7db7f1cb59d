"""`PUT /v1/txn`: Consul's multi-operation transaction endpoint.

A transaction that writes runs on the writer (one write of the batch, one
index); one that only reads runs on the read pool. Failed operations answer
`409` with `Errors` (each `OpIndex` and `What`) and nothing applied.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import path

from registry import audit, db
from registry.decode import parse_body_json
from registry.domain import txn as domain
from registry.errors import BadRequest, MeshError, TooLarge
from registry.v1.base import Ctx, Reply, _audited, _error, _render


def txn_write(ctx: Ctx, ops: list[domain.Op], body: object = None) -> Reply:
    """A transaction that writes, run by the writer in an audit scope named `txn.txn_write`."""
    audit.note_body(body)
    index, results = domain.apply(ctx.authz, ops)
    return Reply({"Results": results, "Errors": None})


def _read(ctx: Ctx, ops: list[domain.Op]) -> Reply:
    index, results = domain.read(ctx.authz, ops)
    return Reply({"Results": results, "Errors": None}, index)


def _not_allowed(request: HttpRequest) -> HttpResponse:
    return HttpResponse(
        f"method {request.method} not allowed".encode(),
        status=405,
        content_type="text/plain; charset=utf-8",
        headers={"Allow": "PUT"},
    )


async def txn(request: HttpRequest) -> HttpResponse:
    """`PUT /v1/txn`: reads on the pool, writes on the writer; 409 with `Errors`."""
    if request.method != "PUT":
        return _not_allowed(request)
    ctx = Ctx(request)
    try:
        try:
            length = int(request.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("Invalid Content-Length") from None
        limit = settings.MESH_TXN_MAX_REQ_LEN
        if length > limit:
            raise TooLarge(f"Request body({length} bytes) too large, max size: {limit} bytes")
        body = parse_body_json(request.body)
        ops = domain.decode_ops(body)
        if domain.is_read_only(ops):
            reply = await db.run(_read, ctx, ops)
        else:
            reply = await db.run_write(_audited, txn_write, ctx, {"ops": ops, "body": body})
    except domain.TxnFailed as exc:
        return HttpResponse(json.dumps(exc.body()), status=409, content_type="application/json")
    except MeshError as exc:
        return _error(exc)
    return _render(ctx, reply)


txn.csrf_exempt = True  # token-authenticated API, no cookies
txn.endpoint = txn_write
txn.methods = frozenset({"PUT"})

urlpatterns = [path("txn", txn)]
