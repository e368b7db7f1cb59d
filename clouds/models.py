"""Cloud accounts and their sync runs.

An account's credentials are stored only encrypted (`clouds.domain.accounts`,
the CA's Fernet key handling); every other field is plain configuration.
The lease fields (`lease_until`, `lease_run`) make one sync per account at a
time: a run claims the account with a conditional update, and a run whose
process died loses the claim when the lease runs out.
"""

from __future__ import annotations

from django.db import models


class CloudAccount(models.Model):
    """One cloud account (an AWS account in some regions) bound to one datacenter."""

    CREDENTIALS_ENVIRONMENT = "environment"
    CREDENTIALS_STORED = "stored"

    name = models.CharField(max_length=64, unique=True)
    provider = models.CharField(max_length=32)
    datacenter = models.CharField(max_length=128)
    regions = models.JSONField(default=list)
    endpoint_url = models.CharField(max_length=512, blank=True, default="")
    credentials_source = models.CharField(max_length=16, default=CREDENTIALS_ENVIRONMENT)
    # `fernet:<token>` of the JSON credentials; "" when they come from the environment.
    credentials_encrypted = models.TextField(blank=True, default="")
    # What to import: {"cloud_map": {"enabled": true, "namespaces": [...]}, "ec2": {...}}
    import_config = models.JSONField(default=dict)
    # What to export: {"namespace": "...", "create_namespace": false, "services": [...]}
    export_config = models.JSONField(default=dict)
    # The security group mesh gateways of this account's datacenter are in.
    gateway_security_group = models.CharField(max_length=64, blank=True, default="")
    interval_seconds = models.IntegerField(default=300)
    enabled = models.BooleanField(default=True)
    next_sync_at = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    lease_run = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    modified_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class SyncRun(models.Model):
    """One sync of an account: what it changed, how many API calls it took, what went wrong."""

    QUEUED, RUNNING, SUCCEEDED, FAILED, SKIPPED, ABANDONED = (
        "queued",
        "running",
        "succeeded",
        "failed",
        "skipped",  # another sync of the account held it
        "abandoned",  # its process died; found by the next run
    )

    account = models.ForeignKey(CloudAccount, on_delete=models.CASCADE, related_name="runs")
    trigger = models.CharField(max_length=16, default="demand")  # demand | schedule
    status = models.CharField(max_length=16, default=QUEUED)
    phase = models.CharField(max_length=32, blank=True, default="")
    queued_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created = models.IntegerField(default=0)
    updated = models.IntegerField(default=0)
    removed = models.IntegerField(default=0)
    exported_created = models.IntegerField(default=0)
    exported_updated = models.IntegerField(default=0)
    exported_removed = models.IntegerField(default=0)
    api_calls = models.IntegerField(default=0)
    retries = models.IntegerField(default=0)
    # Problems with single items (skipped, the rest applied) and the failure, if any:
    # [{"ref": "...", "message": "..."}]; notes: what went right the hard way (retries).
    errors = models.JSONField(default=list)
    notes = models.JSONField(default=list)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["account", "-id"])]
