"""Shapes of `/api` resources.

Output serializers render registry rows in snake_case. Input serializers only
check a request's shape and types (naming the field that is wrong) and turn it
into the domain's input (Consul's structures, decoded by `registry.decode`);
every rule about what may be stored lives in `registry.domain`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from registry import decode
from registry.domain import datacenters as dc_domain
from registry.domain import kv
from registry.errors import MeshError
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

HEALTH_CHOICES = [Check.PASSING, Check.WARNING, Check.CRITICAL]


class Text(serializers.CharField):
    """A string, strictly: numbers and booleans are refused rather than coerced."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StringMap(serializers.DictField):
    child = Text(allow_blank=True)


class StringList(serializers.ListField):
    child = Text(allow_blank=True)


class HealthCounts(serializers.Serializer):
    passing = serializers.IntegerField()
    warning = serializers.IntegerField()
    critical = serializers.IntegerField()


# --- datacenters -----------------------------------------------------------------------


class DatacenterSerializer(serializers.ModelSerializer):
    node_count = serializers.SerializerMethodField()

    class Meta:
        model = Datacenter
        fields = ["name", "provider", "region", "node_count", "create_index", "modify_index"]
        read_only_fields = fields

    def get_node_count(self, dc: Datacenter) -> int:
        annotated = getattr(dc, "node_count", None)
        return annotated if annotated is not None else dc.nodes.count()


class DatacenterCreateSerializer(serializers.Serializer):
    name = Text(max_length=128)
    provider = serializers.ChoiceField(Datacenter.PROVIDERS, default="onprem")
    region = Text(max_length=128, allow_blank=True, default="")


class DatacenterUpdateSerializer(serializers.Serializer):
    """PUT and PATCH: the fields sent are changed, the others kept."""

    provider = serializers.ChoiceField(Datacenter.PROVIDERS, required=False)
    region = Text(max_length=128, allow_blank=True, required=False)


# --- checks --------------------------------------------------------------------------------


class CheckSerializer(serializers.ModelSerializer):
    node = serializers.CharField(source="node.name", read_only=True)
    service_tags = StringList(read_only=True)
    definition = serializers.DictField(read_only=True)

    class Meta:
        model = Check
        fields = [
            "id",
            "node",
            "check_id",
            "name",
            "status",
            "notes",
            "output",
            "service_id",
            "service_name",
            "service_tags",
            "type",
            "interval",
            "timeout",
            "ttl",
            "definition",
            "create_index",
            "modify_index",
        ]
        read_only_fields = fields


def _duration(value: str) -> str:
    try:
        if decode.parse_duration(value) < 0:
            raise ValueError
    except ValueError:
        raise serializers.ValidationError(
            f'invalid duration {value!r} (use Go durations like "10s", "1m30s")'
        ) from None
    return value


class DurationField(Text):
    """A Go duration string ("10s", "1m30s", "500ms")."""

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data)
        return _duration(value) if value else value


class CheckSpecSerializer(serializers.Serializer):
    """A health check to register with an instance (one of http, tcp, grpc or ttl)."""

    check_id = Text(required=False, allow_blank=True)
    name = Text(required=False, allow_blank=True)
    notes = Text(required=False, allow_blank=True)
    status = serializers.ChoiceField(HEALTH_CHOICES, required=False)
    http = Text(required=False)
    method = Text(required=False)
    header = serializers.DictField(child=StringList(), required=False)
    body = Text(required=False, allow_blank=True)
    tcp = Text(required=False)
    grpc = Text(required=False)
    grpc_use_tls = serializers.BooleanField(required=False)
    tls_server_name = Text(required=False)
    tls_skip_verify = serializers.BooleanField(required=False)
    ttl = DurationField(required=False)
    interval = DurationField(required=False)
    timeout = DurationField(required=False)
    deregister_critical_service_after = DurationField(required=False)

    _CONSUL = {
        "check_id": "CheckID",
        "name": "Name",
        "notes": "Notes",
        "status": "Status",
        "http": "HTTP",
        "method": "Method",
        "header": "Header",
        "body": "Body",
        "tcp": "TCP",
        "grpc": "GRPC",
        "grpc_use_tls": "GRPCUseTLS",
        "tls_server_name": "TLSServerName",
        "tls_skip_verify": "TLSSkipVerify",
        "ttl": "TTL",
        "interval": "Interval",
        "timeout": "Timeout",
        "deregister_critical_service_after": "DeregisterCriticalServiceAfter",
    }

    @classmethod
    def consul(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {cls._CONSUL[k]: v for k, v in data.items()}


# --- service instances -------------------------------------------------------------------


class WeightsSerializer(serializers.Serializer):
    passing = serializers.IntegerField(min_value=1, default=1)
    warning = serializers.IntegerField(min_value=0, default=1)


class InstanceSerializer(serializers.ModelSerializer):
    """A registered service instance and its aggregated health."""

    node = serializers.CharField(source="node.name", read_only=True)
    datacenter = serializers.CharField(source="node.datacenter.name", read_only=True)
    tags = StringList(read_only=True)
    meta = StringMap(read_only=True)
    tagged_addresses = serializers.DictField(read_only=True)
    weights = serializers.SerializerMethodField()
    proxy = serializers.DictField(read_only=True)
    connect = serializers.DictField(read_only=True)
    status = serializers.SerializerMethodField()

    class Meta:
        model = ServiceInstance
        fields = [
            "id",
            "node",
            "datacenter",
            "service_id",
            "name",
            "kind",
            "tags",
            "address",
            "port",
            "meta",
            "tagged_addresses",
            "weights",
            "enable_tag_override",
            "proxy",
            "connect",
            "namespace",
            "parent_service_id",
            "agent_local",
            "status",
            "create_index",
            "modify_index",
        ]
        read_only_fields = fields

    @extend_schema_field(WeightsSerializer)
    def get_weights(self, svc: ServiceInstance) -> dict[str, int]:
        w = svc.weights or {}
        return {"passing": w.get("Passing", 1), "warning": w.get("Warning", 1)}

    def _checks(self, svc: ServiceInstance) -> list[Check]:
        return self.context.get("checks", {}).get(svc.pk, [])

    @extend_schema_field(serializers.ChoiceField(HEALTH_CHOICES))
    def get_status(self, svc: ServiceInstance) -> str:
        from registry.domain.inventory import instance_status

        return instance_status(self._checks(svc))


class InstanceDetailSerializer(InstanceSerializer):
    """An instance with its checks (its node's and its own)."""

    checks = serializers.SerializerMethodField()

    class Meta(InstanceSerializer.Meta):
        fields = [*InstanceSerializer.Meta.fields, "checks"]
        read_only_fields = fields

    @extend_schema_field(CheckSerializer(many=True))
    def get_checks(self, svc: ServiceInstance) -> list[dict[str, Any]]:
        return CheckSerializer(self._checks(svc), many=True).data


class InstanceCreateSerializer(serializers.Serializer):
    """Register a service instance.

    Without `node` the instance is registered on the control plane's own node
    (as `/v1/agent/service/register` does); with `node` it is registered in
    the catalog (as `/v1/catalog/register`), creating or updating the node
    when `node_address` is given.
    """

    node = Text(required=False, max_length=256)
    node_address = Text(required=False, max_length=256)
    datacenter = Text(required=False, max_length=128)
    node_meta = StringMap(required=False)
    name = Text(max_length=256)
    service_id = Text(required=False, max_length=256)
    kind = serializers.ChoiceField(ServiceInstance.KINDS, default="typical")
    tags = StringList(required=False)
    address = Text(required=False, allow_blank=True, max_length=256)
    port = serializers.IntegerField(min_value=0, max_value=65535, default=0)
    meta = StringMap(required=False)
    weights = WeightsSerializer(required=False)
    enable_tag_override = serializers.BooleanField(default=False)
    proxy = serializers.DictField(required=False)
    connect = serializers.DictField(required=False)
    checks = CheckSpecSerializer(many=True, required=False)

    def validate_datacenter(self, value: str) -> str:
        try:
            dc_domain.require_datacenter(value)
        except MeshError as exc:
            raise serializers.ValidationError(exc.message) from None
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "node" not in attrs:
            for name in ("node_address", "datacenter", "node_meta"):
                if name in attrs:
                    raise serializers.ValidationError({name: "only valid together with node"})
        elif "node_address" not in attrs:
            # Without an address the node is left as it is: it must exist, and
            # node fields would be ignored.
            for name in ("datacenter", "node_meta"):
                if name in attrs:
                    raise serializers.ValidationError(
                        {name: "only valid together with node_address (it updates the node)"}
                    )
            if not Node.objects.filter(name=attrs["node"]).exists():
                raise serializers.ValidationError(
                    {"node_address": f'required to create the node "{attrs["node"]}"'}
                )
        return attrs

    def service_spec(self) -> dict[str, Any]:
        """The instance as Consul's service definition (decoded, canonical names)."""
        d = self.validated_data
        spec: dict[str, Any] = {
            "Name": d["name"],
            "ID": d.get("service_id") or d["name"],
            "Kind": "" if d["kind"] == "typical" else d["kind"],
            "Port": d["port"],
            "EnableTagOverride": d["enable_tag_override"],
        }
        for field, key in (
            ("tags", "Tags"),
            ("address", "Address"),
            ("meta", "Meta"),
            ("proxy", "Proxy"),
            ("connect", "Connect"),
        ):
            if field in d:
                spec[key] = d[field]
        if "weights" in d:
            spec["Weights"] = {
                "Passing": d["weights"]["passing"],
                "Warning": d["weights"]["warning"],
            }
        return spec

    def check_specs(self) -> list[dict[str, Any]]:
        return [CheckSpecSerializer.consul(c) for c in self.validated_data.get("checks", [])]

    def agent_spec(self) -> dict[str, Any]:
        """For `catalog.register_agent_service` on the control plane's node."""
        spec = self.service_spec()
        spec["Checks"] = self.check_specs()
        return decode.AGENT_SERVICE(spec)

    def catalog_spec(self) -> dict[str, Any]:
        """For `catalog.catalog_register`: the node, the service and its checks."""
        d = self.validated_data
        service = self.service_spec()
        checks = []
        for c in self.check_specs():
            check = {k: c.pop(k) for k in ("CheckID", "Name", "Notes", "Status") if k in c}
            check["ServiceID"] = service["ID"]
            check["Definition"] = c
            checks.append(check)
        spec: dict[str, Any] = {
            "Node": d["node"],
            "Service": service,
            "Checks": checks,
            # Without an address the node is left as it is (and must exist).
            "SkipNodeUpdate": "node_address" not in d,
        }
        if "node_address" in d:
            spec["Address"] = d["node_address"]
        if "datacenter" in d:
            spec["Datacenter"] = d["datacenter"]
        if "node_meta" in d:
            spec["NodeMeta"] = d["node_meta"]
        return decode.CATALOG_REGISTER(spec)


# --- nodes --------------------------------------------------------------------------------


class NodeSerializer(serializers.ModelSerializer):
    datacenter = serializers.CharField(source="datacenter.name", read_only=True)
    tagged_addresses = StringMap(read_only=True)
    meta = StringMap(read_only=True)
    service_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Node
        fields = [
            "name",
            "node_id",
            "address",
            "datacenter",
            "tagged_addresses",
            "meta",
            "service_count",
            "create_index",
            "modify_index",
        ]
        read_only_fields = fields


class NodeDetailSerializer(NodeSerializer):
    """A node with the instances and checks the caller may see (set by the view)."""

    services = serializers.SerializerMethodField()
    checks = serializers.SerializerMethodField()

    class Meta(NodeSerializer.Meta):
        fields = [*NodeSerializer.Meta.fields, "services", "checks"]
        read_only_fields = fields

    @extend_schema_field(InstanceSerializer(many=True))
    def get_services(self, node: Node) -> list[dict[str, Any]]:
        return InstanceSerializer(self.context["instances"], many=True, context=self.context).data

    @extend_schema_field(CheckSerializer(many=True))
    def get_checks(self, node: Node) -> list[dict[str, Any]]:
        return CheckSerializer(self.context["node_checks"], many=True).data


# --- services (aggregated per name) --------------------------------------------------------


class ServiceSummarySerializer(serializers.Serializer):
    """One service name: how many instances, where, of which kinds, how healthy."""

    name = Text()
    instance_count = serializers.IntegerField()
    tags = StringList()
    kinds = StringList()
    datacenters = StringList()
    health = HealthCounts(help_text="instances by their aggregated status")
    checks = HealthCounts(help_text="the instances' checks by status")
    modify_index = serializers.IntegerField()


class ServiceDetailSerializer(ServiceSummarySerializer):
    instances = serializers.SerializerMethodField()

    @extend_schema_field(InstanceDetailSerializer(many=True))
    def get_instances(self, summary: Any) -> list[dict[str, Any]]:
        return InstanceDetailSerializer(
            self.context["instances"], many=True, context=self.context
        ).data


# --- key/value -------------------------------------------------------------------------


class KVEntrySerializer(serializers.ModelSerializer):
    """A key. `value` is the value as UTF-8 text (null when it is not text or
    there is none); `value_base64` is always the exact bytes."""

    value = serializers.SerializerMethodField()
    value_base64 = serializers.SerializerMethodField()
    flags = serializers.SerializerMethodField()
    session = serializers.CharField(source="session_id", allow_null=True, read_only=True)

    class Meta:
        model = KVEntry
        fields = [
            "key",
            "value",
            "value_base64",
            "flags",
            "session",
            "lock_index",
            "create_index",
            "modify_index",
        ]
        read_only_fields = fields

    @staticmethod
    def _bytes(entry: KVEntry) -> bytes | None:
        return None if entry.value is None else bytes(entry.value)

    @extend_schema_field(serializers.IntegerField(min_value=0, max_value=kv.UINT64_MAX))
    def get_flags(self, entry: KVEntry) -> int:
        return kv.entry_json(entry)["Flags"]

    @extend_schema_field(OpenApiTypes.STR)
    def get_value(self, entry: KVEntry) -> str | None:
        raw = self._bytes(entry)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None

    @extend_schema_field(OpenApiTypes.BYTE)
    def get_value_base64(self, entry: KVEntry) -> str | None:
        raw = self._bytes(entry)
        return None if raw is None else base64.b64encode(raw).decode()


class KVWriteSerializer(serializers.Serializer):
    """Set a key: its value as text (`value`) or bytes (`value_base64`), not both."""

    value = Text(required=False, allow_blank=True, trim_whitespace=False)
    value_base64 = Text(required=False, allow_blank=True)
    flags = serializers.IntegerField(min_value=0, max_value=kv.UINT64_MAX, default=0)
    cas = serializers.IntegerField(
        min_value=0,
        required=False,
        help_text="write only if the key's modify_index is this (0: only if it does not exist)",
    )

    def validate_value_base64(self, value: str) -> bytes:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise serializers.ValidationError("not valid base64") from None

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "value" in attrs and "value_base64" in attrs:
            raise serializers.ValidationError("send value or value_base64, not both")
        return attrs

    def value_bytes(self) -> bytes:
        d = self.validated_data
        if "value_base64" in d:
            return d["value_base64"]
        return d.get("value", "").encode()


class KVDeleteParamsSerializer(serializers.Serializer):
    recurse = serializers.BooleanField(default=False)
    cas = serializers.IntegerField(min_value=0, required=False)


# --- ACL ------------------------------------------------------------------------------------


class PolicyLinkSerializer(serializers.Serializer):
    """A policy a token links to, by `id` or by `name`."""

    id = Text(required=False)
    name = Text(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if not attrs.get("id") and not attrs.get("name"):
            raise serializers.ValidationError("give the policy's id or name")
        return attrs

    @staticmethod
    def consul(links: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{"ID": link.get("id", ""), "Name": link.get("name", "")} for link in links]


class ServiceIdentitySerializer(serializers.Serializer):
    """Consul's service identity: write `service_name` (and its sidecar), read the rest."""

    service_name = Text()
    datacenters = StringList(required=False)

    @staticmethod
    def consul(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"ServiceName": i["service_name"], "Datacenters": i.get("datacenters") or []}
            for i in items
        ]

    @staticmethod
    def rest(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"service_name": i["ServiceName"], "datacenters": list(i.get("Datacenters") or [])}
            for i in items
        ]


class NodeIdentitySerializer(serializers.Serializer):
    """Consul's node identity: write `node_name` in `datacenter`, read services."""

    node_name = Text()
    datacenter = Text()

    @staticmethod
    def consul(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"NodeName": i["node_name"], "Datacenter": i["datacenter"]} for i in items]

    @staticmethod
    def rest(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"node_name": i["NodeName"], "datacenter": i["Datacenter"]} for i in items]


class ACLTokenSerializer(serializers.ModelSerializer):
    """A token. Its secret is never shown again after it is created."""

    policies = serializers.SerializerMethodField()
    roles = serializers.SerializerMethodField()

    class Meta:
        model = ACLToken
        fields = [
            "accessor_id",
            "description",
            "policies",
            "roles",
            "local",
            "expiration_time",
            "create_time",
            "create_index",
            "modify_index",
        ]
        read_only_fields = fields

    @extend_schema_field(PolicyLinkSerializer(many=True))
    def get_policies(self, token: ACLToken) -> list[dict[str, str]]:
        return [
            {"id": p.id, "name": p.name} for p in sorted(token.policies.all(), key=lambda p: p.name)
        ]

    @extend_schema_field(PolicyLinkSerializer(many=True))
    def get_roles(self, token: ACLToken) -> list[dict[str, str]]:
        return [
            {"id": r.id, "name": r.name} for r in sorted(token.roles.all(), key=lambda r: r.name)
        ]


class ACLTokenCreatedSerializer(ACLTokenSerializer):
    """A new token, with its secret (shown this once)."""

    secret_id = serializers.SerializerMethodField()

    class Meta(ACLTokenSerializer.Meta):
        fields = [*ACLTokenSerializer.Meta.fields, "secret_id"]
        read_only_fields = fields

    def get_secret_id(self, token: ACLToken) -> str:
        return self.context["secret"]


class ACLTokenWriteSerializer(serializers.Serializer):
    """Create a token (all fields) or change one (`description`, `policies`, `roles`)."""

    description = Text(required=False, allow_blank=True)
    policies = PolicyLinkSerializer(many=True, required=False)
    roles = PolicyLinkSerializer(many=True, required=False, help_text="roles, by id or name")
    local = serializers.BooleanField(required=False)
    expiration_ttl = DurationField(required=False, help_text='e.g. "24h"; only when creating')
    expiration_time = serializers.DateTimeField(required=False, help_text="only when creating")
    accessor_id = Text(required=False, help_text="a UUID; generated if absent")
    secret_id = Text(required=False, help_text="a UUID; generated if absent")

    def create_args(self) -> dict[str, Any]:
        d = self.validated_data
        return {
            "description": d.get("description", ""),
            "policies": PolicyLinkSerializer.consul(d.get("policies", [])),
            "roles": PolicyLinkSerializer.consul(d.get("roles", [])),
            "local": d.get("local", False),
            "accessor_id": d.get("accessor_id", ""),
            "secret_id": d.get("secret_id", ""),
            "expiration_ttl": decode.parse_duration(d.get("expiration_ttl") or "0"),
            "expiration_time": d.get("expiration_time"),
        }

    def update_args(self, current: ACLToken) -> dict[str, Any]:
        """Fields not sent keep the token's current values (PATCH semantics, also for PUT)."""
        d = self.validated_data
        for name in ("accessor_id", "expiration_ttl", "expiration_time"):
            if name in d:
                raise serializers.ValidationError({name: "cannot be changed after creation"})
        policies = d.get("policies")
        if policies is None:
            links = [{"ID": p.id, "Name": ""} for p in current.policies.all()]
        else:
            links = PolicyLinkSerializer.consul(policies)
        roles = d.get("roles")
        if roles is None:
            role_links = [{"ID": r.id, "Name": ""} for r in current.roles.all()]
        else:
            role_links = PolicyLinkSerializer.consul(roles)
        return {
            "description": d.get("description", current.description),
            "policies": links,
            "roles": role_links,
            "local": d.get("local"),
            "secret_id": d.get("secret_id", ""),
        }


class ACLPolicySerializer(serializers.ModelSerializer):
    datacenters = StringList(read_only=True)

    class Meta:
        model = ACLPolicy
        fields = [
            "id",
            "name",
            "description",
            "rules",
            "datacenters",
            "create_index",
            "modify_index",
        ]
        read_only_fields = fields


class ACLPolicyWriteSerializer(serializers.Serializer):
    """A policy's fields; on update, fields not sent keep their current values."""

    name = Text(max_length=128, required=False)
    description = Text(required=False, allow_blank=True)
    rules = Text(
        required=False, allow_blank=True, trim_whitespace=False, help_text="HCL or JSON rules"
    )
    datacenters = StringList(required=False)

    def args(self, current: ACLPolicy | None = None) -> dict[str, Any]:
        d = self.validated_data
        if current is None and not d.get("name"):
            raise serializers.ValidationError({"name": "This field is required."})
        return {
            "name": d.get("name", current.name if current else ""),
            "description": d.get("description", current.description if current else ""),
            "rules": d.get("rules", current.rules if current else ""),
            "datacenters": d.get("datacenters", list(current.datacenters or []) if current else []),
        }


class ACLRoleSerializer(serializers.ModelSerializer):
    """A role: policies and service/node identities that tokens link to at once."""

    policies = serializers.SerializerMethodField()
    service_identities = serializers.SerializerMethodField()
    node_identities = serializers.SerializerMethodField()

    class Meta:
        model = ACLRole
        fields = [
            "id",
            "name",
            "description",
            "policies",
            "service_identities",
            "node_identities",
            "create_index",
            "modify_index",
        ]
        read_only_fields = fields

    @extend_schema_field(PolicyLinkSerializer(many=True))
    def get_policies(self, role: ACLRole) -> list[dict[str, str]]:
        return [
            {"id": p.id, "name": p.name} for p in sorted(role.policies.all(), key=lambda p: p.name)
        ]

    @extend_schema_field(ServiceIdentitySerializer(many=True))
    def get_service_identities(self, role: ACLRole) -> list[dict[str, Any]]:
        return ServiceIdentitySerializer.rest(role.service_identities or [])

    @extend_schema_field(NodeIdentitySerializer(many=True))
    def get_node_identities(self, role: ACLRole) -> list[dict[str, Any]]:
        return NodeIdentitySerializer.rest(role.node_identities or [])


class ACLRoleWriteSerializer(serializers.Serializer):
    """A role's fields; on update, fields not sent keep their current values."""

    name = Text(max_length=256, required=False)
    description = Text(required=False, allow_blank=True)
    policies = PolicyLinkSerializer(many=True, required=False)
    service_identities = ServiceIdentitySerializer(many=True, required=False)
    node_identities = NodeIdentitySerializer(many=True, required=False)

    def args(self, current: ACLRole | None = None) -> dict[str, Any]:
        d = self.validated_data
        if current is None and not d.get("name"):
            raise serializers.ValidationError({"name": "This field is required."})
        if "policies" in d:
            policies = PolicyLinkSerializer.consul(d["policies"])
        else:
            policies = [{"ID": p.id} for p in current.policies.all()] if current else []
        if "service_identities" in d:
            services = ServiceIdentitySerializer.consul(d["service_identities"])
        else:
            services = list(current.service_identities or []) if current else []
        if "node_identities" in d:
            nodes = NodeIdentitySerializer.consul(d["node_identities"])
        else:
            nodes = list(current.node_identities or []) if current else []
        return {
            "name": d.get("name", current.name if current else ""),
            "description": d.get("description", current.description if current else ""),
            "policies": policies,
            "service_identities": services,
            "node_identities": nodes,
        }
