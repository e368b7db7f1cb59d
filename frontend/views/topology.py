"""Topology: the service graph (laid out in the browser with dagre), edges coloured
by the intention decision, RPS and success rate on edges when metrics exist."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse

from frontend import metrics
from frontend.auth import ui_view
from frontend.render import page
from registry.domain import topology as topo


@ui_view()
def topology(request: HttpRequest) -> HttpResponse:
    q = request.GET.get("q", "").strip()
    return page(
        request,
        "frontend/topology.html",
        {"q": q, "edges_url": metrics.edges_url()},
        section="topology",
    )


@ui_view()
def topology_json(request: HttpRequest) -> JsonResponse:
    return JsonResponse(topo.graph(request.viewer.authz, request.GET.get("q", "").strip()))
