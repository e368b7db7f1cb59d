"""The key/value store and the sessions that lock its keys."""

from django.db import models

from registry.models.base import Indexed


class Session(Indexed):
    """A Consul session: a lease tied to a node and its health checks.

    Invalidated when it is destroyed, its TTL lapses, its node goes or one of
    its checks goes critical; then its locks are released (or its keys deleted,
    with behavior=delete).
    """

    id = models.CharField(max_length=36, primary_key=True)
    name = models.CharField(max_length=256, blank=True, default="")
    node = models.ForeignKey("registry.Node", on_delete=models.CASCADE, related_name="sessions")
    node_checks = models.JSONField(default=list)
    service_checks = models.JSONField(default=list)
    lock_delay = models.BigIntegerField(default=15_000_000_000)  # nanoseconds, as Consul
    behavior = models.CharField(max_length=16, default="release")
    ttl = models.CharField(max_length=32, blank=True, default="")
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)

    def __str__(self) -> str:
        return self.id


class KVEntry(Indexed):
    """One key and its (binary) value."""

    key = models.CharField(max_length=2048, unique=True)
    flags = models.BigIntegerField(default=0)
    value = models.BinaryField(null=True)
    lock_index = models.BigIntegerField(default=0)
    session = models.ForeignKey(Session, null=True, on_delete=models.SET_NULL, related_name="locks")

    class Meta:
        ordering = ["key"]

    def __str__(self) -> str:
        return self.key
