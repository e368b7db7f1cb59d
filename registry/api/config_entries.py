"""`/api/config-entries/` and `/api/discovery-chains/`: config entries and compiled
chains in the product API, over the same service layer as `/v1/config`.

    GET    /api/config-entries/                      every entry the caller may read (?kind=)
    GET    /api/config-entries/<kind>/               the entries of one kind
    GET    /api/config-entries/<kind>/<name>/        one entry
    PUT    /api/config-entries/<kind>/<name>/        write {"config": {...}, "cas": N}
    DELETE /api/config-entries/<kind>/<name>/        delete (?cas=N)
    GET    /api/discovery-chains/<service>/          the compiled chain (?compile_dc=,
                                                     ?override_protocol=, ...)

An entry reads `{"kind", "name", "config", "create_index", "modify_index"}`;
`config` keeps Consul's field names (`Protocol`, `Routes`, `Splits`, ...),
exactly what `/v1/config` stores and answers. ACLs as on `/v1`: service
kinds need service:read / service:write on the name, service-intentions
intentions:read / intentions:write, proxy-defaults operator:read /
operator:write, mesh mesh:read / mesh:write. A failed CAS is a 409.
"""

from __future__ import annotations

from typing import Any

from django.urls import path
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from registry.api.auth import identity_of
from registry.api.views import ERROR, WRITE_ERRORS, MeshViewSet
from registry.domain import config_entries as entries
from registry.domain import failover
from registry.errors import BadRequest, Conflict, PermissionDenied
from registry.models import ConfigEntry

# --- serializers ------------------------------------------------------------------------


class ConfigEntrySerializer(serializers.Serializer):
    """A config entry; `config` holds its fields with Consul's names."""

    kind = serializers.CharField()
    name = serializers.CharField()
    config = serializers.DictField()
    create_index = serializers.IntegerField()
    modify_index = serializers.IntegerField()

    @staticmethod
    def from_entry(entry: dict) -> dict[str, Any]:
        config = {
            k: v
            for k, v in entry.items()
            if k not in ("Kind", "Name", "CreateIndex", "ModifyIndex")
        }
        return {
            "kind": entry["Kind"],
            "name": entry["Name"],
            "config": config,
            "create_index": entry["CreateIndex"],
            "modify_index": entry["ModifyIndex"],
        }


class ConfigEntryWriteSerializer(serializers.Serializer):
    """Write an entry: `config` in Consul's names (as `consul config write` files,
    case-insensitive, snake_case accepted); `cas`: write only if `modify_index`
    still matches (0: only if it does not exist)."""

    config = serializers.DictField()
    cas = serializers.IntegerField(required=False, min_value=0)


class DiscoveryChainSerializer(serializers.Serializer):
    """Consul's compiled chain (`ServiceName`, `Protocol`, `StartNode`, `Nodes`, `Targets`)."""

    chain = serializers.DictField()


# --- views ------------------------------------------------------------------------------


def _deny(request: Request, allowed: bool, permission: str, resource: str) -> None:
    if not allowed:
        detail = (
            f"Permission denied: token with AccessorID '{identity_of(request).accessor_id}' "
            f"lacks permission '{permission}'"
        )
        if resource:
            detail += f' on "{resource}"'
        raise PermissionDenied(detail)


def _cas_param(request: Request) -> int | None:
    raw = request.query_params.get("cas")
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise BadRequest(f"Invalid value for ?cas: {raw!r} is not an unsigned integer")
    return int(raw)


class ConfigEntryViewSet(MeshViewSet):
    """Config entries (service-defaults, proxy-defaults, service-router,
    service-splitter, service-resolver, service-intentions, mesh)."""

    serializer_class = ConfigEntrySerializer
    write_serializers = {"PUT": ConfigEntryWriteSerializer}
    model = ConfigEntry
    filter_backends: list = []

    @extend_schema(
        parameters=[OpenApiParameter("kind", str, description="only entries of this kind")],
        responses={200: ConfigEntrySerializer(many=True), 400: ERROR},
    )
    def list(self, request: Request, kind: str | None = None) -> Response:
        kind = kind or request.query_params.get("kind") or None
        if kind:
            _index, found = entries.list_kind(self.authz, kind)
        else:
            found = entries.list_all(self.authz)
        page = self.paginate_queryset([ConfigEntrySerializer.from_entry(e) for e in found])
        return self.get_paginated_response(page)

    @extend_schema(
        operation_id="config_entries_kind_list",
        responses={200: ConfigEntrySerializer(many=True), 400: ERROR},
    )
    def kind_list(self, request: Request, kind: str) -> Response:
        """The entries of one kind the caller may read."""
        return self.list(request, kind)

    @extend_schema(responses={200: ConfigEntrySerializer, 400: ERROR, 403: ERROR, 404: ERROR})
    def retrieve(self, request: Request, kind: str, name: str) -> Response:
        entries.check_kind(kind)
        _deny(request, *entries.can_read(self.authz, kind, name))
        return Response(ConfigEntrySerializer.from_entry(entries.require_entry(kind, name)))

    @extend_schema(
        request=ConfigEntryWriteSerializer,
        responses={200: ConfigEntrySerializer, **WRITE_ERRORS},
    )
    def update(self, request: Request, kind: str, name: str) -> Response:
        entries.check_kind(kind)
        body = self.valid(ConfigEntryWriteSerializer)
        config = dict(body.validated_data["config"])
        for field, value in (("kind", kind), ("name", name)):
            given = [v for k, v in config.items() if k.lower() == field]
            if given and given[0] != value:
                raise BadRequest(
                    f"Invalid config entry: config.{field.title()} {given[0]!r} does not match "
                    f"the URL's {value!r}"
                )
        config = {k: v for k, v in config.items() if k.lower() not in ("kind", "name")}
        entry = entries.decode({"Kind": kind, "Name": name, **config})
        _deny(request, *entries.can_write(self.authz, entry["Kind"], entry["Name"]))
        cas = body.validated_data.get("cas")
        if not entries.write(entry, cas=cas):
            raise Conflict(f'Config entry "{kind}/{name}" was not written: cas {cas} did not match')
        found = entries.require_entry(entry["Kind"], entry["Name"])
        return Response(ConfigEntrySerializer.from_entry(found), headers=failover.header(entry))

    @extend_schema(
        parameters=[
            OpenApiParameter("cas", int, description="delete only if modify_index matches")
        ],
        responses={204: None, 400: ERROR, 403: ERROR, 404: ERROR, 409: ERROR},
    )
    def destroy(self, request: Request, kind: str, name: str) -> Response:
        entries.check_kind(kind)
        cas = _cas_param(request)
        _deny(request, *entries.can_write(self.authz, kind, name))
        entries.require_entry(kind, name)
        if not entries.delete(kind, name, cas=cas):
            raise Conflict(f'Config entry "{kind}/{name}" was not deleted: cas {cas} did not match')
        return Response(status=status.HTTP_204_NO_CONTENT)


class DiscoveryChainViewSet(MeshViewSet):
    """The compiled discovery chain of a service: router -> splitter -> resolver."""

    serializer_class = DiscoveryChainSerializer
    model = ConfigEntry
    filter_backends: list = []

    @extend_schema(
        parameters=[
            OpenApiParameter("compile_dc", str, description="datacenter to compile for"),
            OpenApiParameter("override_protocol", str, enum=["tcp", "http", "http2", "grpc"]),
            OpenApiParameter("override_connect_timeout", str, description='e.g. "10s"'),
            OpenApiParameter("override_mesh_gateway", str, enum=["none", "local", "remote"]),
        ],
        responses={200: DiscoveryChainSerializer, 400: ERROR, 403: ERROR},
    )
    def retrieve(self, request: Request, service: str) -> Response:
        q = request.query_params
        raw: dict[str, Any] = {}
        if q.get("override_protocol"):
            raw["OverrideProtocol"] = q["override_protocol"]
        if q.get("override_connect_timeout"):
            raw["OverrideConnectTimeout"] = q["override_connect_timeout"]
        if q.get("override_mesh_gateway"):
            raw["OverrideMeshGateway"] = {"Mode": q["override_mesh_gateway"]}
        overrides = entries.decode_overrides(raw)
        _deny(request, self.authz.service_read(service), "service:read", service)
        _index, chain = entries.discovery_chain(
            service, compile_dc=q.get("compile_dc", ""), overrides=overrides
        )
        return Response({"chain": chain})


entry_list = ConfigEntryViewSet.as_view({"get": "list"}, basename="configentry")
kind_list = ConfigEntryViewSet.as_view({"get": "kind_list"}, basename="configentry")
entry_detail = ConfigEntryViewSet.as_view(
    {"get": "retrieve", "put": "update", "delete": "destroy"}, basename="configentry"
)
chain_detail = DiscoveryChainViewSet.as_view({"get": "retrieve"}, basename="discoverychain")

urlpatterns = [
    path("config-entries/", entry_list, name="configentry-list"),
    path("config-entries/<str:kind>/", kind_list, name="configentry-kind-list"),
    path("config-entries/<str:kind>/<str:name>/", entry_detail, name="configentry-detail"),
    path("discovery-chains/<str:service>/", chain_detail, name="discoverychain-detail"),
]
