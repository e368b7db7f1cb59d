"""Golden-metric samples: request counts the agents report for their sidecars."""

from django.db import models


class TrafficSample(models.Model):
    """What one node's sidecars counted for one (reporter, source, destination)
    over `[start, end]` (unix seconds): requests, failures and the duration
    histogram (`buckets`, non-cumulative, bounds in `meshproto.golden`).

    Not part of the catalog: no global index, no change topic. Rows older than
    the longest window are deleted as new reports arrive
    (`registry.domain.golden`)."""

    node = models.CharField(max_length=256)
    reporter = models.CharField(max_length=16)  # "source" | "destination"
    source = models.CharField(max_length=256)
    destination = models.CharField(max_length=256)
    start = models.FloatField()
    end = models.FloatField(db_index=True)
    requests = models.BigIntegerField(default=0)
    failures = models.BigIntegerField(default=0)
    buckets = models.JSONField(default=list)

    class Meta:
        indexes = [
            models.Index(fields=["reporter", "destination", "end"], name="traffic_dest_end"),
            models.Index(fields=["reporter", "source", "end"], name="traffic_src_end"),
        ]
