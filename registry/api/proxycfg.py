"""`GET /api/services/<name>/proxy-config`: what one sidecar of a service enforces.

The body is `meshproto.proxycfg.ProxyConfig`'s JSON — the same document the
gRPC config stream pushes to agents (`registry.domain.proxycfg.compile_proxy`),
so tests and agents read the same thing. `?proxy_id=` and/or `?node=` pick
the sidecar when the service has several; by default the first one (by node
name, then proxy ID). `X-Consul-Index` is the config's version.

ACLs: `service:read` on the service and on each upstream destination (the
config lists their endpoints) and `intentions:read` on the service (it lists
the intentions that protect it). A service without a sidecar, or an unknown
`proxy_id`/`node`, is a 404 JSON error.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry.api.auth import Need, authz_of, identity_of, kwarg
from registry.domain import proxycfg

ERROR = OpenApiResponse(description='An error: `{"error": "<message>"}`.')
CONFIG = OpenApiResponse(
    description="The compiled proxy config (`meshproto.proxycfg.ProxyConfig` JSON): "
    "`inbound`, `upstreams` (routes, clusters, endpoints), `intentions`, `default_allow`, "
    "`roots`, `version`."
)


class ProxyConfigView(APIView):
    """The compiled config of one of the service's sidecars."""

    acl = {"get": Need("service:read", kwarg("name"))}

    @extend_schema(
        operation_id="services_proxy_config",
        parameters=[
            OpenApiParameter("proxy_id", str, description="the sidecar's service ID"),
            OpenApiParameter("node", str, description="the sidecar's node"),
        ],
        responses={200: CONFIG, 403: ERROR, 404: ERROR},
    )
    def get(self, request: Request, name: str) -> Response:
        q = request.query_params
        config = proxycfg.readable_proxy_config(
            authz_of(request),
            name,
            proxy_id=q.get("proxy_id", ""),
            node=q.get("node", ""),
            accessor=identity_of(request).accessor_id,
        )
        return Response(config.to_json(), headers={"X-Consul-Index": str(config.version)})
