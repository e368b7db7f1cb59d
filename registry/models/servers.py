"""The `mesh server` processes sharing this database (`/v1/status/peers`, `/v1/operator/...`)."""

from django.db import models


class ServerProcess(models.Model):
    """One running server process, kept alive by its heartbeat; removed when it stops.

    Describes processes, not registry state: snapshots leave it out.
    """

    id = models.CharField(max_length=36, primary_key=True)
    node = models.CharField(max_length=128)
    datacenter = models.CharField(max_length=128)
    http_addr = models.CharField(max_length=300)
    grpc_addr = models.CharField(max_length=300, blank=True, default="")
    hostname = models.CharField(max_length=255)
    pid = models.IntegerField()
    version = models.CharField(max_length=64)
    started_at = models.DateTimeField()
    last_seen_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.http_addr} ({self.hostname}:{self.pid})"
