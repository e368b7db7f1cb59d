"""`/v1/kv/<key>`: Consul's key/value endpoint (GET, PUT, DELETE on one path)."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.urls import path

from registry.domain import kv, reads
from registry.errors import TooLarge
from registry.v1.base import RESULTS_FILTERED_HEADER, Ctx, Reply, endpoint


def _key(ctx: Ctx, key: str) -> str:
    """The key as sent: from the raw path when the server gives it (non-UTF-8 is a 400)."""
    scope = getattr(ctx.request, "scope", None)
    raw = scope.get("raw_path") if isinstance(scope, dict) else None
    return kv.key_from_raw_path(raw) if raw else key


def _is_prefix_read(ctx: Ctx) -> bool:
    return ctx.flag("keys") or ctx.flag("recurse")


def _topics(ctx: Ctx, key: str = ""):
    key = _key(ctx, key)
    topic = kv.key_topic(key)
    return ([], [topic]) if _is_prefix_read(ctx) else ([topic], [])


def _filtered(filtered: bool) -> dict[str, str]:
    return {RESULTS_FILTERED_HEADER: "true"} if filtered else {}


@endpoint("GET", "PUT", "DELETE", topics=_topics)
def entry(ctx: Ctx, key: str = "") -> Reply:
    key = _key(ctx, key)
    if ctx.has("dc"):
        reads.check_datacenter(ctx.dc)
    if ctx.method == "PUT":
        return _put(ctx, key)
    if ctx.method == "DELETE":
        return _delete(ctx, key)
    return _get(ctx, key)


def _get(ctx: Ctx, key: str) -> Reply:
    authz = ctx.authz
    if ctx.flag("keys"):
        kv.validate_key(key, allow_empty=True)
        ctx.require(authz.key_list(key), "key:list", key)
        # Consul still honours its historic misspelling.
        separator = ctx.param("separator", ctx.param("seperator"))
        listing = kv.list_keys(authz, key, separator)
        if not listing.items and key:  # the root answers [] rather than 404
            return Reply(None, listing.index, status=404)
        return Reply(listing.items, listing.index, headers=_filtered(listing.filtered))
    if ctx.flag("recurse"):
        kv.validate_key(key, allow_empty=True)
        listing = kv.list_prefix(authz, key)
        if not listing.items:
            return Reply(None, listing.index, status=404)
        data = [kv.entry_json(e) for e in listing.items]
        return Reply(data, listing.index, headers=_filtered(listing.filtered))
    kv.validate_key(key)
    ctx.require(authz.key_read(key), "key:read", key)
    index, found = kv.get(key)
    if found is None:
        return Reply(None, index, status=404)
    if ctx.flag("raw"):
        return Reply(
            raw=bytes(found.value or b""),
            index=index,
            content_type="text/plain",
            # As Consul: a stored value must never run as a page in a browser.
            headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"},
        )
    return Reply([kv.entry_json(found)], index)


def _optional_uint(ctx: Ctx, name: str) -> int | None:
    return kv.parse_uint64(name, ctx.param(name)) if ctx.has(name) else None


def _put(ctx: Ctx, key: str) -> Reply:
    kv.validate_key(key)
    flags = _optional_uint(ctx, "flags") or 0
    cas = _optional_uint(ctx, "cas")
    acquire = ctx.param("acquire") if ctx.has("acquire") else None
    release = ctx.param("release") if ctx.has("release") else None
    # Refuse an oversized value before reading it, as Consul does.
    kv.check_value_size(int(ctx.request.headers.get("Content-Length") or 0))
    try:
        value = ctx.body_bytes()
    except RequestDataTooBig:  # a chunked body past what Django will buffer
        raise TooLarge(
            f"Request body too large, max size: {settings.MESH_KV_MAX_VALUE_SIZE} bytes"
        ) from None
    kv.check_value_size(len(value))
    ctx.require(ctx.authz.key_write(key), "key:write", key)
    return Reply(kv.put(key, value, flags=flags, cas=cas, acquire=acquire, release=release))


def _delete(ctx: Ctx, key: str) -> Reply:
    recurse = ctx.flag("recurse")
    cas = _optional_uint(ctx, "cas")
    kv.validate_key(key, allow_empty=recurse)
    if recurse:
        ctx.require(ctx.authz.key_write_prefix(key), "key:write", key)
    else:
        ctx.require(ctx.authz.key_write(key), "key:write", key)
    return Reply(kv.delete(key, recurse=recurse, cas=cas))


urlpatterns = [
    path("kv/", entry),
    path("kv/<path:key>", entry),
]
