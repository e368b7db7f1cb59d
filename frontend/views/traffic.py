"""Traffic policy editors: splitter (weights), router and resolver, each shown as a
diff before saving and saved with compare-and-set on the entry's ModifyIndex, so
two editors never overwrite each other silently. Decoding, cross-entry checks
and the write are `registry.domain.config_entries`' (what `/v1/config` calls)."""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods

from frontend import chains, diffs, forms, paging
from frontend.auth import ui_view
from frontend.render import page
from registry.domain import audit_log, config_entries
from registry.errors import BadRequest, MeshError

KINDS = {
    "splitter": "service-splitter",
    "router": "service-router",
    "resolver": "service-resolver",
    "defaults": "service-defaults",
}
TRAFFIC_KINDS = tuple(KINDS.values())
EXAMPLES = {
    "service-router": {
        "Routes": [
            {
                "Match": {"HTTP": {"PathPrefix": "/admin", "Methods": ["GET"]}},
                "Destination": {
                    "Service": "admin",
                    "RequestTimeout": "5s",
                    "NumRetries": 2,
                    "RetryOnConnectFailure": True,
                },
            }
        ]
    },
    "service-resolver": {
        "DefaultSubset": "v1",
        "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}},
        "Failover": {"*": {"Datacenters": ["dc2"]}},
        "ConnectTimeout": "5s",
    },
    "service-defaults": {"Protocol": "http"},
}


@ui_view()
def traffic_index(request: HttpRequest) -> HttpResponse:
    authz = request.viewer.authz
    entries = [e for e in config_entries.list_all(authz) if e["Kind"] in TRAFFIC_KINDS]
    q = request.GET.get("q", "").strip()
    if q:
        entries = [e for e in entries if q.lower() in e["Name"].lower()]
    return page(
        request,
        "frontend/traffic.html",
        {
            "page": paging.paginate(request, entries, {"q": q} if q else {}),
            "q": q,
            "kinds": KINDS,
        },
        section="traffic",
    )


@ui_view()
def traffic_service(request: HttpRequest, name: str) -> HttpResponse:
    viewer = request.viewer
    viewer.require("service_read", name)
    current = {}
    for short, kind in KINDS.items():
        _index, entry = config_entries.get(kind, name)
        current[short] = diffs.canonical(entry) if entry else ""
    chain, chain_error = None, ""
    try:
        chain = chains.layout(config_entries.discovery_chain(name)[1])
    except MeshError as err:
        chain_error = err.message
    return page(
        request,
        "frontend/traffic_service.html",
        {
            "name": name,
            "current": current,
            "can_write": viewer.authz.service_write(name),
            "chain": chain,
            "chain_error": chain_error,
        },
        section="traffic",
    )


def _splits_from_form(post) -> list[dict[str, Any]]:
    splits = []
    for i in range(int(post.get("rows", "0") or 0)):
        weight = post.get(f"weight-{i}", "").strip()
        service = post.get(f"service-{i}", "").strip()
        subset = post.get(f"subset-{i}", "").strip()
        if not weight and not service and not subset:
            continue
        try:
            value: Any = float(weight)
        except ValueError:
            raise BadRequest(f"Splits[{i}].Weight: {weight!r} is not a number") from None
        split: dict[str, Any] = {"Weight": value}
        if service:
            split["Service"] = service
        if subset:
            split["ServiceSubset"] = subset
        splits.append(split)
    return splits


# What the route form edits; a router using anything else is edited as JSON.
ROUTE_MATCHES = {"prefix": "PathPrefix", "exact": "PathExact", "regex": "PathRegex"}
ROUTE_DESTINATION_FIELDS = {
    "Service",
    "ServiceSubset",
    "PrefixRewrite",
    "RequestTimeout",
    "NumRetries",
    "RetryOnConnectFailure",
}


def route_form_fits(entry: dict[str, Any] | None) -> bool:
    """Can the route form show (and so save) every field of this router?"""
    if not entry:
        return True
    if set(entry) - {"Kind", "Name", "Routes", *diffs.INDEX_FIELDS}:
        return False
    for route in entry.get("Routes") or []:
        if set(route) - {"Match", "Destination"}:
            return False
        match = route.get("Match") or {}
        if set(match) - {"HTTP"}:
            return False
        http = match.get("HTTP") or {}
        if set(http) - {*ROUTE_MATCHES.values(), "Methods"}:
            return False
        if sum(1 for k in ROUTE_MATCHES.values() if k in http) > 1:
            return False
        if set(route.get("Destination") or {}) - ROUTE_DESTINATION_FIELDS:
            return False
    return True


def _route_rows(entry: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    for route in (entry or {}).get("Routes") or []:
        http = (route.get("Match") or {}).get("HTTP") or {}
        dest = route.get("Destination") or {}
        kind = next((k for k, v in ROUTE_MATCHES.items() if v in http), "prefix")
        rows.append(
            {
                "kind": kind,
                "path": http.get(ROUTE_MATCHES[kind], ""),
                "methods": " ".join(http.get("Methods") or []),
                "service": dest.get("Service", ""),
                "subset": dest.get("ServiceSubset", ""),
                "rewrite": dest.get("PrefixRewrite", ""),
                "timeout": dest.get("RequestTimeout", ""),
                "retries": dest.get("NumRetries", ""),
                "retry_connect": bool(dest.get("RetryOnConnectFailure")),
            }
        )
    return rows


def _route_rows_from_post(post) -> list[dict[str, Any]]:
    rows = []
    for i in range(int(post.get("rows", "0") or 0)):
        row = {
            "kind": post.get(f"kind-{i}", "prefix"),
            "path": post.get(f"path-{i}", "").strip(),
            "methods": post.get(f"methods-{i}", "").strip(),
            "service": post.get(f"service-{i}", "").strip(),
            "subset": post.get(f"subset-{i}", "").strip(),
            "rewrite": post.get(f"rewrite-{i}", "").strip(),
            "timeout": post.get(f"timeout-{i}", "").strip(),
            "retries": post.get(f"retries-{i}", "").strip(),
            "retry_connect": post.get(f"retry-connect-{i}") == "on",
        }
        if row["path"] or row["methods"] or row["service"] or row["subset"]:
            rows.append(row)
    return rows


def _routes_from_form(post) -> list[dict[str, Any]]:
    routes = []
    for i, row in enumerate(_route_rows_from_post(post)):
        http: dict[str, Any] = {}
        if row["path"]:
            if row["kind"] not in ROUTE_MATCHES:
                raise BadRequest(f"Routes[{i}].Match: unknown match {row['kind']!r}")
            http[ROUTE_MATCHES[row["kind"]]] = row["path"]
        if row["methods"]:
            http["Methods"] = row["methods"].replace(",", " ").upper().split()
        dest: dict[str, Any] = {}
        for key, field in (
            ("service", "Service"),
            ("subset", "ServiceSubset"),
            ("rewrite", "PrefixRewrite"),
            ("timeout", "RequestTimeout"),
        ):
            if row[key]:
                dest[field] = row[key]
        if row["retries"]:
            try:
                dest["NumRetries"] = int(row["retries"])
            except ValueError:
                raise BadRequest(f"Routes[{i}].Destination.NumRetries: not a number") from None
        if row["retry_connect"]:
            dest["RetryOnConnectFailure"] = True
        route: dict[str, Any] = {}
        if http:
            route["Match"] = {"HTTP": http}
        if dest:
            route["Destination"] = dest
        routes.append(route)
    return routes


RESOLVER_FIELDS = {"DefaultSubset", "Subsets", "Failover", "ConnectTimeout"}


def resolver_form_fits(entry: dict[str, Any] | None) -> bool:
    """Can the resolver form show every field of this resolver?"""
    if not entry:
        return True
    if set(entry) - {"Kind", "Name", *RESOLVER_FIELDS, *diffs.INDEX_FIELDS}:
        return False
    if any(set(v or {}) - {"Filter", "OnlyPassing"} for v in (entry.get("Subsets") or {}).values()):
        return False
    failover = entry.get("Failover") or {}
    return set(failover) <= {"*"} and set(failover.get("*") or {}) <= {"Datacenters"}


def _resolver_values(entry: dict[str, Any] | None) -> dict[str, Any]:
    entry = entry or {}
    subsets = [
        {
            "name": k,
            "filter": (v or {}).get("Filter", ""),
            "only_passing": (v or {}).get("OnlyPassing"),
        }
        for k, v in sorted((entry.get("Subsets") or {}).items())
    ]
    failover = ((entry.get("Failover") or {}).get("*") or {}).get("Datacenters") or []
    return {
        "default_subset": entry.get("DefaultSubset", ""),
        "connect_timeout": entry.get("ConnectTimeout", ""),
        "failover": " ".join(failover),
        "subsets": subsets,
    }


def _resolver_values_from_post(post) -> dict[str, Any]:
    subsets = []
    for i in range(int(post.get("rows", "0") or 0)):
        row = {
            "name": post.get(f"subset-name-{i}", "").strip(),
            "filter": post.get(f"subset-filter-{i}", "").strip(),
            "only_passing": post.get(f"subset-passing-{i}") == "on",
        }
        if row["name"] or row["filter"]:
            subsets.append(row)
    return {
        "default_subset": post.get("default_subset", "").strip(),
        "connect_timeout": post.get("connect_timeout", "").strip(),
        "failover": post.get("failover", "").strip(),
        "subsets": subsets,
    }


def _resolver_from_form(post) -> dict[str, Any]:
    values = _resolver_values_from_post(post)
    out: dict[str, Any] = {}
    if values["subsets"]:
        out["Subsets"] = {}
        for i, row in enumerate(values["subsets"]):
            if not row["name"]:
                raise BadRequest(f"Subsets[{i}]: a subset needs a name")
            subset: dict[str, Any] = {}
            if row["filter"]:
                subset["Filter"] = row["filter"]
            if row["only_passing"]:
                subset["OnlyPassing"] = True
            out["Subsets"][row["name"]] = subset
    if values["default_subset"]:
        out["DefaultSubset"] = values["default_subset"]
    if values["connect_timeout"]:
        out["ConnectTimeout"] = values["connect_timeout"]
    dcs = values["failover"].replace(",", " ").split()
    if dcs:
        out["Failover"] = {"*": {"Datacenters": dcs}}
    return out


def _entry_from_form(kind: str, name: str, post) -> dict[str, Any]:
    if kind == "service-resolver" and post.get("mode") == "form":
        return {"Kind": kind, "Name": name, **_resolver_from_form(post)}
    if kind == "service-splitter":
        return {"Kind": kind, "Name": name, "Splits": _splits_from_form(post)}
    if kind == "service-router" and post.get("mode") == "form":
        return {"Kind": kind, "Name": name, "Routes": _routes_from_form(post)}
    body = forms.json_field(post.get("body", ""), kind) or {}
    if not isinstance(body, dict):
        raise BadRequest(f"{kind}: the body must be a JSON object")
    return {**body, "Kind": kind, "Name": name}


@ui_view("config.edit")
@require_http_methods(["GET", "POST"])
def traffic_edit(request: HttpRequest, name: str, short: str) -> HttpResponse:
    """GET: the editor. POST step=preview: validate and show the diff. POST
    step=save: write with CAS on the index the editor was opened at."""
    viewer = request.viewer
    kind = KINDS.get(short)
    if kind is None:
        raise BadRequest(f"Unknown traffic editor {short!r}")
    viewer.require("service_read", name)
    _index, saved = config_entries.get(kind, name)
    saved_index = saved["ModifyIndex"] if saved else 0
    step = request.POST.get("step", "")
    cas = (
        int(request.POST.get("cas", saved_index) or 0) if request.method == "POST" else saved_index
    )
    error, stale, diff, entry = "", None, [], None
    if request.method == "POST":
        allowed, permission, resource = config_entries.can_write(viewer.authz, kind, name)
        if not allowed:
            viewer.require(permission.replace(":", "_"), resource or None)
        try:
            if step == "save":
                entry = config_entries.decode(forms.json_field(request.POST.get("entry", ""), kind))
                if entry["Kind"] != kind or entry["Name"] != name:
                    raise BadRequest("The entry does not belong to this editor")
                if config_entries.write(entry, cas=cas):
                    return redirect(f"/ui/traffic/{name}")
                stale = audit_log.last_change("config-entry", f"{kind}/{name}") or {
                    "actor": "someone"
                }
                _index, saved = config_entries.get(kind, name)
                saved_index = saved["ModifyIndex"] if saved else 0
            else:
                entry = config_entries.decode(_entry_from_form(kind, name, request.POST))
            diff = diffs.line_diff(diffs.canonical(saved), diffs.canonical(entry))
        except MeshError as err:
            if err.status == 403:
                raise
            error = err.message
    splits = (entry or saved or {}).get("Splits") or [{"Weight": 100, "Service": name}]
    if kind == "service-splitter" and request.method == "POST" and step != "save":
        splits = _lenient_splits(request.POST) or splits
    body = request.POST.get("body") if request.method == "POST" and step != "save" else None
    if body is None:
        source = entry or saved
        body = (
            json.dumps(
                {k: v for k, v in source.items() if k not in ("Kind", "Name", *diffs.INDEX_FIELDS)},
                indent=2,
                sort_keys=True,
            )
            if source
            else json.dumps(EXAMPLES.get(kind, {}), indent=2)
        )
    rows = [*splits, {}, {}]
    route_form = kind == "service-router" and request.GET.get("mode") != "json"
    route_form = (
        route_form and route_form_fits(saved) and request.POST.get("mode", "form") == "form"
    )
    if route_form:
        typed = request.method == "POST" and step != "save"
        route_rows = _route_rows_from_post(request.POST) if typed else _route_rows(entry or saved)
        route_rows = [*route_rows, {"kind": "prefix"}, {"kind": "prefix"}]
    else:
        route_rows = []
    resolver_form = kind == "service-resolver" and request.GET.get("mode") != "json"
    resolver_form = (
        resolver_form and resolver_form_fits(saved) and request.POST.get("mode", "form") == "form"
    )
    resolver = {}
    if resolver_form:
        typed = request.method == "POST" and step != "save"
        resolver = (
            _resolver_values_from_post(request.POST) if typed else _resolver_values(entry or saved)
        )
        resolver["subsets"] = [*resolver["subsets"], {}, {}]
    return page(
        request,
        "frontend/traffic_edit.html",
        {
            "name": name,
            "kind": kind,
            "short": short,
            "saved": diffs.canonical(saved),
            "cas": saved_index if stale else cas,
            "rows": rows,
            "row_count": len(rows),
            "route_form": route_form,
            "route_rows": route_rows,
            "route_row_count": len(route_rows),
            "route_matches": list(ROUTE_MATCHES),
            "resolver_form": resolver_form,
            "resolver": resolver,
            "body": body,
            "error": error,
            "stale": stale,
            "diff": diff,
            "preview": bool(diff) and not error and not stale,
            "unchanged": entry is not None and not diff and not error,
            "entry_json": json.dumps(entry) if entry else "",
            "can_write": config_entries.can_write(viewer.authz, kind, name)[0],
        },
        section="traffic",
        status=400 if error else (409 if stale else 200),
    )


def _lenient_splits(post) -> list[dict[str, Any]]:
    """The rows as typed (to show them again next to an error)."""
    out = []
    for i in range(int(post.get("rows", "0") or 0)):
        row = {
            "Weight": post.get(f"weight-{i}", ""),
            "Service": post.get(f"service-{i}", ""),
            "ServiceSubset": post.get(f"subset-{i}", ""),
        }
        if any(row.values()):
            out.append(row)
    return out


@ui_view()
def traffic_go(request: HttpRequest) -> HttpResponse:
    name = request.GET.get("service", "").strip()
    return redirect(f"/ui/traffic/{name}" if name and "/" not in name else "/ui/traffic")
