"""Golden metrics: `/api/metrics/services/`, `/api/metrics/services/<name>`,
`/api/metrics/edges` (the UI's and `mesh top`'s source).

Each answers rolling windows (`1m`, `5m`, `15m`, `1h`) of requests, failures,
requests per second, success rate and latency p50/p95/p99 (ms), computed by
`registry.domain.golden` from what agents reported. ACLs: `service:read` on a
service; lists and edges show only what the caller may read (an edge needs
both ends).
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry.api.auth import Need, authz_of, kwarg
from registry.domain import golden

ERROR = OpenApiResponse(description='An error: `{"error": "<message>"}`.')
WINDOWS = (
    "`windows`: `1m`, `5m`, `15m`, `1h`, each with `requests`, `failures`, `rps`, "
    "`success_rate` (null without requests) and `latency_ms` (`p50`, `p95`, `p99`)."
)


class ServiceMetricsListView(APIView):
    """Golden metrics of every service that reported traffic."""

    @extend_schema(
        operation_id="metrics_services",
        responses={200: OpenApiResponse(description=f"`services`: a list of `service`, {WINDOWS}")},
    )
    def get(self, request: Request) -> Response:
        authz = authz_of(request)
        return Response({"services": golden.services_metrics(authz.service_read)})


class ServiceMetricsView(APIView):
    """Golden metrics of one service, as its sidecars answered, overall and per caller."""

    acl = {"get": Need("service:read", kwarg("name"))}

    @extend_schema(
        operation_id="metrics_service",
        responses={
            200: OpenApiResponse(description=f"`service`, {WINDOWS} `sources`: per caller."),
            403: ERROR,
            404: ERROR,
        },
    )
    def get(self, request: Request, name: str) -> Response:
        data = golden.service_metrics(name)
        authz = authz_of(request)
        data["sources"] = [s for s in data["sources"] if authz.service_read(s["source"])]
        return Response(data)


class EdgeMetricsView(APIView):
    """Golden metrics of each `source -> destination` edge, as the callers saw it."""

    @extend_schema(
        operation_id="metrics_edges",
        parameters=[
            OpenApiParameter("source", str, description="only edges from this service"),
            OpenApiParameter("destination", str, description="only edges to this service"),
        ],
        responses={
            200: OpenApiResponse(description=f"`edges`: `source`, `destination`, {WINDOWS}")
        },
    )
    def get(self, request: Request) -> Response:
        q = request.query_params
        edges = golden.edges_metrics(
            authz_of(request).service_read,
            source=q.get("source", ""),
            destination=q.get("destination", ""),
        )
        return Response({"edges": edges})
