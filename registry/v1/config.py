"""Consul's `/v1/config` (config entries) and `/v1/discovery-chain` endpoints."""

from __future__ import annotations

from django.urls import path

from registry.domain import config_entries as entries
from registry.domain import failover
from registry.domain.kv import parse_uint64
from registry.v1.base import Ctx, Reply, endpoint


def _cas(ctx: Ctx) -> int | None:
    return parse_uint64("cas", ctx.param("cas")) if ctx.has("cas") else None


@endpoint("PUT")
def write(ctx: Ctx) -> Reply:
    """`PUT /v1/config`: the body is the entry; `?cas=<ModifyIndex>`; answers true/false."""
    cas = _cas(ctx)
    entry = entries.decode(ctx.json())
    allowed, permission, resource = entries.can_write(ctx.authz, entry["Kind"], entry["Name"])
    ctx.require(allowed, permission, resource)
    written = entries.write(entry, cas=cas)
    # A failover that can never trigger is accepted (as Consul does) but flagged.
    return Reply(written, headers=failover.header(entry) if written else {})


def _kind_topics(ctx: Ctx, kind: str):
    return [entries.kind_topic(kind)], []


@endpoint("GET", topics=_kind_topics)
def list_kind(ctx: Ctx, kind: str) -> Reply:
    """`GET /v1/config/<kind>`: the entries of one kind the caller may read."""
    index, found = entries.list_kind(ctx.authz, kind)
    return Reply(found, index, filterable=True)


def _entry_topics(ctx: Ctx, kind: str, name: str):
    return [entries.entry_topic(kind, name)], []


@endpoint("GET", "DELETE", topics=_entry_topics)
def entry(ctx: Ctx, kind: str, name: str) -> Reply:
    """`GET|DELETE /v1/config/<kind>/<name>`."""
    entries.check_kind(kind)
    if ctx.method == "DELETE":
        cas = _cas(ctx)
        allowed, permission, resource = entries.can_write(ctx.authz, kind, name)
        ctx.require(allowed, permission, resource)
        deleted = entries.delete(kind, name, cas=cas)
        # As Consul: a CAS delete answers true/false, a plain one an empty object.
        return Reply(deleted if cas is not None else {})
    allowed, permission, resource = entries.can_read(ctx.authz, kind, name)
    ctx.require(allowed, permission, resource)
    index, found = entries.get(kind, name)
    if found is None:
        return Reply(
            raw=f'Config entry not found for "{kind}" / "{name}"'.encode(),
            index=index,
            status=404,
            content_type="text/plain; charset=utf-8",
        )
    return Reply(found, index, headers=failover.header(found))


def _chain_topics(ctx: Ctx, service: str):
    return [entries.CHAIN_TOPIC], []


@endpoint("GET", "POST", topics=_chain_topics, batched=False)
def discovery_chain(ctx: Ctx, service: str) -> Reply:
    """`GET|POST /v1/discovery-chain/<service>` (POST carries overrides; both read)."""
    overrides = entries.decode_overrides(ctx.json(required=False)) if ctx.method == "POST" else {}
    ctx.require(ctx.authz.service_read(service), "service:read", service)
    index, chain = entries.discovery_chain(
        service, compile_dc=ctx.param("compile-dc"), overrides=overrides
    )
    return Reply({"Chain": chain}, index)


urlpatterns = [
    path("config", write),
    path("config/", write),
    path("config/<str:kind>", list_kind),
    path("config/<str:kind>/", list_kind),
    path("config/<str:kind>/<path:name>", entry),
    path("discovery-chain/<path:service>", discovery_chain),
]
