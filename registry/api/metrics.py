"""Golden metrics: `/api/metrics/services/`, `/api/metrics/services/<name>`,
`/api/metrics/edges` (the UI's and `mesh top`'s source), and
`/api/metrics/services/<name>/series` (a chart's points over 15m, 1h or 24h).

Each answers rolling windows (`1m`, `5m`, `15m`, `1h`, `24h`; `?window=`
picks one) of requests, failures,
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
WINDOW_PARAM = OpenApiParameter(
    "window", str, description="only this window: `1m`, `5m`, `15m`, `1h` or `24h` (default: all)"
)
WINDOWS = (
    "`windows`: `1m`, `5m`, `15m`, `1h`, `24h` (or the one `?window=`), each with `requests`, `failures`, `rps`, "
    "`success_rate` (null without requests) and `latency_ms` (`p50`, `p95`, `p99`)."
)


class ServiceMetricsListView(APIView):
    """Golden metrics of every service that reported traffic."""

    @extend_schema(
        operation_id="metrics_services",
        parameters=[WINDOW_PARAM],
        responses={200: OpenApiResponse(description=f"`services`: a list of `service`, {WINDOWS}")},
    )
    def get(self, request: Request) -> Response:
        authz = authz_of(request)
        window = request.query_params.get("window", "")
        return Response({"services": golden.services_metrics(authz.service_read, window=window)})


class ServiceMetricsView(APIView):
    """Golden metrics of one service, as its sidecars answered, overall and per caller."""

    acl = {"get": Need("service:read", kwarg("name"))}

    @extend_schema(
        operation_id="metrics_service",
        parameters=[WINDOW_PARAM],
        responses={
            200: OpenApiResponse(description=f"`service`, {WINDOWS} `sources`: per caller."),
            403: ERROR,
            404: ERROR,
        },
    )
    def get(self, request: Request, name: str) -> Response:
        data = golden.service_metrics(name, window=request.query_params.get("window", ""))
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
            WINDOW_PARAM,
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
            window=q.get("window", ""),
        )
        return Response({"edges": edges})


class ServiceSeriesView(APIView):
    """One service's golden metrics over time (a chart's points), as its sidecars answered."""

    acl = {"get": Need("service:read", kwarg("name"))}

    @extend_schema(
        operation_id="metrics_service_series",
        parameters=[
            OpenApiParameter(
                "window", str, description="`15m` (30 s steps), `1h` (1 min) or `24h` (5 min)"
            )
        ],
        responses={
            200: OpenApiResponse(
                description="`service`, `window`, `step_s`, `points`: oldest first, each `t` "
                "(the step's start, unix seconds), `requests`, `failures`, `rps`, "
                "`success_rate`, `latency_ms`; steps without traffic are left out."
            ),
            400: ERROR,
            403: ERROR,
            404: ERROR,
        },
    )
    def get(self, request: Request, name: str) -> Response:
        return Response(
            golden.service_series(name, window=request.query_params.get("window", "1h"))
        )
