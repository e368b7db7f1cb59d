"""Golden metrics at the control plane: rolling windows over what agents report.

Agents scrape their sidecars' `istio_*` metrics and report, every few seconds,
the counts that changed per (reporter, source service, destination service)
(`ReportTraffic` over the agent protocol). Each report is stored as rows of
`TrafficSample` in the database, so every `mesh server` process — SQLite or
PostgreSQL, one or several behind a balancer — answers the same windows from
the same rows; nothing is held in a process' memory.

The fine windows (1, 5, 15 and 60 minutes) are exact over the reports: a
window sums every sample that ended within it and nothing else
(`meshproto.golden.summarize` says how the rate is taken). Reports older than
the longest fine window (plus a margin) are rolled up, as new reports come
in, into one row per (reporter, source, destination, 5-minute bucket) that
sums them exactly (requests, failures, every histogram bucket) and then
deleted; the 24-hour window reads the fine rows plus those, so storage stays
bounded (at most 288 coarse rows per key) and its counts stay exact to the
5-minute bucket at its far edge. Coarse rows older than 24 hours are deleted.

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

from django.db import transaction

from meshproto.golden import (
    DURATION_BOUNDS_MS,
    FINE_WINDOWS_S,
    LONG_WINDOW_S,
    REPORTERS,
    ROLLUP_STEP_S,
    SERIES_STEP_S,
    WINDOWS_S,
    Counts,
    Sample,
    bucket_start,
    series,
    summarize,
)
from registry.errors import BadRequest, NotFound, PermissionDenied
from registry.models import ServiceInstance, TrafficSample

MAX_ENTRIES = 5000  # per report: sidecars x peers on one host
MAX_NAME = 256
MAX_INTERVAL_S = 3600  # one report's interval
RETAIN_S = max(FINE_WINDOWS_S) + 300  # fine rows, then rolled up
WINDOW_NAMES = {60: "1m", 300: "5m", 900: "15m", 3600: "1h", LONG_WINDOW_S: "24h"}
WINDOW_SECONDS = {name: s for s, name in WINDOW_NAMES.items()}
SERIES_WINDOWS = tuple(WINDOW_NAMES[w] for w in SERIES_STEP_S)


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
    if end - start > MAX_INTERVAL_S:
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
    roll_up(now)
    return len(entries)


def roll_up(now: float | None = None) -> int:
    """Fold fine rows older than the fine windows into 5-minute rows; drop
    coarse rows older than 24 hours. The number of fine rows folded.

    Exact: each fine row is added to exactly one coarse row (the bucket its
    end falls in) in the transaction that deletes it; rows another server is
    folding at the same moment are skipped (locked), never counted twice."""
    now = time.time() if now is None else now
    folded = 0
    with transaction.atomic():
        old = list(
            TrafficSample.objects.select_for_update(skip_locked=True).filter(
                step=0, end__lt=now - RETAIN_S
            )[:MAX_ENTRIES]
        )
        if old:
            sums: dict[tuple[str, str, str, float], Counts] = defaultdict(Counts)
            for row in old:
                key = (
                    row.reporter,
                    row.source,
                    row.destination,
                    bucket_start(row.end, ROLLUP_STEP_S),
                )
                sums[key].add(Counts(row.requests, row.failures, list(row.buckets)))
            existing = {
                (r.reporter, r.source, r.destination, r.start): r
                for r in TrafficSample.objects.select_for_update().filter(
                    step=ROLLUP_STEP_S, start__in={k[3] for k in sums}
                )
            }
            for key, counts in sums.items():
                row = existing.get(key)
                if row is None:
                    TrafficSample.objects.create(
                        node="",
                        reporter=key[0],
                        source=key[1],
                        destination=key[2],
                        start=key[3],
                        end=key[3] + ROLLUP_STEP_S,
                        requests=counts.requests,
                        failures=counts.failures,
                        buckets=counts.buckets,
                        step=ROLLUP_STEP_S,
                    )
                else:
                    merged = Counts(row.requests, row.failures, list(row.buckets))
                    merged.add(counts)
                    row.requests, row.failures = merged.requests, merged.failures
                    row.buckets = merged.buckets
                    row.save(update_fields=["requests", "failures", "buckets"])
            TrafficSample.objects.filter(pk__in=[r.pk for r in old]).delete()
            folded = len(old)
        TrafficSample.objects.filter(
            step=ROLLUP_STEP_S, end__lt=now - LONG_WINDOW_S - ROLLUP_STEP_S
        ).delete()
    return folded


def window_seconds(name: str) -> tuple[int, ...]:
    """The windows a `?window=` asks for: every one for "", else the one named."""
    if not name:
        return WINDOWS_S
    if name not in WINDOW_SECONDS:
        raise BadRequest(f"window must be one of {', '.join(WINDOW_SECONDS)} (got {name!r})")
    return (WINDOW_SECONDS[name],)


def _rows(query, windows: tuple[int, ...], now: float):
    """The rows the windows need: fine ones for short windows, coarse ones too for 24 h."""
    longest = max(windows)
    query = query.filter(end__gt=now - longest)
    return query if longest > max(FINE_WINDOWS_S) else query.filter(step=0)


def _sample(row: TrafficSample) -> Sample:
    return Sample(row.start, row.end, Counts(row.requests, row.failures, list(row.buckets)))


def _windows(samples: list[Sample], now: float, windows: tuple[int, ...] = WINDOWS_S) -> dict:
    return {WINDOW_NAMES[w]: summarize(samples, now, w) for w in windows}


def service_metrics(name: str, *, window: str = "", now: float | None = None) -> dict:
    """Requests per second, success rate and p50/p95/p99 of one service over
    1, 5, 15 and 60 minutes and 24 hours (or the one `window`), as its sidecars
    answered them; 404 for a service that is neither registered nor reported."""
    now = time.time() if now is None else now
    windows = window_seconds(window)
    rows = list(
        _rows(TrafficSample.objects.filter(reporter="destination", destination=name), windows, now)
    )
    if not rows and not ServiceInstance.objects.filter(name=name).exists():
        raise NotFound(f"service {name!r} is neither registered nor reported")
    by_source: dict[str, list[Sample]] = defaultdict(list)
    for row in rows:
        by_source[row.source].append(_sample(row))
    return {
        "service": name,
        "reporter": "destination",
        "windows": _windows([s for group in by_source.values() for s in group], now, windows),
        "sources": [
            {"source": src, "windows": _windows(group, now, windows)}
            for src, group in sorted(by_source.items())
        ],
    }


def service_series(name: str, *, window: str = "1h", now: float | None = None) -> dict:
    """One service's golden metrics over time, for a chart: a point per step
    (30 s over 15 minutes, 1 minute over an hour, 5 minutes over 24 hours)."""
    now = time.time() if now is None else now
    if window not in SERIES_WINDOWS:
        raise BadRequest(f"window must be one of {', '.join(SERIES_WINDOWS)} (got {window!r})")
    seconds = WINDOW_SECONDS[window]
    query = TrafficSample.objects.filter(reporter="destination", destination=name)
    rows = list(_rows(query, (seconds,), now))
    if not rows and not ServiceInstance.objects.filter(name=name).exists():
        raise NotFound(f"service {name!r} is neither registered nor reported")
    step = SERIES_STEP_S[seconds]
    return {
        "service": name,
        "window": window,
        "step_s": step,
        "points": series([_sample(r) for r in rows], now, seconds, step),
    }


def services_metrics(
    readable: Callable[[str], bool], *, window: str = "", now: float | None = None
) -> list[dict]:
    """Every reported service the caller may read, with its windows, by name."""
    now = time.time() if now is None else now
    windows = window_seconds(window)
    grouped: dict[str, list[Sample]] = defaultdict(list)
    for row in _rows(TrafficSample.objects.filter(reporter="destination"), windows, now):
        grouped[row.destination].append(_sample(row))
    return [
        {"service": name, "windows": _windows(group, now, windows)}
        for name, group in sorted(grouped.items())
        if readable(name)
    ]


def edges_metrics(
    readable: Callable[[str], bool],
    *,
    source: str = "",
    destination: str = "",
    window: str = "",
    now: float | None = None,
) -> list[dict]:
    """Each `source -> destination` edge the callers' sidecars reported, with
    its windows (or the one `window`); only edges whose both ends the caller may read."""
    now = time.time() if now is None else now
    windows = window_seconds(window)
    q = _rows(TrafficSample.objects.filter(reporter="source"), windows, now)
    if source:
        q = q.filter(source=source)
    if destination:
        q = q.filter(destination=destination)
    grouped: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for row in q:
        grouped[(row.source, row.destination)].append(_sample(row))
    return [
        {"source": src, "destination": dst, "windows": _windows(group, now, windows)}
        for (src, dst), group in sorted(grouped.items())
        if readable(src) and readable(dst)
    ]
