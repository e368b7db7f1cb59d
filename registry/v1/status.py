"""`/v1/status/...`: one control plane, always its own leader."""

from __future__ import annotations

from django.conf import settings

from registry.v1.base import Ctx, Reply, endpoint


def _addr() -> str:
    host, port = settings.MESH_HTTP_ADDR
    return f"{host}:{port}"


@endpoint("GET")
def leader(ctx: Ctx) -> Reply:
    return Reply(_addr())


@endpoint("GET")
def peers(ctx: Ctx) -> Reply:
    return Reply([_addr()])
