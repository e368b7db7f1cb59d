"""User events (`/v1/event`): a bounded buffer of recent events per datacenter."""

from django.db import models


class UserEvent(models.Model):
    """One fired event. `ltime` is the global index of the write that fired it
    (Consul's Lamport time), so events order and resume by it."""

    id = models.CharField(max_length=36, primary_key=True)
    datacenter = models.CharField(max_length=128)
    name = models.CharField(max_length=256)
    payload = models.BinaryField(null=True)
    node_filter = models.CharField(max_length=512, blank=True, default="")
    service_filter = models.CharField(max_length=512, blank=True, default="")
    tag_filter = models.CharField(max_length=512, blank=True, default="")
    ltime = models.BigIntegerField()

    class Meta:
        indexes = [models.Index(fields=["datacenter", "ltime"])]
        ordering = ["ltime"]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"
