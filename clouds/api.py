"""`/api/clouds/`: cloud accounts, their syncs and their runs; the gateway config.

    GET    /api/clouds/                         list                    operator:read
    POST   /api/clouds/                         add an account          operator:write
    GET    /api/clouds/<name>/                  one (with its last run) operator:read
    DELETE /api/clouds/<name>/                  remove it and its imports  operator:write
    POST   /api/clouds/<name>/sync              queue a sync now (202)  operator:write
    GET    /api/clouds/<name>/runs/             its runs, newest first  operator:read
    GET    /api/clouds/<name>/runs/<id>/        one run                 operator:read
    GET    /api/datacenters/<dc>/gateway-config what a mesh gateway there needs  operator:read
    POST   /api/datacenters/<dc>/gateway-config/apply  apply its firewall rules  operator:write
           ?dry_run=true                        only show the plan

Credentials go in (`credentials`: `access_key_id`, `secret_access_key`,
`session_token`) and never come out: answers say only where they come from.
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from clouds.domain import accounts, gateway, sync
from clouds.models import CloudAccount, SyncRun
from clouds.providers import PROVIDERS
from clouds.tasks import dispatch
from registry.api import join_tokens as join_tokens_api
from registry.api.auth import Need
from registry.api.serializers import Text
from registry.api.views import ERROR, WRITE_ERRORS, MeshViewSet
from registry.domain import enrollment
from registry.errors import NotFound


class SyncRunSerializer(serializers.Serializer):
    """One sync run: when, what it changed, what it cost, what went wrong."""

    id = serializers.IntegerField()
    account = serializers.CharField()
    trigger = serializers.ChoiceField(["demand", "schedule"])
    status = serializers.ChoiceField(
        ["queued", "running", "succeeded", "failed", "skipped", "abandoned"]
    )
    phase = serializers.CharField()
    queued_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    created = serializers.IntegerField(help_text="catalog instances imported")
    updated = serializers.IntegerField()
    removed = serializers.IntegerField()
    exported_created = serializers.IntegerField(help_text="instances registered in the cloud")
    exported_updated = serializers.IntegerField()
    exported_removed = serializers.IntegerField()
    api_calls = serializers.IntegerField()
    retries = serializers.IntegerField()
    errors = serializers.ListField(child=serializers.DictField())
    notes = serializers.ListField(child=serializers.CharField())


class CloudAccountSerializer(serializers.Serializer):
    """A cloud account (its credentials are never shown: `credentials` says where they come from)."""

    name = serializers.CharField()
    provider = serializers.CharField()
    datacenter = serializers.CharField()
    regions = serializers.ListField(child=serializers.CharField())
    endpoint_url = serializers.CharField()
    credentials = serializers.ChoiceField(["environment", "stored"])
    gateway_security_group = serializers.CharField()
    interval = serializers.IntegerField()
    enabled = serializers.BooleanField()
    node = serializers.CharField(help_text="the catalog node its imports live on")
    next_sync_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    modified_at = serializers.DateTimeField()
    last_run = SyncRunSerializer(allow_null=True)

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["import"] = serializers.DictField()
        fields["export"] = serializers.DictField()
        return fields


class CredentialsSerializer(serializers.Serializer):
    access_key_id = Text(max_length=128)
    secret_access_key = Text(write_only=True, max_length=1024)
    session_token = Text(required=False, allow_blank=True, write_only=True, max_length=4096)


class CloudAccountCreateSerializer(serializers.Serializer):
    name = Text(max_length=63, help_text="lowercase letters, digits and '-'")
    provider = serializers.ChoiceField(list(PROVIDERS), default="aws")
    datacenter = Text(max_length=128, help_text="the datacenter its imports join (created if new)")
    regions = serializers.ListField(child=Text(max_length=64), min_length=1, max_length=32)
    endpoint_url = Text(required=False, allow_blank=True, default="", max_length=512)
    credentials = CredentialsSerializer(
        required=False, allow_null=True, default=None, help_text="omit: the environment's"
    )
    gateway_security_group = Text(required=False, allow_blank=True, default="", max_length=64)
    interval = serializers.IntegerField(
        required=False, default=300, min_value=30, max_value=accounts.MAX_INTERVAL
    )
    enabled = serializers.BooleanField(required=False, default=True)

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["import"] = serializers.DictField(
            required=False,
            default=dict,
            help_text='{"cloud_map": {"namespaces": [...]}, "ec2": {"service_tag": "mesh:service"}}',
        )
        fields["export"] = serializers.DictField(
            required=False,
            default=dict,
            help_text='{"namespace": "mesh.local", "create_namespace": true, "services": ["web"]}',
        )
        return fields


def _last_run(account: CloudAccount) -> SyncRun | None:
    return account.runs.select_related("account").first()


@extend_schema_view(
    list=extend_schema(responses={200: CloudAccountSerializer(many=True), 403: ERROR}),
    retrieve=extend_schema(responses={200: CloudAccountSerializer, 403: ERROR, 404: ERROR}),
    create=extend_schema(
        request=CloudAccountCreateSerializer,
        responses={201: CloudAccountSerializer, **WRITE_ERRORS},
    ),
    destroy=extend_schema(responses={200: CloudAccountSerializer, 403: ERROR, 404: ERROR}),
)
class CloudAccountViewSet(MeshViewSet):
    """Cloud accounts (`mesh cloud add|list|show|sync|remove`)."""

    queryset = CloudAccount.objects.all()
    serializer_class = CloudAccountSerializer
    write_serializers = {"POST": CloudAccountCreateSerializer}
    lookup_field = "name"
    lookup_value_regex = "[^/]+"
    acl = {
        "list": Need("operator:read"),
        "retrieve": Need("operator:read"),
        "runs": Need("operator:read"),
        "run": Need("operator:read"),
        "create": Need("operator:write"),
        "destroy": Need("operator:write"),
        "sync": Need("operator:write"),
    }

    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(CloudAccount.objects.order_by("name"))
        return self.get_paginated_response([accounts.account_json(a, _last_run(a)) for a in page])

    def retrieve(self, request: Request, name: str) -> Response:
        account = accounts.get_account(name)
        return Response(accounts.account_json(account, _last_run(account)))

    def create(self, request: Request) -> Response:
        body = self.valid(CloudAccountCreateSerializer).validated_data
        creds = body["credentials"]
        account = accounts.create_account(
            name=body["name"],
            provider=body["provider"],
            datacenter=body["datacenter"],
            regions=body["regions"],
            endpoint_url=body["endpoint_url"],
            credentials={k: v for k, v in creds.items() if v} if creds else None,
            import_config=body["import"],
            export_config=body["export"],
            gateway_security_group=body["gateway_security_group"],
            interval=body["interval"],
            enabled=body["enabled"],
        )
        return Response(accounts.account_json(account), status.HTTP_201_CREATED)

    def destroy(self, request: Request, name: str) -> Response:
        return Response(accounts.account_json(accounts.delete_account(name)))

    @extend_schema(request=None, responses={202: SyncRunSerializer, 403: ERROR, 404: ERROR})
    @action(detail=True, methods=["post"], url_path="sync")
    def sync(self, request: Request, name: str) -> Response:
        """Queue a sync of the account now; poll its run for the outcome."""
        run = sync.request_sync(name, "demand")
        dispatch(run)
        return Response(accounts.run_json(run), status.HTTP_202_ACCEPTED)

    @extend_schema(responses={200: SyncRunSerializer(many=True), 403: ERROR, 404: ERROR})
    @action(detail=True, methods=["get"], url_path="runs")
    def runs(self, request: Request, name: str) -> Response:
        """The account's sync runs, newest first."""
        account = accounts.get_account(name)
        page = self.paginate_queryset(account.runs.select_related("account").order_by("-id"))
        return self.get_paginated_response([accounts.run_json(r) for r in page])

    @extend_schema(responses={200: SyncRunSerializer, 403: ERROR, 404: ERROR})
    @action(detail=True, methods=["get"], url_path=r"runs/(?P<run_id>[0-9]+)")
    def run(self, request: Request, name: str, run_id: str) -> Response:
        """One sync run."""
        run = (
            SyncRun.objects.select_related("account")
            .filter(account__name=name, pk=int(run_id))
            .first()
        )
        if run is None:
            raise NotFound(f'Run {run_id} of cloud account "{name}" not found')
        return Response(accounts.run_json(run))


class GatewayConfigViewSet(MeshViewSet):
    """What a mesh gateway of a datacenter needs, and its cloud firewall rules."""

    queryset = CloudAccount.objects.none()
    acl = {"retrieve": Need("operator:read"), "apply": Need("operator:write")}

    @extend_schema(responses={200: serializers.DictField(), 403: ERROR, 404: ERROR})
    def retrieve(self, request: Request, dc: str) -> Response:
        command = join_tokens_api.agent_command(
            join_tokens_api.join_address(request), "<join-token>", enrollment.ca_pin()
        )
        return Response(gateway.gateway_config(dc, agent_command=command))

    @extend_schema(request=None, responses={200: serializers.DictField(), **WRITE_ERRORS})
    def apply(self, request: Request, dc: str) -> Response:
        dry_run = request.query_params.get("dry_run", "").lower() in ("1", "true", "yes")
        return Response(gateway.apply_firewall(dc, dry_run=dry_run))
