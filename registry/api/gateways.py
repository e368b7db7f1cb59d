"""`GET /api/gateways/` and `GET /api/gateways/<node>/<id>/config`: the mesh
gateways and the routing table the control plane compiled for one of them.

The table is `meshproto.gatewaycfg.GatewayConfig`'s JSON, the document the
config stream pushes to the gateway's agent. ACLs: `node:read` on the
gateway's node and `service:read` on the gateway and on every service its
table routes to (it lists their endpoints).
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry.api.auth import authz_of, require
from registry.domain import proxycfg

ERROR = OpenApiResponse(description='An error: `{"error": "<message>"}`.')


class GatewayListView(APIView):
    """Every mesh gateway the caller may read: node, ID, datacenter, addresses."""

    @extend_schema(operation_id="gateways_list", responses={200: OpenApiResponse()})
    def get(self, request: Request) -> Response:
        from registry.models import ServiceInstance

        authz = authz_of(request)
        rows = (
            ServiceInstance.objects.select_related("node__datacenter")
            .filter(kind=proxycfg.MESH_GATEWAY)
            .order_by("node__datacenter__name", "node__name", "service_id")
        )
        out = [
            {
                "node": r.node.name,
                "id": r.service_id,
                "service": r.name,
                "datacenter": r.node.datacenter.name,
                "address": r.address or r.node.address,
                "port": r.port,
                "wan": (r.tagged_addresses or {}).get("wan") or {},
            }
            for r in rows
            if authz.node_read(r.node.name) and authz.service_read(r.name)
        ]
        return Response(out)


class GatewayConfigView(APIView):
    """The compiled routing table of one mesh gateway."""

    @extend_schema(
        operation_id="gateways_config",
        responses={200: OpenApiResponse(description="GatewayConfig JSON"), 403: ERROR, 404: ERROR},
    )
    def get(self, request: Request, node: str, gateway_id: str) -> Response:
        require(request, "node:read", node)
        config, _topics = proxycfg.compile_gateway(node, gateway_id)
        require(request, "service:read", config.service)
        for route in config.routes:
            require(request, "service:read", route.service)
        return Response(config.to_json(), headers={"X-Consul-Index": str(config.version)})
