"""The KV browser and editor: folders, values shown safely (binary ones as a size
and a hex preview, never as markup), compare-and-set on save and delete. Reads
and writes are `registry.domain.kv`'s, with `/v1/kv`'s ACL questions."""

from __future__ import annotations

from urllib.parse import urlencode

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from frontend import paging
from frontend.auth import ui_view
from frontend.render import page
from registry.domain import audit_log, kv
from registry.errors import BadRequest, MeshError

SEPARATOR = "/"
TEXT_PREVIEW = 64 * 1024
HEX_PREVIEW = 256


def _crumbs(prefix: str) -> list[tuple[str, str]]:
    out, acc = [], ""
    for part in [p for p in prefix.split(SEPARATOR) if p]:
        acc += part + SEPARATOR
        out.append((part, acc))
    return out


@ui_view()
def kv_browse(request: HttpRequest) -> HttpResponse:
    viewer = request.viewer
    prefix = request.GET.get("prefix", "")
    kv.validate_key(prefix, allow_empty=True)
    viewer.require("key_list", prefix)  # as `/v1/kv/<prefix>?keys`
    listing = kv.list_keys(viewer.authz, prefix, SEPARATOR)
    keys = [k for k in listing.items if k != prefix]
    pg = paging.paginate(request, keys, {"prefix": prefix} if prefix else {})
    rows = [{"key": k, "label": k[len(prefix) :], "folder": k.endswith(SEPARATOR)} for k in pg.rows]
    return page(
        request,
        "frontend/kv.html",
        {
            "prefix": prefix,
            "crumbs": _crumbs(prefix),
            "page": pg,
            "rows": rows,
            "can_create": viewer.authz.key_write_prefix(prefix) or viewer.authz.key_write(prefix),
        },
        section="kv",
    )


def _shown(value: bytes) -> dict:
    """How a value is shown: as text when it is UTF-8 without control characters."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\n\r\t" for c in text):
        return {"binary": False, "text": text[:TEXT_PREVIEW], "truncated": len(text) > TEXT_PREVIEW}
    return {
        "binary": True,
        "hex": value[:HEX_PREVIEW].hex(" "),
        "truncated": len(value) > HEX_PREVIEW,
    }


@ui_view("kv.edit")
@require_http_methods(["GET", "POST"])
def kv_edit(request: HttpRequest) -> HttpResponse:
    viewer = request.viewer
    key = (request.POST.get("key") or request.GET.get("key") or "").strip()
    creating = request.GET.get("new") == "1" or request.POST.get("new") == "1"
    error, stale, status = "", None, 200
    entry = None
    if key:
        kv.validate_key(key)
        if not creating:
            viewer.require("key_read", key)
        _index, entry = kv.get(key)
        if creating and entry is not None:
            viewer.require("key_read", key)
    value_text = request.POST.get("value", "")
    if request.method == "POST":
        try:
            if not key:
                raise BadRequest("Key: enter a key name")
            viewer.require("key_write", key)
            cas = int(request.POST.get("cas", "0") or 0)
            raw = value_text.replace("\r\n", "\n").encode("utf-8")
            if kv.put(key, raw, cas=cas):
                return redirect("/ui/kv/edit?" + urlencode({"key": key}))
            stale = audit_log.last_change("kv", key) or {"actor": "someone"}
            _index, entry = kv.get(key)
            status = 409
        except MeshError as err:
            if err.status == 403:
                raise
            error, status = err.message, err.status
    shown = _shown(bytes(entry.value or b"")) if entry is not None else None
    if request.method == "GET" and shown and not shown["binary"]:
        value_text = shown["text"]
    return page(
        request,
        "frontend/kv_edit.html",
        {
            "key": key,
            "entry": entry,
            "shown": shown,
            "value": value_text,
            "cas": entry.modify_index if entry is not None else 0,
            "error": error,
            "stale": stale,
            "creating": creating or entry is None,
            "can_write": viewer.authz.key_write(key),
            "parent": key.rsplit(SEPARATOR, 1)[0] + SEPARATOR if SEPARATOR in key else "",
            "limit": settings.MESH_KV_MAX_VALUE_SIZE,
        },
        section="kv",
        status=status,
    )


@ui_view("kv.delete")
@require_POST
def kv_delete(request: HttpRequest) -> HttpResponse:
    viewer = request.viewer
    key = request.POST.get("key", "")
    viewer.require("key_write", key)
    cas = int(request.POST.get("cas", "0") or 0)
    if not kv.delete(key, cas=cas):
        return redirect("/ui/kv/edit?" + urlencode({"key": key, "stale": "1"}))
    parent = key.rsplit(SEPARATOR, 1)[0] + SEPARATOR if SEPARATOR in key else ""
    return redirect("/ui/kv?" + urlencode({"prefix": parent}) if parent else "/ui/kv")
