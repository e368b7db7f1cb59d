"""`/v1/snapshot`: save (`GET`) and restore (`PUT`) the whole registry, as Consul's.

Both need a management token (Consul's rule). `GET` answers the archive
(`application/x-gzip`, `X-Consul-Index` the index it was taken at; `?audit=false`
leaves the audit log out); `PUT` takes one as the body and answers `200`
with an empty body, or `400` with nothing changed when it is refused.
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import path

from registry import db
from registry.domain import snapshot as domain
from registry.errors import BadRequest, MeshError, TooLarge
from registry.v1.base import Ctx, Reply, _audited, _error, _render


def _require_management(ctx: Ctx) -> None:
    if settings.MESH_ACL_ENABLED:
        ctx.require(ctx.authz.is_management(), "management")


def _save(ctx: Ctx) -> Reply:
    _require_management(ctx)
    data, index = domain.save(include_audit=ctx.flag("audit") if ctx.has("audit") else True)
    return Reply(raw=data, index=index, content_type="application/x-gzip")


def restore(ctx: Ctx, data: bytes = b"") -> Reply:
    """The restore, run in an audit scope named `snapshot.restore`."""
    _require_management(ctx)
    snap = domain.parse(data)
    index = domain.restore(snap)
    return Reply(raw=b"", index=index, content_type="text/plain")


def _read_body(request: HttpRequest) -> bytes:
    limit = settings.MESH_SNAPSHOT_MAX_SIZE
    try:
        length = int(request.headers.get("Content-Length") or 0)
    except ValueError:
        raise BadRequest("Invalid Content-Length") from None
    if length > limit:
        raise TooLarge(f"Snapshot too large ({length} bytes), max size: {limit} bytes")
    data = request.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"Snapshot too large, max size: {limit} bytes")
    if not data:
        raise BadRequest("snapshot refused: empty body")
    return data


async def snapshot(request: HttpRequest) -> HttpResponse:
    """`GET /v1/snapshot` (save) and `PUT /v1/snapshot` (restore)."""
    if request.method not in ("GET", "PUT"):
        return HttpResponse(
            f"method {request.method} not allowed".encode(),
            status=405,
            content_type="text/plain; charset=utf-8",
            headers={"Allow": "GET, PUT"},
        )
    ctx = Ctx(request)
    try:
        if request.method == "GET":
            reply = await db.run(_save, ctx)
        else:
            data = _read_body(request)
            # Not on the batching writer: a restore replaces every table and must
            # not share a transaction (or an index reservation) with other writes.
            # It locks the index row, so writers wait for it to commit.
            reply = await db.run_detached(_audited, restore, ctx, {"data": data})
    except MeshError as exc:
        return _error(exc)
    return _render(ctx, reply)


snapshot.csrf_exempt = True  # token-authenticated API, no cookies
snapshot.endpoint = restore
snapshot.methods = frozenset({"GET", "PUT"})

urlpatterns = [path("snapshot", snapshot)]
