"""Connect: the cluster's trust domain, its CA roots, issued leaves, intentions
and config entries."""

from django.db import models

from registry.models.base import Indexed


class ClusterIdentity(models.Model):
    """One row (id=1): the cluster ID and trust domain, generated once."""

    cluster_id = models.CharField(max_length=36)
    trust_domain = models.CharField(max_length=253)
    created_at = models.DateTimeField(auto_now_add=True)


class CAConfig(Indexed):
    """One row (id=1): the CA provider's name and its configuration (Consul's
    `/v1/connect/ca/configuration` `Config` map: LeafCertTTL, PrivateKeyType, ...)."""

    provider = models.CharField(max_length=32, default="consul")
    config = models.JSONField(default=dict)
    force_without_cross_signing = models.BooleanField(default=False)


class CARoot(Indexed):
    """A root CA certificate. Its private key is stored only encrypted.

    The active root signs new leaves; after a rotation the previous root stays
    in the trust bundle (cross-signed by its successor's chain) until the last
    leaf it signed has expired (`retire_after`), then it is removed.
    """

    id = models.CharField(max_length=128, primary_key=True)  # SHA-1 fingerprint, colon hex
    name = models.CharField(max_length=256)
    serial_number = models.CharField(max_length=64)
    signing_key_id = models.CharField(max_length=128)
    root_cert = models.TextField()
    # Certificates a client trusting only this root's predecessor/successor needs.
    intermediate_certs = models.JSONField(default=list)
    private_key_encrypted = models.TextField()
    private_key_type = models.CharField(max_length=8, default="ec")
    private_key_bits = models.IntegerField(default=256)
    active = models.BooleanField(default=False, db_index=True)
    not_before = models.DateTimeField()
    not_after = models.DateTimeField()
    rotated_out_at = models.DateTimeField(null=True, blank=True)
    retire_after = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["create_index"]

    def __str__(self) -> str:
        return self.name


class IssuedCert(models.Model):
    """A leaf the CA signed (the certificate itself is the holder's)."""

    serial = models.CharField(max_length=64, unique=True)
    spiffe_id = models.CharField(max_length=1024)
    kind = models.CharField(max_length=16, default="service")  # service | agent
    name = models.CharField(max_length=256, db_index=True)  # service or node name
    root = models.ForeignKey(CARoot, null=True, on_delete=models.SET_NULL, related_name="leaves")
    not_after = models.DateTimeField(db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)


class Intention(Indexed):
    """`source -> destination: allow | deny`, or L7 `permissions` for HTTP services."""

    id = models.CharField(max_length=36, primary_key=True)
    source_ns = models.CharField(max_length=128, default="default")
    source_name = models.CharField(max_length=256)
    source_type = models.CharField(max_length=16, default="consul")
    # A source in a peered cluster (`SourcePeer`): its name there, "" for ours.
    source_peer = models.CharField(max_length=63, blank=True, default="")
    destination_ns = models.CharField(max_length=128, default="default")
    destination_name = models.CharField(max_length=256, db_index=True)
    action = models.CharField(max_length=8, blank=True, default="")  # allow | deny | "" (L7)
    permissions = models.JSONField(default=list)
    description = models.TextField(blank=True, default="")
    meta = models.JSONField(default=dict)
    precedence = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-precedence", "source_ns", "source_name", "destination_ns", "destination_name"]
        constraints = [
            models.UniqueConstraint(
                fields=[
                    "source_peer",
                    "source_ns",
                    "source_name",
                    "destination_ns",
                    "destination_name",
                ],
                name="uniq_intention_pair_peer",
            )
        ]

    def __str__(self) -> str:
        return f"{self.source_name} => {self.destination_name} ({self.action or 'L7'})"


class ConfigEntry(Indexed):
    """A Consul config entry (`service-defaults`, `service-router`, ...), stored
    as validated, canonical JSON (Consul's field names)."""

    kind = models.CharField(max_length=64)
    name = models.CharField(max_length=256)
    namespace = models.CharField(max_length=128, default="default")
    data = models.JSONField(default=dict)

    class Meta:
        ordering = ["kind", "name"]
        constraints = [models.UniqueConstraint(fields=["kind", "name"], name="uniq_config_entry")]

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"
