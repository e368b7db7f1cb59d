"""`/api/intentions/`: intentions in the product API (snake_case), over the same
service layer as `/v1/connect/intentions`.

    GET    /api/intentions/                     list (filters, ordering, paging)
    POST   /api/intentions/                     create (409 if the pair has one)
    GET    /api/intentions/<id>/                read
    PUT    /api/intentions/<id>/                replace
    DELETE /api/intentions/<id>/                delete
    GET    /api/intentions/check/?source=&destination=   the decision and its reason
    GET    /api/intentions/match/?by=&name=     what applies to a service, in order

ACLs as on `/v1`: intentions:read on either end to see one, intentions:write
on the destination to write, service:read on the destination to check.
"""

from __future__ import annotations

from typing import Any

import django_filters as df
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from registry.api.auth import identity_of
from registry.api.serializers import StringMap, Text
from registry.api.views import ERROR, WRITE_ERRORS, MeshViewSet
from registry.domain import intentions
from registry.domain.acl import format_time
from registry.models import Intention

# --- serializers ------------------------------------------------------------------------


class IntentionSerializer(serializers.ModelSerializer):
    """An intention. `permissions` keeps Consul's structure (`Action`, `HTTP`, ...)."""

    created_at = serializers.SerializerMethodField()
    updated_at = serializers.SerializerMethodField()

    class Meta:
        model = Intention
        fields = [
            "id",
            "source_ns",
            "source_name",
            "destination_ns",
            "destination_name",
            "source_type",
            "action",
            "permissions",
            "description",
            "meta",
            "precedence",
            "created_at",
            "updated_at",
            "create_index",
            "modify_index",
        ]
        read_only_fields = fields

    def get_created_at(self, row: Intention) -> str:
        return format_time(row.created_at)

    def get_updated_at(self, row: Intention) -> str:
        return format_time(row.updated_at)


class IntentionWriteSerializer(serializers.Serializer):
    """Create or replace an intention: `action`, or L7 `permissions` (Consul's shape)."""

    source_name = Text()
    destination_name = Text()
    source_ns = Text(required=False, default="default")
    destination_ns = Text(required=False, default="default")
    action = serializers.ChoiceField(["allow", "deny"], required=False, allow_blank=True)
    permissions = serializers.ListField(child=serializers.DictField(), required=False)
    description = Text(required=False, allow_blank=True, default="")
    meta = StringMap(required=False)
    source_type = Text(required=False, default="consul")

    def spec(self) -> dict[str, Any]:
        """The body as the domain takes it (Consul's field names)."""
        d = self.validated_data
        return {
            "SourceNS": d["source_ns"],
            "SourceName": d["source_name"],
            "DestinationNS": d["destination_ns"],
            "DestinationName": d["destination_name"],
            "SourceType": d["source_type"],
            "Action": d.get("action", ""),
            "Permissions": d.get("permissions"),
            "Description": d["description"],
            "Meta": d.get("meta") or {},
        }


class DecisionSerializer(serializers.Serializer):
    allowed = serializers.BooleanField()
    reason = serializers.CharField()
    intention_id = serializers.CharField(allow_null=True)
    precedence = serializers.IntegerField()
    has_l7 = serializers.BooleanField()
    default = serializers.BooleanField()


class IntentionFilterSet(df.FilterSet):
    source = df.CharFilter(field_name="source_name")
    destination = df.CharFilter(field_name="destination_name")
    source_ns = df.CharFilter()
    destination_ns = df.CharFilter()
    action = df.ChoiceFilter(choices=[("allow", "allow"), ("deny", "deny"), ("", "L7")])

    class Meta:
        model = Intention
        fields = ["source", "destination", "source_ns", "destination_ns", "action"]


# --- views ------------------------------------------------------------------------------


def _accessor(request: Request) -> str:
    return identity_of(request).accessor_id


@extend_schema_view(
    retrieve=extend_schema(responses={200: IntentionSerializer, 403: ERROR, 404: ERROR}),
    create=extend_schema(
        request=IntentionWriteSerializer, responses={201: IntentionSerializer, **WRITE_ERRORS}
    ),
    update=extend_schema(
        request=IntentionWriteSerializer, responses={200: IntentionSerializer, **WRITE_ERRORS}
    ),
    destroy=extend_schema(responses={204: None, 403: ERROR, 404: ERROR}),
)
class IntentionViewSet(MeshViewSet):
    """Intentions: `source -> destination: allow | deny`, or L7 permissions.
    Lists show what the caller may read (intentions:read on either end)."""

    serializer_class = IntentionSerializer
    write_serializers = {"POST": IntentionWriteSerializer, "PUT": IntentionWriteSerializer}
    filterset_class = IntentionFilterSet
    ordering_fields = [
        "precedence",
        "source_name",
        "destination_name",
        "create_index",
        "modify_index",
    ]
    ordering = ["-precedence", "source_ns", "source_name", "destination_ns", "destination_name"]
    lookup_value_regex = "[^/]+"
    model = Intention

    def visible(self):
        return intentions.visible(self.authz)

    def list(self, request: Request) -> Response:
        return self.paged(self.filter_queryset(self.get_queryset()), IntentionSerializer)

    def retrieve(self, request: Request, pk: str) -> Response:
        row = intentions.get_by_id(pk)
        intentions.require_read(self.authz, row, _accessor(request))
        return Response(IntentionSerializer(row).data)

    def create(self, request: Request) -> Response:
        body = self.valid(IntentionWriteSerializer)
        row = intentions.create(self.authz, body.spec(), _accessor(request))
        return Response(IntentionSerializer(row).data, status.HTTP_201_CREATED)

    def update(self, request: Request, pk: str) -> Response:
        body = self.valid(IntentionWriteSerializer)
        row = intentions.update_by_id(self.authz, pk, body.spec(), _accessor(request))
        return Response(IntentionSerializer(row).data)

    def destroy(self, request: Request, pk: str) -> Response:
        intentions.delete_by_id(self.authz, pk, _accessor(request))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        parameters=[
            OpenApiParameter("source", str, required=True, description="NAME or NAMESPACE/NAME"),
            OpenApiParameter(
                "destination", str, required=True, description="NAME or NAMESPACE/NAME"
            ),
        ],
        responses={200: DecisionSerializer, 400: ERROR, 403: ERROR},
    )
    @action(detail=False, methods=["get"])
    def check(self, request: Request) -> Response:
        """Would `source` be allowed to connect to `destination` (L4), and why?"""
        source = intentions.parse_service_ref(request.query_params.get("source", ""), "source")
        destination = intentions.parse_service_ref(
            request.query_params.get("destination", ""), "destination"
        )
        d = intentions.decide(self.authz, source, destination, accessor=_accessor(request))
        return Response(
            {
                "allowed": d.allowed,
                "reason": d.reason,
                "intention_id": d.intention_id,
                "precedence": d.precedence,
                "has_l7": d.has_l7,
                "default": d.default,
            }
        )

    @extend_schema(
        parameters=[
            OpenApiParameter("by", str, required=True, enum=["source", "destination"]),
            OpenApiParameter("name", str, required=True, many=True),
        ],
        responses={200: dict, 400: ERROR, 403: ERROR},
    )
    @action(detail=False, methods=["get"])
    def match(self, request: Request) -> Response:
        """For each `name`, the intentions that apply to it, in evaluation order."""
        _index, found = intentions.match(
            self.authz,
            request.query_params.get("by", ""),
            request.query_params.getlist("name"),
            _accessor(request),
        )
        return Response({n: IntentionSerializer(rows, many=True).data for n, rows in found.items()})
