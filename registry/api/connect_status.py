"""`GET /api/connect/status/`: the service mesh at a glance (`mesh connect status`).

    {"datacenter": "dc1", "server": "mesh-server",
     "services": [{"service": "api", "proxies": [
         {"proxy_id": "api-sidecar-proxy", "node": "host-b", "address": "10.0.0.3",
          "port": 21000, "health": "passing", "checks": [...],
          "config": {"stream": "connected", "pushed_version": 42, "acked_version": 42,
                     "nacked_version": 0, "error": "", "in_sync": true,
                     "compiles": 3}}]}],
     "ca": {"trust_domain": "...", "active_root_id": "...", "roots": [...]},
     "intentions": {"total": 3, "allow": 2, "deny": 1, "l7": 0}}

`?service=` limits it to one service. Pushed and acked versions are what the
config streams *of the server process answering* sent and heard
(`registry.grpc.status`): an agent streaming to another `mesh server` shows
`"stream": "not connected here"`. Results are ACL-filtered (sidecars by
`service:read` on the service they front and `node:read`; intentions by
`intentions:read`; `server` by `node:read` on it and `ca` by `operator:read`,
else `null`); no token is needed to call it, and without one it shows only
what the anonymous token may read.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry.api.auth import authz_of
from registry.domain.connect_status import connect_status
from registry.grpc import status as streams

STATUS = OpenApiResponse(
    description="`services` (each with its sidecars: node, address, health, checks, pushed "
    "and acked config versions), `ca` (trust domain and roots), `intentions` (counts)."
)


class ConnectStatusView(APIView):
    """Sidecars per service with their health and config versions, CA roots, intentions."""

    @extend_schema(
        operation_id="connect_status",
        parameters=[OpenApiParameter("service", str, description="only this service")],
        responses={200: STATUS},
    )
    def get(self, request: Request) -> Response:
        data = connect_status(
            authz_of(request),
            streams.proxy_streams(),
            streams.connected_nodes(),
            service=request.query_params.get("service", ""),
        )
        return Response(data)
