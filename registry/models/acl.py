"""ACL policies, roles and tokens."""

from django.db import models

from registry.models.base import Indexed

GLOBAL_MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"
ANONYMOUS_TOKEN_ACCESSOR = "00000000-0000-0000-0000-000000000002"


class ACLPolicy(Indexed):
    """Named rules (HCL or JSON, Consul's syntax) that tokens link to."""

    id = models.CharField(max_length=36, primary_key=True)
    name = models.CharField(max_length=128, unique=True)
    description = models.TextField(blank=True, default="")
    rules = models.TextField(blank=True, default="")
    datacenters = models.JSONField(default=list)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ACLRole(Indexed):
    """A named bundle of policies and identities that tokens link to (Consul's roles).

    `service_identities` is Consul's `[{"ServiceName": ..., "Datacenters": [...]}]`,
    `node_identities` its `[{"NodeName": ..., "Datacenter": ...}]`; each grants the
    templated rules Consul grants for it (see `registry.domain.acl`).
    """

    id = models.CharField(max_length=36, primary_key=True)
    name = models.CharField(max_length=256, unique=True)
    description = models.TextField(blank=True, default="")
    policies = models.ManyToManyField(ACLPolicy, related_name="roles", blank=True)
    service_identities = models.JSONField(default=list)
    node_identities = models.JSONField(default=list)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ACLToken(Indexed):
    """A token. Only a SHA-256 of its secret is stored: the secret is shown once."""

    accessor_id = models.CharField(max_length=36, primary_key=True)
    secret_hash = models.CharField(max_length=64, unique=True)
    description = models.TextField(blank=True, default="")
    policies = models.ManyToManyField(ACLPolicy, related_name="tokens", blank=True)
    roles = models.ManyToManyField(ACLRole, related_name="tokens", blank=True)
    local = models.BooleanField(default=False)
    create_time = models.DateTimeField(auto_now_add=True)
    expiration_time = models.DateTimeField(null=True, blank=True)
    # The Django user this token was minted for (UI sessions map to tokens).
    user = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.CASCADE, related_name="mesh_tokens"
    )

    class Meta:
        ordering = ["create_time"]

    def __str__(self) -> str:
        return self.accessor_id
