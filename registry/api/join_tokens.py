"""`/api/join-tokens/`: the tokens per-host agents join the mesh with.

    GET    /api/join-tokens/          list (never a secret)            acl:read
    POST   /api/join-tokens/          create {"ttl": "1h", "uses": 1,  acl:write
                                      "description": "", "datacenter": "",
                                      "node": "", "services": ["web", "api-*"]}
    GET    /api/join-tokens/<id>/     one token                        acl:read
    DELETE /api/join-tokens/<id>/     revoke (200, the revoked token)  acl:write
           ?nodes=true                and revoke the nodes that joined with it

The scope (`node`, `services`) is what a node that joins with the token may
claim: `node` its only allowed name ("" any), `services` the service names
(or `prefix*` patterns, `*` any) it may register and get leaves for. The
default is no services at all: say which ones.

A join token mints node identities (any node name, in its datacenter), so it
is a credential like an ACL token: creating, listing and revoking need the
ACL permissions, not `node:write` (which names nodes one by one, while a token
names none in advance). The create answer is the only place the token's
secret form appears, with the CA pin and the `mesh agent` command to run.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from registry import decode
from registry.api.auth import Need, identity_of
from registry.api.serializers import DurationField, Text
from registry.api.views import ERROR, WRITE_ERRORS, MeshViewSet
from registry.domain import enrollment, join_tokens
from registry.errors import NotFound
from registry.models import JoinToken


class JoinTokenSerializer(serializers.Serializer):
    """A join token (its secret is never shown again after creation)."""

    id = serializers.CharField()
    description = serializers.CharField()
    datacenter = serializers.CharField()
    node_name = serializers.CharField(help_text='the only node name it joins ("" any)')
    services = serializers.ListField(
        child=serializers.CharField(),
        help_text="services a node that joins with it may register: names, `prefix*`, `*`",
    )
    max_uses = serializers.IntegerField(help_text="0: unlimited")
    uses = serializers.IntegerField()
    state = serializers.ChoiceField(["active", "expired", "revoked", "used"])
    expires_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)
    created_by = serializers.CharField()
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(allow_null=True)
    last_used_by = serializers.CharField(help_text="the node that used it last")
    create_index = serializers.IntegerField()
    modify_index = serializers.IntegerField()


class JoinTokenCreatedSerializer(JoinTokenSerializer):
    token = serializers.CharField(help_text="`<id>.<secret>`: shown this once")
    ca_pin = serializers.CharField(help_text="sha256:<hex of the active CA root's DER>")
    join_address = serializers.CharField(help_text="the control plane's gRPC address")
    agent_command = serializers.CharField(help_text="the `mesh agent` command line to run")


MAX_USES = 2**31 - 1  # the `max_uses` column is a 32-bit integer


class JoinTokenCreateSerializer(serializers.Serializer):
    ttl = DurationField(required=False, default="1h", help_text='how long it is valid ("1h")')
    uses = serializers.IntegerField(
        required=False,
        default=1,
        min_value=0,
        max_value=MAX_USES,
        help_text="1: single use; 0: unlimited",
    )
    description = Text(required=False, allow_blank=True, default="")
    datacenter = Text(required=False, allow_blank=True, default="")
    node = Text(
        required=False, allow_blank=True, default="", help_text='the only node name ("" any)'
    )
    services = serializers.ListField(
        child=Text(),
        required=False,
        default=list,
        max_length=64,
        help_text="services the node may register: names, `prefix*` patterns, `*` (default none)",
    )


def join_address(request: Request) -> str:
    return join_tokens.join_address(request.get_host())


agent_command = join_tokens.agent_command


@extend_schema_view(
    list=extend_schema(responses={200: JoinTokenSerializer(many=True), 403: ERROR}),
    retrieve=extend_schema(responses={200: JoinTokenSerializer, 403: ERROR, 404: ERROR}),
    create=extend_schema(
        request=JoinTokenCreateSerializer,
        responses={201: JoinTokenCreatedSerializer, **WRITE_ERRORS},
    ),
    destroy=extend_schema(
        parameters=[
            OpenApiParameter(
                "nodes", bool, description="also revoke the nodes that joined with the token"
            )
        ],
        responses={200: JoinTokenSerializer, 403: ERROR, 404: ERROR},
    ),
)
class JoinTokenViewSet(mixins.ListModelMixin, MeshViewSet):
    """Join tokens for per-host agents (`mesh join-token create|list|revoke`)."""

    queryset = JoinToken.objects.all()
    serializer_class = JoinTokenSerializer
    write_serializers = {"POST": JoinTokenCreateSerializer}
    ordering_fields = ["create_index", "expires_at", "id"]
    ordering = ["-create_index"]
    lookup_value_regex = "[^/]+"
    acl = {
        "list": Need("acl:read"),
        "retrieve": Need("acl:read"),
        "create": Need("acl:write"),
        "destroy": Need("acl:write"),
    }

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        rows = self.filter_queryset(self.get_queryset())
        page = self.paginate_queryset(rows)
        return self.get_paginated_response([join_tokens.token_json(r) for r in page])

    def retrieve(self, request: Request, pk: str) -> Response:
        row = JoinToken.objects.filter(id=pk).first()
        if row is None:
            raise NotFound(f'join token "{pk}" not found')
        return Response(JoinTokenSerializer(join_tokens.token_json(row)).data)

    def create(self, request: Request) -> Response:
        body = self.valid(JoinTokenCreateSerializer).validated_data
        new = join_tokens.create_token(
            ttl_seconds=decode.parse_duration(body["ttl"]),
            max_uses=body["uses"],
            description=body["description"],
            datacenter=body["datacenter"],
            created_by=identity_of(request).accessor_id or "anonymous",
            node_name=body["node"],
            services=body["services"],
        )
        pin = enrollment.ca_pin()
        address = join_address(request)
        data = {
            **join_tokens.token_json(new.row),
            "token": new.token,
            "ca_pin": pin,
            "join_address": address,
            "agent_command": agent_command(address, new.token, pin),
        }
        return Response(JoinTokenCreatedSerializer(data).data, status.HTTP_201_CREATED)

    def destroy(self, request: Request, pk: str) -> Response:
        nodes = request.query_params.get("nodes", "").lower() in ("1", "true", "yes")
        row = join_tokens.revoke_token(pk, nodes=nodes)
        return Response(JoinTokenSerializer(join_tokens.token_json(row)).data)
