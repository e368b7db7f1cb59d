"""The agent's half of golden metrics: scrape the sidecars, report what changed.

Every `-traffic-report-interval` the agent reads each sidecar's Prometheus
text (the same scrape its own `/metrics` merges), folds the `istio_*` request
families into counts per (reporter, source, destination)
(`meshproto.golden.istio_counts`), subtracts the previous scrape of that
sidecar (`golden.delta`: a restarted sidecar counts from zero) and sends the
sum over its sidecars to the control plane (`ReportTraffic`, authenticated as
the node by its certificate, like every other agent call).

Nothing is lost to a short outage: counts that could not be sent stay pending
and go with the next report, whose interval then starts where the last sent
one ended. Pending counts older than an hour are dropped (the longest window).
"""

from __future__ import annotations

import time

from meshproto.golden import Counts, Key, delta, istio_counts
from meshproto.proto import mesh_pb2

MAX_PENDING_S = 3600.0


class TrafficReporter:
    """Per-sidecar last scrapes and the counts not yet reported."""

    def __init__(self) -> None:
        self.last: dict[str, dict[Key, Counts]] = {}  # proxy ID -> its last scrape
        self.pending: dict[Key, Counts] = {}
        self.start: float | None = None  # where the pending interval begins
        self.reported = 0  # entries accepted by the control plane so far

    def collect(
        self,
        scrapes: dict[str, str],
        now: float | None = None,
        adopted: frozenset[str] = frozenset(),
    ) -> None:
        """Fold one scrape of every sidecar (proxy ID -> Prometheus text) into the pending counts.

        The first scrape of an `adopted` sidecar (one a previous agent started,
        and reported on) is only a baseline: its counters since it started were
        reported already."""
        now = time.time() if now is None else now
        if self.start is None:
            self.start = now
        elif now - self.start > MAX_PENDING_S:
            self.start, self.pending = now, {}  # an outage longer than the longest window
        for proxy_id in set(self.last) - set(scrapes):
            del self.last[proxy_id]  # gone (or not answering): a later scrape starts over
        for proxy_id, text in scrapes.items():
            try:
                current = istio_counts(text)
            except ValueError:
                continue  # a garbled scrape: skip it, the next one catches up
            if proxy_id not in self.last and proxy_id in adopted:
                self.last[proxy_id] = current
                continue
            for key, counts in delta(current, self.last.get(proxy_id, {})).items():
                self.pending.setdefault(key, Counts()).add(counts)
            self.last[proxy_id] = current

    def report(self, now: float | None = None) -> mesh_pb2.TrafficReport | None:
        """The report of what is pending, up to `now`; None when nothing is."""
        now = time.time() if now is None else now
        if not self.pending or self.start is None or now <= self.start:
            return None
        return mesh_pb2.TrafficReport(
            start_unix=self.start,
            end_unix=now,
            counts=[
                mesh_pb2.TrafficCounts(
                    reporter=reporter,
                    source=source,
                    destination=destination,
                    requests=c.requests,
                    failures=c.failures,
                    latency_buckets=c.buckets,
                )
                for (reporter, source, destination), c in sorted(self.pending.items())
            ],
        )

    def sent(self, report: mesh_pb2.TrafficReport, accepted: int) -> None:
        """The report was stored (or refused for good): its counts are no longer pending."""
        self.pending = {}
        self.start = report.end_unix
        self.reported += accepted

    def idle(self, now: float | None = None) -> None:
        """Nothing to report: the next interval starts now."""
        if not self.pending:
            self.start = time.time() if now is None else now
