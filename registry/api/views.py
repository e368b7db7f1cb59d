"""`/api` views: parse, authorize, call the domain, shape. Nothing else.

Reads come from querysets restricted to what the caller may see
(`registry.domain.inventory.visible_*`) so that DRF filters, orders and
paginates in the database; writes call the same domain functions `/v1` calls,
so each one takes the global index and wakes `/v1` blocking queries.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import Count
from django.template import engines
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from drf_spectacular.views import SpectacularRedocView
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.filters import OrderingFilter
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.renderers import TemplateHTMLRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.views import APIView

from registry import audit
from registry.api import filtersets
from registry.api import schema as _schema  # noqa: F401  (registers the auth scheme)
from registry.api import serializers as s
from registry.api.auth import Need, authz_of, identity_of, require
from registry.domain import acl, catalog, datacenters, inventory, kv
from registry.errors import Conflict, NotFound, TooLarge
from registry.models import (
    ACLPolicy,
    ACLRole,
    ACLToken,
    Check,
    Datacenter,
    KVEntry,
    Node,
    ServiceInstance,
)

ERROR = OpenApiResponse(
    description='An error: `{"error": "<message>"}` (400s also carry `fields`).'
)
WRITE_ERRORS = {400: ERROR, 403: ERROR, 404: ERROR, 409: ERROR, 413: ERROR}
NAME = "[^/]+"


class MeshPagination(LimitOffsetPagination):
    max_limit = 1000


class MeshViewSet(viewsets.GenericViewSet):
    """What every `/api` resource shares: body limit, filters, ordering, paging, ACLs."""

    filter_backends = [DjangoFilterBackend, OrderingFilter]
    pagination_class = MeshPagination
    acl: dict[str, Need] = {}

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # Refuse an oversized body before anything reads it.
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > settings.MESH_MAX_BODY_SIZE:
            raise TooLarge(
                f"Request body ({length} bytes) too large, max size: {settings.MESH_MAX_BODY_SIZE} bytes"
            )
        super().initial(request, *args, **kwargs)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            # Writes are audited with the caller's identity (closed in finalize_response).
            identity = identity_of(request)
            via = "ui" if identity.accessor_id.startswith("user:") else "api"
            actor = audit.Actor(identity.accessor_id or "anonymous", identity.description, via)
            self._audit_scope = audit.scope(
                actor, f"api.{self.basename}.{self.action}", request.method, request.path
            )
            self._audit_scope.__enter__()

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        scope = getattr(self, "_audit_scope", None)
        if scope is not None:
            self._audit_scope = None
            scope.__exit__(None, None, None)
        return super().finalize_response(request, response, *args, **kwargs)

    model: type | None = None
    # Input shapes by method: the browsable API renders its forms from these.
    write_serializers: dict[str, type] = {}

    def get_serializer_class(self) -> type:
        method = self.request.method if getattr(self, "request", None) else "GET"
        return self.write_serializers.get(method) or super().get_serializer_class()

    @property
    def authz(self):
        return authz_of(self.request)

    def get_queryset(self):
        if self.queryset is not None:
            return super().get_queryset()
        if getattr(self, "swagger_fake_view", False):  # schema generation: no request, no DB
            return self.model.objects.none()
        return self.visible()

    def visible(self):
        """The rows the caller may see (before the request's filters)."""
        raise NotImplementedError

    def valid(self, serializer_class: type, **kwargs: Any) -> Any:
        serializer = serializer_class(data=self.request.data, **kwargs)
        serializer.is_valid(raise_exception=True)
        return serializer

    def paged(self, rows: Any, serializer_class: type, context: dict | None = None) -> Response:
        page = self.paginate_queryset(rows)
        ctx = {**self.get_serializer_context(), **(context(page) if context else {})}
        data = serializer_class(page, many=True, context=ctx).data
        return self.get_paginated_response(data)


def _with_checks(instances: list[ServiceInstance]) -> dict[str, Any]:
    return {"checks": inventory.instance_checks(list(instances))}


# --- root ---------------------------------------------------------------------------


class RootView(APIView):
    """The resources of the meshweb REST API."""

    @extend_schema(exclude=True)
    def get(self, request: Request, format: str | None = None) -> Response:
        names = [
            ("datacenters", "datacenter-list"),
            ("nodes", "node-list"),
            ("services", "service-list"),
            ("instances", "instance-list"),
            ("checks", "check-list"),
            ("kv", "kv-list"),
            ("acl/tokens", "acltoken-list"),
            ("acl/policies", "aclpolicy-list"),
            ("acl/roles", "aclrole-list"),
            ("schema", "schema"),
            ("docs", "swagger-ui"),
            ("redoc", "redoc"),
        ]
        return Response({k: reverse(f"api:{v}", request=request) for k, v in names})


# --- datacenters -------------------------------------------------------------------------


@extend_schema_view(
    create=extend_schema(
        request=s.DatacenterCreateSerializer,
        responses={201: s.DatacenterSerializer, **WRITE_ERRORS},
    ),
    update=extend_schema(
        request=s.DatacenterUpdateSerializer,
        responses={200: s.DatacenterSerializer, **WRITE_ERRORS},
    ),
    partial_update=extend_schema(
        request=s.DatacenterUpdateSerializer,
        responses={200: s.DatacenterSerializer, **WRITE_ERRORS},
    ),
)
class DatacenterViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, MeshViewSet):
    """Datacenters (cloud regions and on-prem sites). Writes need `operator:write`."""

    queryset = Datacenter.objects.annotate(node_count=Count("nodes")).order_by("name")
    serializer_class = s.DatacenterSerializer
    write_serializers = {
        "POST": s.DatacenterCreateSerializer,
        "PUT": s.DatacenterUpdateSerializer,
        "PATCH": s.DatacenterUpdateSerializer,
    }
    filterset_class = filtersets.DatacenterFilterSet
    ordering_fields = ["name", "provider", "region", "create_index", "modify_index"]
    lookup_field = "name"
    lookup_value_regex = NAME
    acl = {
        "create": Need("operator:write"),
        "update": Need("operator:write"),
        "partial_update": Need("operator:write"),
    }

    def get_object(self) -> Datacenter:
        dc = self.get_queryset().filter(name=self.kwargs["name"]).first()
        if dc is None:
            raise NotFound(f'Datacenter "{self.kwargs["name"]}" not found')
        return dc

    def create(self, request: Request) -> Response:
        data = self.valid(s.DatacenterCreateSerializer).validated_data
        datacenters.create_datacenter(
            data["name"], provider=data["provider"], region=data["region"]
        )
        self.kwargs["name"] = data["name"]
        return Response(s.DatacenterSerializer(self.get_object()).data, status.HTTP_201_CREATED)

    def update(self, request: Request, name: str) -> Response:
        data = self.valid(s.DatacenterUpdateSerializer).validated_data
        datacenters.update_datacenter(
            name, provider=data.get("provider"), region=data.get("region")
        )
        return Response(s.DatacenterSerializer(self.get_object()).data)

    def partial_update(self, request: Request, name: str) -> Response:
        return self.update(request, name)


# --- nodes ------------------------------------------------------------------------------


@extend_schema_view(retrieve=extend_schema(responses={200: s.NodeDetailSerializer, 404: ERROR}))
class NodeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, MeshViewSet):
    """Nodes (hosts) the caller may read (`node:read`)."""

    serializer_class = s.NodeSerializer
    filterset_class = filtersets.NodeFilterSet
    ordering_fields = ["name", "address", "create_index", "modify_index"]
    ordering = ["name"]
    lookup_field = "name"
    lookup_value_regex = NAME

    model = Node

    def visible(self):
        qs = Node.objects.select_related("datacenter").annotate(service_count=Count("services"))
        return inventory.visible_nodes(self.authz, qs)

    def retrieve(self, request: Request, name: str) -> Response:
        node = self.get_queryset().filter(name=name).first()
        if node is None:
            raise NotFound(f'Node "{name}" not found')
        instances = list(
            inventory.visible_instances(
                self.authz,
                ServiceInstance.objects.select_related("node__datacenter").filter(node=node),
            ).order_by("service_id")
        )
        checks = inventory.visible_checks(
            self.authz, Check.objects.select_related("node").filter(node=node)
        ).order_by("check_id")
        context = {
            **self.get_serializer_context(),
            **_with_checks(instances),
            "instances": instances,
            "node_checks": list(checks),
        }
        return Response(s.NodeDetailSerializer(node, context=context).data)


# --- services ---------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(responses=s.ServiceSummarySerializer(many=True)),
    retrieve=extend_schema(responses={200: s.ServiceDetailSerializer, 404: ERROR}),
)
class ServiceViewSet(MeshViewSet):
    """Services aggregated by name over the instances the caller may read."""

    serializer_class = s.ServiceSummarySerializer
    filterset_class = filtersets.ServiceInstanceFilterSet
    filter_backends = [DjangoFilterBackend]
    lookup_field = "name"
    lookup_value_regex = NAME

    model = ServiceInstance

    def visible(self):
        qs = ServiceInstance.objects.select_related("node__datacenter")
        return inventory.visible_instances(self.authz, qs)

    def list(self, request: Request) -> Response:
        summaries = inventory.summarize_services(self.filter_queryset(self.get_queryset()))
        return self.paged(summaries, s.ServiceSummarySerializer)

    def _instances(self, name: str):
        qs = self.get_queryset().filter(name=name).order_by("node__name", "service_id")
        if not qs.exists():
            raise NotFound(f'Service "{name}" not found')
        return qs

    def retrieve(self, request: Request, name: str) -> Response:
        instances = list(self._instances(name))
        summary = inventory.summarize_services(self._instances(name))[0]
        context = {**self.get_serializer_context(), **_with_checks(instances)}
        context["instances"] = instances
        return Response(s.ServiceDetailSerializer(summary, context=context).data)

    @extend_schema(
        responses={200: s.InstanceSerializer(many=True), 404: ERROR},
        filters=True,
    )
    @action(detail=True, methods=["get"], serializer_class=s.InstanceSerializer)
    def instances(self, request: Request, name: str) -> Response:
        """The service's instances (filterable and paginated like `/api/instances/`)."""
        rows = self.filter_queryset(self._instances(name))
        return self.paged(rows, s.InstanceSerializer, _with_checks)


# --- instances ------------------------------------------------------------------------


@extend_schema_view(
    retrieve=extend_schema(responses={200: s.InstanceDetailSerializer, 404: ERROR}),
    create=extend_schema(
        request=s.InstanceCreateSerializer,
        responses={201: s.InstanceDetailSerializer, **WRITE_ERRORS},
    ),
    destroy=extend_schema(responses={204: None, 403: ERROR, 404: ERROR}),
)
class InstanceViewSet(MeshViewSet):
    """Service instances. Registering needs `service:write` on the service (and
    `node:write` on a node it creates or updates); deregistering `service:write`."""

    serializer_class = s.InstanceSerializer
    write_serializers = {"POST": s.InstanceCreateSerializer}
    filterset_class = filtersets.ServiceInstanceFilterSet
    ordering_fields = ["name", "service_id", "node__name", "port", "create_index", "modify_index"]
    ordering = ["node__name", "service_id"]

    model = ServiceInstance

    def visible(self):
        qs = ServiceInstance.objects.select_related("node__datacenter")
        return inventory.visible_instances(self.authz, qs)

    def get_object(self) -> ServiceInstance:
        row_id = _row_id(self.kwargs["pk"])
        svc = self.get_queryset().filter(pk=row_id).first() if row_id is not None else None
        if svc is None:
            raise NotFound(f"Instance {self.kwargs['pk']} not found")
        return svc

    def list(self, request: Request) -> Response:
        return self.paged(
            self.filter_queryset(self.get_queryset()), s.InstanceSerializer, _with_checks
        )

    def retrieve(self, request: Request, pk: str) -> Response:
        svc = self.get_object()
        context = {**self.get_serializer_context(), **_with_checks([svc])}
        return Response(s.InstanceDetailSerializer(svc, context=context).data)

    def create(self, request: Request) -> Response:
        body = self.valid(s.InstanceCreateSerializer)
        data = body.validated_data
        if "node" in data:
            spec = body.catalog_spec()
            needs = catalog.catalog_register_needs(spec)
        else:
            spec = body.agent_spec()
            needs = catalog.agent_register_needs(catalog.local_node(), spec)
        for permission, resource in needs:
            require(request, permission, resource)
        svc = inventory.register_instance(spec, node=data.get("node"))
        context = {**self.get_serializer_context(), **_with_checks([svc])}
        return Response(
            s.InstanceDetailSerializer(svc, context=context).data, status.HTTP_201_CREATED
        )

    def destroy(self, request: Request, pk: str) -> Response:
        svc = self.get_object()
        require(request, "service:write", svc.name)
        inventory.deregister_instance(svc)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- checks ---------------------------------------------------------------------------


class CheckViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, MeshViewSet):
    """Health checks the caller may read."""

    serializer_class = s.CheckSerializer
    filterset_class = filtersets.CheckFilterSet
    ordering_fields = ["check_id", "name", "status", "node__name", "create_index", "modify_index"]
    ordering = ["node__name", "check_id"]

    model = Check

    def visible(self):
        return inventory.visible_checks(self.authz, Check.objects.select_related("node"))

    def get_object(self) -> Check:
        row_id = _row_id(self.kwargs["pk"])
        check = self.get_queryset().filter(pk=row_id).first() if row_id is not None else None
        if check is None:
            raise NotFound(f"Check {self.kwargs['pk']} not found")
        return check


def _row_id(raw: str) -> int | None:
    """A row id from the URL, or None for anything that cannot be one (then a 404,
    never a ValueError or a database overflow answered as a 500)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        return None
    return int(raw)


# --- key/value ----------------------------------------------------------------------------


def _key(request: Request, view: Any) -> str:
    return view.kwargs.get("key", "")


@extend_schema_view(
    retrieve=extend_schema(responses={200: s.KVEntrySerializer, 403: ERROR, 404: ERROR}),
    update=extend_schema(
        request=s.KVWriteSerializer, responses={200: s.KVEntrySerializer, **WRITE_ERRORS}
    ),
    destroy=extend_schema(
        parameters=[
            OpenApiParameter("recurse", bool, description="delete every key under this prefix"),
            OpenApiParameter("cas", int, description="delete only if modify_index matches"),
        ],
        responses={204: None, 403: ERROR, 404: ERROR, 409: ERROR},
    ),
)
class KVViewSet(MeshViewSet):
    """The key/value store. Lists show the keys the caller may read; reading a
    key needs `key:read`, writing or deleting it `key:write`."""

    serializer_class = s.KVEntrySerializer
    write_serializers = {"PUT": s.KVWriteSerializer}
    filterset_class = filtersets.KVEntryFilterSet
    ordering_fields = ["key", "create_index", "modify_index"]
    ordering = ["key"]
    lookup_field = "key"
    acl = {
        "retrieve": Need("key:read", _key),
        "update": Need("key:write", _key),
    }

    model = KVEntry

    def visible(self):
        return inventory.visible_keys(self.authz, KVEntry.objects.all())

    def list(self, request: Request) -> Response:
        return self.paged(self.filter_queryset(self.get_queryset()), s.KVEntrySerializer)

    def _entry(self, key: str) -> KVEntry:
        _index, entry = kv.get(key)
        if entry is None:
            raise NotFound(f'Key "{key}" not found')
        return entry

    def retrieve(self, request: Request, key: str) -> Response:
        return Response(s.KVEntrySerializer(self._entry(key)).data)

    def update(self, request: Request, key: str) -> Response:
        body = self.valid(s.KVWriteSerializer)
        data = body.validated_data
        if not kv.put(key, body.value_bytes(), flags=data["flags"], cas=data.get("cas")):
            raise Conflict(f'Key "{key}" was not written: cas {data["cas"]} did not match')
        return Response(s.KVEntrySerializer(self._entry(key)).data)

    def destroy(self, request: Request, key: str) -> Response:
        params = s.KVDeleteParamsSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        recurse, cas = params.validated_data["recurse"], params.validated_data.get("cas")
        if recurse:
            require(request, "key:write_prefix", key)
        else:
            require(request, "key:write", key)
            self._entry(key)
        if not kv.delete(key, recurse=recurse, cas=cas):
            raise Conflict(f'Key "{key}" was not deleted: cas {cas} did not match')
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- ACL ----------------------------------------------------------------------------------


class ACLViewSet(MeshViewSet):
    """ACL resources: reads need `acl:read`, writes `acl:write`; 401 while ACLs are off."""

    acl = {
        "list": Need("acl:read"),
        "retrieve": Need("acl:read"),
        "create": Need("acl:write"),
        "update": Need("acl:write"),
        "partial_update": Need("acl:write"),
        "destroy": Need("acl:write"),
    }

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        acl.ensure_enabled()
        super().initial(request, *args, **kwargs)


@extend_schema_view(
    retrieve=extend_schema(responses={200: s.ACLTokenSerializer, 403: ERROR, 404: ERROR}),
    create=extend_schema(
        request=s.ACLTokenWriteSerializer,
        responses={201: s.ACLTokenCreatedSerializer, **WRITE_ERRORS},
    ),
    update=extend_schema(
        request=s.ACLTokenWriteSerializer, responses={200: s.ACLTokenSerializer, **WRITE_ERRORS}
    ),
    partial_update=extend_schema(
        request=s.ACLTokenWriteSerializer, responses={200: s.ACLTokenSerializer, **WRITE_ERRORS}
    ),
    destroy=extend_schema(responses={204: None, 400: ERROR, 403: ERROR, 404: ERROR}),
)
class ACLTokenViewSet(mixins.ListModelMixin, ACLViewSet):
    """ACL tokens (secrets are shown only when a token is created)."""

    serializer_class = s.ACLTokenSerializer
    write_serializers = {
        "POST": s.ACLTokenWriteSerializer,
        "PUT": s.ACLTokenWriteSerializer,
        "PATCH": s.ACLTokenWriteSerializer,
    }
    filterset_class = filtersets.ACLTokenFilterSet
    ordering_fields = ["accessor_id", "description", "create_time", "create_index", "modify_index"]
    ordering = ["create_index", "accessor_id"]
    lookup_field = "accessor_id"
    lookup_value_regex = NAME

    model = ACLToken

    def visible(self):
        live = [t.accessor_id for t in acl.list_tokens()]
        return ACLToken.objects.prefetch_related("policies", "roles").filter(accessor_id__in=live)

    def retrieve(self, request: Request, accessor_id: str) -> Response:
        return Response(s.ACLTokenSerializer(acl.get_token(accessor_id)).data)

    def create(self, request: Request) -> Response:
        body = self.valid(s.ACLTokenWriteSerializer)
        token, secret = acl.create_token(**body.create_args())
        data = s.ACLTokenCreatedSerializer(token, context={"secret": secret}).data
        return Response(data, status.HTTP_201_CREATED)

    def update(self, request: Request, accessor_id: str) -> Response:
        body = self.valid(s.ACLTokenWriteSerializer)
        token = acl.update_token(accessor_id, **body.update_args(acl.get_token(accessor_id)))
        return Response(s.ACLTokenSerializer(token).data)

    def partial_update(self, request: Request, accessor_id: str) -> Response:
        return self.update(request, accessor_id)

    def destroy(self, request: Request, accessor_id: str) -> Response:
        acl.get_token(accessor_id)
        acl.delete_token(accessor_id, caller_accessor=identity_of(request).accessor_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema_view(
    retrieve=extend_schema(responses={200: s.ACLPolicySerializer, 403: ERROR, 404: ERROR}),
    create=extend_schema(
        request=s.ACLPolicyWriteSerializer, responses={201: s.ACLPolicySerializer, **WRITE_ERRORS}
    ),
    update=extend_schema(
        request=s.ACLPolicyWriteSerializer, responses={200: s.ACLPolicySerializer, **WRITE_ERRORS}
    ),
    partial_update=extend_schema(
        request=s.ACLPolicyWriteSerializer, responses={200: s.ACLPolicySerializer, **WRITE_ERRORS}
    ),
    destroy=extend_schema(responses={204: None, 400: ERROR, 403: ERROR, 404: ERROR}),
)
class ACLPolicyViewSet(mixins.ListModelMixin, ACLViewSet):
    """ACL policies: named rules that tokens link to."""

    queryset = ACLPolicy.objects.all()
    serializer_class = s.ACLPolicySerializer
    write_serializers = {
        "POST": s.ACLPolicyWriteSerializer,
        "PUT": s.ACLPolicyWriteSerializer,
        "PATCH": s.ACLPolicyWriteSerializer,
    }
    filterset_class = filtersets.ACLPolicyFilterSet
    ordering_fields = ["name", "create_index", "modify_index"]
    ordering = ["name"]
    lookup_value_regex = NAME

    def retrieve(self, request: Request, pk: str) -> Response:
        return Response(s.ACLPolicySerializer(acl.get_policy(pk)).data)

    def create(self, request: Request) -> Response:
        body = self.valid(s.ACLPolicyWriteSerializer)
        policy = acl.create_policy(**body.args())
        return Response(s.ACLPolicySerializer(policy).data, status.HTTP_201_CREATED)

    def update(self, request: Request, pk: str) -> Response:
        body = self.valid(s.ACLPolicyWriteSerializer)
        policy = acl.update_policy(pk, **body.args(acl.get_policy(pk)))
        return Response(s.ACLPolicySerializer(policy).data)

    def partial_update(self, request: Request, pk: str) -> Response:
        return self.update(request, pk)

    def destroy(self, request: Request, pk: str) -> Response:
        acl.get_policy(pk)
        acl.delete_policy(pk)
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema_view(
    retrieve=extend_schema(responses={200: s.ACLRoleSerializer, 403: ERROR, 404: ERROR}),
    create=extend_schema(
        request=s.ACLRoleWriteSerializer, responses={201: s.ACLRoleSerializer, **WRITE_ERRORS}
    ),
    update=extend_schema(
        request=s.ACLRoleWriteSerializer, responses={200: s.ACLRoleSerializer, **WRITE_ERRORS}
    ),
    partial_update=extend_schema(
        request=s.ACLRoleWriteSerializer, responses={200: s.ACLRoleSerializer, **WRITE_ERRORS}
    ),
    destroy=extend_schema(responses={204: None, 400: ERROR, 403: ERROR, 404: ERROR}),
)
class ACLRoleViewSet(mixins.ListModelMixin, ACLViewSet):
    """ACL roles: policies and service/node identities that tokens link to."""

    queryset = ACLRole.objects.prefetch_related("policies")
    serializer_class = s.ACLRoleSerializer
    write_serializers = {
        "POST": s.ACLRoleWriteSerializer,
        "PUT": s.ACLRoleWriteSerializer,
        "PATCH": s.ACLRoleWriteSerializer,
    }
    filterset_class = filtersets.ACLRoleFilterSet
    ordering_fields = ["name", "create_index", "modify_index"]
    ordering = ["name"]
    lookup_value_regex = NAME

    def retrieve(self, request: Request, pk: str) -> Response:
        return Response(s.ACLRoleSerializer(acl.get_role(pk)).data)

    def create(self, request: Request) -> Response:
        body = self.valid(s.ACLRoleWriteSerializer)
        role = acl.create_role(**body.args())
        return Response(s.ACLRoleSerializer(role).data, status.HTTP_201_CREATED)

    def update(self, request: Request, pk: str) -> Response:
        body = self.valid(s.ACLRoleWriteSerializer)
        role = acl.update_role(pk, **body.args(acl.get_role(pk)))
        return Response(s.ACLRoleSerializer(role).data)

    def partial_update(self, request: Request, pk: str) -> Response:
        return self.update(request, pk)

    def destroy(self, request: Request, pk: str) -> Response:
        acl.get_role(pk)
        acl.delete_role(pk)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- docs ---------------------------------------------------------------------------------

# drf-spectacular's Redoc page links Google Fonts; ours loads nothing from
# outside the server (Redoc falls back to the system's fonts).
_REDOC_TEMPLATE = """{% extends "drf_spectacular/redoc.html" %}
{% block head %}
<title>{{ title|default:"Redoc" }}</title>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body { margin: 0; padding: 0; }</style>
{% endblock head %}
"""


class _LocalRedocRenderer(TemplateHTMLRenderer):
    def resolve_template(self, template_names: list[str]) -> Any:
        return engines["django"].from_string(_REDOC_TEMPLATE)


class RedocView(SpectacularRedocView):
    """Redoc, served entirely from this server's static files."""

    renderer_classes = [_LocalRedocRenderer]
