"""Topology: the service graph (laid out in the browser with dagre), edges coloured
by the intention decision, RPS and success rate on edges when metrics exist."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse

from frontend import layout, metrics
from frontend.auth import ui_view
from frontend.render import page
from registry.domain import topology as topo


@ui_view()
def topology(request: HttpRequest) -> HttpResponse:
    q = request.GET.get("q", "").strip()
    return page(
        request,
        "frontend/topology.html",
        {"q": q, "edges_url": metrics.edges_url("1m")},
        section="topology",
    )


# Past this many edges the browser's dagre layout takes seconds: lay out here.
SERVER_LAYOUT_EDGES = 40


@ui_view()
def topology_json(request: HttpRequest) -> JsonResponse:
    graph = topo.graph(request.viewer.authz, request.GET.get("q", "").strip())
    if len(graph["edges"]) > SERVER_LAYOUT_EDGES or request.GET.get("layout") == "server":
        placed, width, height = layout.layered(
            [n["id"] for n in graph["nodes"]],
            [(e["source"], e["destination"]) for e in graph["edges"]],
        )
        graph["layout"] = {"width": width, "height": height}
        for n in graph["nodes"]:
            n["x"], n["y"], n["width"], n["height"] = placed[n["id"]]
    return JsonResponse(graph)
