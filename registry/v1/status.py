"""`/v1/status/leader`: every server process is its own leader (they share one
database; there is no election). `/v1/status/peers` is `registry.v1.operator`'s."""

from __future__ import annotations

from django.conf import settings

from registry.v1.base import Ctx, Reply, endpoint


def _addr() -> str:
    host, port = settings.MESH_HTTP_ADDR
    return f"{host}:{port}"


@endpoint("GET")
def leader(ctx: Ctx) -> Reply:
    return Reply(_addr())
