"""The audit log: who changed what, when, with the state before and after."""

from django.db import models


class AuditEntry(models.Model):
    """One write made through /v1, /api, the UI or the CLI. Append-only:
    rows cannot be updated or deleted through the model (only a retention
    reaper removes old rows, with a queryset delete)."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    index = models.BigIntegerField(db_index=True)
    actor = models.CharField(max_length=64, db_index=True)
    actor_name = models.CharField(max_length=256, blank=True, default="")
    via = models.CharField(max_length=16, default="v1")
    action = models.CharField(max_length=128, db_index=True)
    resource_type = models.CharField(max_length=64, db_index=True)
    resource_id = models.CharField(max_length=1024, blank=True, default="", db_index=True)
    method = models.CharField(max_length=8, blank=True, default="")
    path = models.CharField(max_length=2048, blank=True, default="")
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["-index", "-id"]

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValueError("audit entries are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValueError("audit entries are append-only")

    def __str__(self) -> str:
        return f"{self.index} {self.actor} {self.action} {self.resource_type}/{self.resource_id}"
