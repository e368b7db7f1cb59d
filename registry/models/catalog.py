"""Datacenters, nodes, service instances and health checks."""

from django.db import models

from registry.models.base import Indexed


class Datacenter(Indexed):
    """A network region (a cloud region or an on-prem site) of one provider."""

    PROVIDERS = ["aws", "gcp", "azure", "onprem", "other"]

    name = models.CharField(max_length=128, unique=True)
    provider = models.CharField(max_length=32, default="onprem")
    region = models.CharField(max_length=128, blank=True, default="")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Node(Indexed):
    """A host known to the catalog (the control plane's own node included)."""

    node_id = models.CharField(max_length=64, blank=True, default="")
    name = models.CharField(max_length=256, unique=True)
    address = models.CharField(max_length=256)
    datacenter = models.ForeignKey(Datacenter, on_delete=models.PROTECT, related_name="nodes")
    tagged_addresses = models.JSONField(default=dict)
    meta = models.JSONField(default=dict)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ServiceInstance(Indexed):
    """One registered instance of a service on a node (Consul's `ServiceNode`)."""

    KINDS = ["typical", "connect-proxy", "mesh-gateway", "terminating-gateway", "ingress-gateway"]

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="services")
    service_id = models.CharField(max_length=256)
    name = models.CharField(max_length=256, db_index=True)
    kind = models.CharField(max_length=32, default="typical")
    tags = models.JSONField(default=list)
    address = models.CharField(max_length=256, blank=True, default="")
    port = models.IntegerField(default=0)
    meta = models.JSONField(default=dict)
    tagged_addresses = models.JSONField(default=dict)
    weights = models.JSONField(default=dict)
    enable_tag_override = models.BooleanField(default=False)
    proxy = models.JSONField(default=dict)
    connect = models.JSONField(default=dict)
    namespace = models.CharField(max_length=128, default="default")
    # For a sidecar registered through Connect.SidecarService: its parent's ID,
    # so the sidecar goes when the parent is deregistered.
    parent_service_id = models.CharField(max_length=256, blank=True, default="")
    # Where Proxy.DestinationServiceName points (indexed for /v1/catalog/connect).
    destination_name = models.CharField(max_length=256, blank=True, default="", db_index=True)
    # Registered through the agent API (agent-local) rather than the catalog.
    agent_local = models.BooleanField(default=False)

    class Meta:
        ordering = ["node__name", "service_id"]
        constraints = [
            models.UniqueConstraint(fields=["node", "service_id"], name="uniq_service_per_node")
        ]

    def __str__(self) -> str:
        return f"{self.name}/{self.service_id}@{self.node_id}"


class Check(Indexed):
    """A node-level (no service) or service-level health check."""

    PASSING, WARNING, CRITICAL, MAINTENANCE = "passing", "warning", "critical", "maintenance"
    STATUSES = [PASSING, WARNING, CRITICAL]
    TYPES = ["http", "tcp", "ttl", "grpc", "alias", ""]

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="checks")
    check_id = models.CharField(max_length=256)
    name = models.CharField(max_length=256)
    status = models.CharField(max_length=16, default=CRITICAL)
    notes = models.TextField(blank=True, default="")
    output = models.TextField(blank=True, default="")
    service_id = models.CharField(max_length=256, blank=True, default="", db_index=True)
    service_name = models.CharField(max_length=256, blank=True, default="", db_index=True)
    service_tags = models.JSONField(default=list)
    type = models.CharField(max_length=16, blank=True, default="")
    # The check's definition in Consul's field names (HTTP, Method, Header, TCP,
    # GRPC, TTL, Interval, Timeout, TLSSkipVerify, ...) as sent by the client.
    definition = models.JSONField(default=dict)
    interval = models.FloatField(default=0)
    timeout = models.FloatField(default=0)
    ttl = models.FloatField(default=0)
    deregister_after = models.FloatField(default=0)
    next_run_at = models.DateTimeField(null=True, blank=True, db_index=True)
    ttl_expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    critical_since = models.DateTimeField(null=True, blank=True)
    agent_local = models.BooleanField(default=False)

    class Meta:
        ordering = ["node__name", "check_id"]
        constraints = [
            models.UniqueConstraint(fields=["node", "check_id"], name="uniq_check_per_node")
        ]
        # A health read fetches its instances' checks by node and service ID.
        indexes = [models.Index(fields=["node", "service_id"], name="check_node_service")]

    def __str__(self) -> str:
        return f"{self.check_id}@{self.node_id}={self.status}"
