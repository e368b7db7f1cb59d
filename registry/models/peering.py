"""Cluster peerings with other control planes and the services they export to us."""

from django.db import models

from registry.models.base import Indexed


class Peering(Indexed):
    """One peering, named locally (`PeerName`), as either side sees it.

    The acceptor's row starts PENDING with a token's establishment secret
    (hashed) and expiry; the dialer's starts when it establishes. Once both
    sides have exchanged trust bundles the row is ACTIVE and holds the
    peer's trust domain, CA roots and server addresses, the hash of the
    secret the peer pulls our exports with, and (encrypted) the secret we
    pull the peer's exports with. A peer that deletes the peering makes ours
    TERMINATED: its imports and trust are gone, the row stays until deleted.
    """

    PENDING, ESTABLISHING, ACTIVE, FAILING, TERMINATED = (
        "PENDING",
        "ESTABLISHING",
        "ACTIVE",
        "FAILING",
        "TERMINATED",
    )

    id = models.CharField(max_length=36, primary_key=True)
    name = models.CharField(max_length=63, unique=True)
    state = models.CharField(max_length=16, default=PENDING)
    dialer = models.BooleanField(default=False)  # True: we established with their token
    meta = models.JSONField(default=dict, blank=True)
    peer_id = models.CharField(max_length=36, blank=True, default="")
    peer_trust_domain = models.CharField(max_length=253, blank=True, default="")
    peer_datacenter = models.CharField(max_length=128, blank=True, default="")
    peer_server_addresses = models.JSONField(default=list, blank=True)
    peer_ca_pems = models.JSONField(default=list, blank=True)
    # Acceptor: the token's establishment secret (SHA-256), expiry and use.
    token_secret_hash = models.CharField(max_length=64, blank=True, default="")
    token_expires_at = models.DateTimeField(null=True, blank=True)
    token_used_at = models.DateTimeField(null=True, blank=True)
    # The secret the peer presents to pull our exports (SHA-256) ...
    inbound_secret_hash = models.CharField(max_length=64, blank=True, default="", db_index=True)
    # ... and the one we present to pull theirs (encrypted at rest).
    outbound_secret_encrypted = models.TextField(blank=True, default="")
    last_receive = models.DateTimeField(null=True, blank=True)
    last_send = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"


class ImportedService(Indexed):
    """A service a peer exports to us: its healthy instances as the peer's
    health API shows them, and how our sidecars reach it (its SPIFFE ID, SNI,
    the peer's mesh gateways, or its sidecars when it has no gateway)."""

    peering = models.ForeignKey(Peering, on_delete=models.CASCADE, related_name="imports")
    name = models.CharField(max_length=256)
    instances = models.JSONField(default=list)  # /v1/health/service entries
    connect = models.JSONField(default=dict)  # SpiffeID, SNI, Protocol, Gateways, Endpoints

    class Meta:
        ordering = ["peering__name", "name"]
        constraints = [
            models.UniqueConstraint(fields=["peering", "name"], name="uniq_import_per_peering")
        ]

    def __str__(self) -> str:
        return f"{self.name}@{self.peering_id}"
