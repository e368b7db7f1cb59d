"""Golden-metric samples: request counts the agents report for their sidecars."""

from django.db import models


class TrafficSample(models.Model):
    """What one node's sidecars counted for one (reporter, source, destination)
    over `[start, end]` (unix seconds): requests, failures and the duration
    histogram (`buckets`, non-cumulative, bounds in `meshproto.golden`).

    Not part of the catalog: no global index, no change topic. Reports older
    than the fine windows are rolled up into 5-minute rows as new reports
    arrive, and those are deleted after 24 hours (`registry.domain.golden`)."""

    node = models.CharField(max_length=256)
    reporter = models.CharField(max_length=16)  # "source" | "destination"
    source = models.CharField(max_length=256)
    destination = models.CharField(max_length=256)
    start = models.FloatField()
    end = models.FloatField(db_index=True)
    requests = models.BigIntegerField(default=0)
    failures = models.BigIntegerField(default=0)
    buckets = models.JSONField(default=list)
    # 0: a report as it came (kept for the fine windows); otherwise the width in
    # seconds of a rolled-up row summing every fine sample that ended in
    # `[start, end)` (node ""), kept for the 24-hour window.
    step = models.IntegerField(default=0)

    class Meta:
        indexes = [
            models.Index(fields=["reporter", "destination", "end"], name="traffic_dest_end"),
            models.Index(fields=["reporter", "source", "end"], name="traffic_src_end"),
        ]
