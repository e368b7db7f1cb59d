"""Services: the filterable list and one service's page."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse, JsonResponse

from frontend import chains, metrics, paging
from frontend.auth import ui_view
from frontend.render import page
from registry.api.filtersets import ServiceInstanceFilterSet
from registry.domain import config_entries, intentions, inventory, peering, proxycfg
from registry.errors import MeshError, NotFound
from registry.models import Datacenter, ServiceInstance

FILTERS = ("q", "datacenter", "tag", "health", "kind", "source", "peer")


def _instances(request: HttpRequest, query: dict[str, str]):
    authz = request.viewer.authz
    qs = inventory.visible_instances(authz, ServiceInstance.objects.all())
    data = {k: v for k, v in query.items() if k in ("q", "datacenter", "tag", "kind")}
    qs = ServiceInstanceFilterSet(data, queryset=qs).qs
    return inventory.filter_source(qs, query.get("source", ""))


def _imported(request: HttpRequest, query: dict[str, str]) -> list:
    """Services imported from peers, unless the filters ask for local ones only."""
    if query.get("source", "") in inventory.LOCAL_SOURCES:
        return []
    return peering.imported_summaries(
        request.viewer.authz,
        **{k: query.get(k, "") for k in ("q", "tag", "kind", "datacenter", "peer")},
    )


@ui_view()
def service_list(request: HttpRequest) -> HttpResponse:
    query = paging.filters(request, FILTERS)
    instances = _instances(request, query)
    if query.get("peer"):
        instances = instances.none()  # a peer's services only
    result = inventory.service_page(
        instances,
        health=query.get("health", ""),
        offset=paging.offset(request),
        limit=paging.PER_PAGE,
        imported=_imported(request, query),
    )
    return page(
        request,
        "frontend/services.html",
        {
            "page": paging.offset_page(request, result.total, result.services, query),
            "health_counts": result.health,
            "query": query,
            "datacenters": Datacenter.objects.values_list("name", flat=True),
            "kinds": ServiceInstance.KINDS,
            "sources": inventory.SOURCES,
            "peers": peering.peer_names(),
            "healths": inventory.HEALTH_STATES,
        },
        section="services",
    )


@ui_view()
def service_detail(request: HttpRequest, name: str) -> HttpResponse:
    viewer = request.viewer
    authz = viewer.authz
    viewer.require("service_read", name)
    qs = inventory.visible_instances(
        authz, ServiceInstance.objects.filter(name=name).select_related("node__datacenter")
    ).order_by("node__name", "service_id")
    if not qs.exists():
        raise NotFound(f'Service "{name}" not found')
    instances = paging.paginate(request, qs, {})
    checks = inventory.instance_checks(instances.rows)
    rows = [
        {"svc": svc, "checks": checks[svc.pk], "status": inventory.instance_status(checks[svc.pk])}
        for svc in instances.rows
    ]
    summary = inventory.summarize_services(qs)[0]
    tags = sorted({t for svc in instances.rows for t in (svc.tags or [])})
    meta = sorted({(k, v) for svc in instances.rows for k, v in (svc.meta or {}).items()})
    upstreams, downstreams = inventory.dependencies(authz, name)
    applying = []
    if authz.intention_read(name):
        _index, matched = intentions.match(authz, "destination", [name])
        applying = [intentions.intention_json(r) for r in matched[name]]
    chain, chain_error = None, ""
    try:
        _index, compiled = config_entries.discovery_chain(name)
        chain = chains.layout(compiled)
    except MeshError as err:
        chain_error = err.message
    config, config_error = None, ""
    try:
        config = json.dumps(
            proxycfg.readable_proxy_config(
                authz, name, accessor=viewer.identity.accessor_id
            ).to_json(),
            indent=2,
            sort_keys=True,
        )
    except MeshError as err:
        config_error = err.message
    return page(
        request,
        "frontend/service.html",
        {
            "name": name,
            "summary": summary,
            "instances": instances,
            "rows": rows,
            "tags": tags,
            "meta": meta,
            "upstreams": upstreams,
            "downstreams": downstreams,
            "intentions": applying,
            "can_write_intentions": authz.intention_write(name),
            "chain": chain,
            "chain_error": chain_error,
            "proxy_config": config,
            "proxy_config_error": config_error,
            "metrics_url": f"/ui/metrics/services/{name}",
            "series_url": f"/ui/metrics/services/{name}/series",
            "windows": metrics.CHART_WINDOWS,
        },
        section="services",
    )


@ui_view()
def imported_service(request: HttpRequest, peer: str, name: str) -> HttpResponse:
    """A service a peer exports to us: its instances and checks as this cluster
    sees them (what `?peer=` reads and our sidecars use)."""
    data = peering.imported_service(request.viewer.authz, peer, name)
    return page(
        request,
        "frontend/service_imported.html",
        {
            "svc": data,
            "rows": data["instances"],
            "connect": json.dumps(data["connect"], indent=2, sort_keys=True),
        },
        section="services",
    )


@ui_view()
def service_metrics(request: HttpRequest, name: str) -> JsonResponse:
    """The service's golden metrics (JSON for the chart), or an empty answer."""
    request.viewer.require("service_read", name)
    status, data = metrics.fetch(request, metrics.service_path(name), {})
    return JsonResponse({"status": status, "data": data if status == 200 else None})


@ui_view()
def service_series(request: HttpRequest, name: str) -> JsonResponse:
    """The points of the service's charts over `?window=` (15m, 1h, 24h)."""
    request.viewer.require("service_read", name)
    window = request.GET.get("window", "1h")
    status, data = metrics.fetch(request, metrics.series_path(name), {"window": window})
    return JsonResponse({"status": status, "data": data if status == 200 else None})


@ui_view()
def edge_metrics(request: HttpRequest) -> JsonResponse:
    query = {"window": request.GET["window"]} if request.GET.get("window") else {}
    status, data = metrics.fetch(request, metrics.edges_path(), query)
    return JsonResponse({"status": status, "data": data if status == 200 else None})
