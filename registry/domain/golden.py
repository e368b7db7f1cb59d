"""Golden metrics at the control plane: rolling windows over what agents report.

Agents scrape their sidecars' `istio_*` metrics and report, every few seconds,
the counts that changed per (reporter, source service, destination service)
(`ReportTraffic` over the agent protocol). Each report is stored as rows of
`TrafficSample` in the database, so every `mesh server` process — SQLite or
PostgreSQL, one or several behind a balancer — answers the same windows from
the same rows; nothing is held in a process' memory.

The windows (1, 5, 15 and 60 minutes) are exact over the reports: a window
sums every sample that ended within it and nothing else
(`meshproto.golden.summarize` says how the rate is taken). Rows older than the
longest window (plus a margin) are deleted as new reports come in.

Views:
- a service's golden metrics come from its own sidecars' inbound side
  (`reporter="destination"`): what the service answered, whoever called;
- an edge `source -> destination` comes from the caller's sidecar
  (`reporter="source"`): what the caller saw, retries and timeouts included.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshproto.golden import (
    DURATION_BOUNDS_MS,
    REPORTERS,
    WINDOWS_S,
    Counts,
    Sample,
    summarize,
)
from registry.errors import BadRequest, NotFound, PermissionDenied
from registry.models import ServiceInstance, TrafficSample

MAX_ENTRIES = 5000  # per report: sidecars x peers on one host
MAX_NAME = 256
RETAIN_S = max(WINDOWS_S) + 300
WINDOW_NAMES = {60: "1m", 300: "5m", 900: "15m", 3600: "1h"}


@dataclass(frozen=True)
class Reported:
    """One entry of a report, as the agent protocol carries it."""

    reporter: str
    source: str
    destination: str
    requests: int
    failures: int
    buckets: tuple[int, ...]


def record_report(
    node: str, start: float, end: float, entries: Iterable[Reported], *, now: float | None = None
) -> int:
    """Store one node's report; the number of entries stored.

    A node reports only for services it runs: the destination of an inbound
    (`destination`) entry, or the source of an outbound (`source`) one, must
    have an instance on the node — no node can forge another's traffic.
    """
    now = time.time() if now is None else now
    entries = list(entries)
    if not start < end:
        raise BadRequest("report: start must be before end")
    if end - start > max(WINDOWS_S):
        raise BadRequest("report: an interval may not exceed one hour")
    if end > now + 60:
        raise BadRequest("report: end is in the future")
    if len(entries) > MAX_ENTRIES:
        raise BadRequest(f"report: at most {MAX_ENTRIES} entries")
    width = len(DURATION_BOUNDS_MS) + 1
    for e in entries:
        if e.reporter not in REPORTERS:
            raise BadRequest(f"report: reporter must be one of {', '.join(REPORTERS)}")
        for label, name in (("source", e.source), ("destination", e.destination)):
            if not name or len(name) > MAX_NAME:
                raise BadRequest(f"report: {label} must be a service name of 1-{MAX_NAME} chars")
        if e.requests < 0 or not 0 <= e.failures <= e.requests:
            raise BadRequest("report: failures must be between 0 and requests")
        if len(e.buckets) != width or any(b < 0 for b in e.buckets):
            raise BadRequest(f"report: latency buckets must be {width} non-negative counts")
    own = set(ServiceInstance.objects.filter(node__name=node).values_list("name", flat=True))
    foreign = sorted(
        {
            (e.destination if e.reporter == "destination" else e.source)
            for e in entries
            if (e.destination if e.reporter == "destination" else e.source) not in own
        }
    )
    if foreign:
        raise PermissionDenied(
            f"Permission denied: node {node!r} runs no instance of {', '.join(foreign[:5])}"
        )
    TrafficSample.objects.bulk_create(
        TrafficSample(
            node=node,
            reporter=e.reporter,
            source=e.source,
            destination=e.destination,
            start=start,
            end=end,
            requests=e.requests,
            failures=e.failures,
            buckets=list(e.buckets),
        )
        for e in entries
        if e.requests or e.failures
    )
    TrafficSample.objects.filter(end__lt=now - RETAIN_S).delete()
    return len(entries)


def _sample(row: TrafficSample) -> Sample:
    return Sample(row.start, row.end, Counts(row.requests, row.failures, list(row.buckets)))


def _windows(samples: list[Sample], now: float) -> dict:
    return {WINDOW_NAMES[w]: summarize(samples, now, w) for w in WINDOWS_S}


def service_metrics(name: str, *, now: float | None = None) -> dict:
    """Requests per second, success rate and p50/p95/p99 of one service over
    1, 5, 15 and 60 minutes, as its sidecars answered them; 404 for a service
    that is neither registered nor reported."""
    now = time.time() if now is None else now
    rows = list(
        TrafficSample.objects.filter(
            reporter="destination", destination=name, end__gt=now - max(WINDOWS_S)
        )
    )
    if not rows and not ServiceInstance.objects.filter(name=name).exists():
        raise NotFound(f"service {name!r} is neither registered nor reported")
    by_source: dict[str, list[Sample]] = defaultdict(list)
    for row in rows:
        by_source[row.source].append(_sample(row))
    return {
        "service": name,
        "reporter": "destination",
        "windows": _windows([s for group in by_source.values() for s in group], now),
        "sources": [
            {"source": src, "windows": _windows(group, now)}
            for src, group in sorted(by_source.items())
        ],
    }


def services_metrics(readable: Callable[[str], bool], *, now: float | None = None) -> list[dict]:
    """Every reported service the caller may read, with its windows, by name."""
    now = time.time() if now is None else now
    grouped: dict[str, list[Sample]] = defaultdict(list)
    for row in TrafficSample.objects.filter(reporter="destination", end__gt=now - max(WINDOWS_S)):
        grouped[row.destination].append(_sample(row))
    return [
        {"service": name, "windows": _windows(group, now)}
        for name, group in sorted(grouped.items())
        if readable(name)
    ]


def edges_metrics(
    readable: Callable[[str], bool],
    *,
    source: str = "",
    destination: str = "",
    now: float | None = None,
) -> list[dict]:
    """Each `source -> destination` edge the callers' sidecars reported, with
    its windows; only edges whose both ends the caller may read."""
    now = time.time() if now is None else now
    q = TrafficSample.objects.filter(reporter="source", end__gt=now - max(WINDOWS_S))
    if source:
        q = q.filter(source=source)
    if destination:
        q = q.filter(destination=destination)
    grouped: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for row in q:
        grouped[(row.source, row.destination)].append(_sample(row))
    return [
        {"source": src, "destination": dst, "windows": _windows(group, now)}
        for (src, dst), group in sorted(grouped.items())
        if readable(src) and readable(dst)
    ]
