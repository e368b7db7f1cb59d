"""Golden metrics: the shared shape of request counts, from a sidecar's
histogram to the control plane's rolling windows.

Three parts of the mesh meet here and nowhere else:
- the sidecar renders `istio_request_duration_milliseconds` with the bucket
  bounds `DURATION_BOUNDS_MS` (finer than Istio's defaults below 50 ms, so a
  p50 of a fast service is not a guess across a 1-5 ms bucket);
- the agent parses its sidecars' Prometheus text (`parse_exposition`), folds it
  into one `Counts` per (reporter, source, destination) key (`istio_counts`)
  and reports what changed since its last scrape (`delta`);
- the control plane sums the reported counts over a window and answers rate,
  success rate and latency quantiles (`summarize`, `quantile`).

Pure functions on plain data: no I/O, no Django.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# Upper bounds (ms) of the duration histogram's buckets; +Inf is implied.
DURATION_BOUNDS_MS: tuple[float, ...] = (
    0.5,
    1,
    2,
    3,
    4,
    5,
    10,
    20,
    30,
    40,
    50,
    100,
    200,
    300,
    400,
    500,
    1000,
    2000,
    3000,
    4000,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
# Request/response size buckets (bytes), Istio's: powers of ten up to 1 GB.
BYTES_BOUNDS: tuple[float, ...] = tuple(float(10**i) for i in range(10))

# Windows read from the fine samples (1, 5, 15 and 60 minutes) and the long one
# (24 hours) read from them plus the coarse rows older samples are rolled up into.
FINE_WINDOWS_S: tuple[int, ...] = (60, 300, 900, 3600)
LONG_WINDOW_S = 86400
WINDOWS_S: tuple[int, ...] = (*FINE_WINDOWS_S, LONG_WINDOW_S)
ROLLUP_STEP_S = 300  # fine samples older than the fine windows become 5-minute rows
# The step of a chart's series over a window: about 30 to 300 points.
SERIES_STEP_S: dict[int, int] = {900: 30, 3600: 60, LONG_WINDOW_S: ROLLUP_STEP_S}
QUANTILES: tuple[float, ...] = (0.5, 0.95, 0.99)
REPORTERS = ("source", "destination")

Key = tuple[str, str, str]  # (reporter, source service, destination service)


@dataclass
class Counts:
    """Requests seen for one key: totals and the duration histogram.

    `buckets[i]` counts requests whose duration fell in bucket i, NOT
    cumulative: bucket i is (DURATION_BOUNDS_MS[i-1], DURATION_BOUNDS_MS[i]],
    the last one (index len(DURATION_BOUNDS_MS)) is above every bound.
    A failure is a request answered 5xx, not answered at all (status 0), or
    ended with a gRPC status other than OK.
    """

    requests: int = 0
    failures: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BOUNDS_MS) + 1))

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.failures += other.failures
        for i, n in enumerate(other.buckets):
            self.buckets[i] += n

    def is_empty(self) -> bool:
        return self.requests == 0 and self.failures == 0 and not any(self.buckets)


def is_failure(response_code: str, grpc_status: str = "") -> bool:
    """A 5xx, no response at all ("0"), or a gRPC status other than OK is a
    failure (as Linkerd classifies them); anything else succeeded."""
    return (
        response_code.startswith("5") or response_code in ("0", "") or grpc_status not in ("", "0")
    )


def bucket_index(duration_ms: float) -> int:
    """The (non-cumulative) bucket a duration falls in."""
    for i, bound in enumerate(DURATION_BOUNDS_MS):
        if duration_ms <= bound:
            return i
    return len(DURATION_BOUNDS_MS)


def quantile(q: float, buckets: list[int]) -> float | None:
    """The q-quantile (ms) of a non-cumulative histogram, interpolated linearly
    inside its bucket as Prometheus' `histogram_quantile` does; None when empty.
    A quantile in the +Inf bucket answers the highest finite bound."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i == len(DURATION_BOUNDS_MS):
                return DURATION_BOUNDS_MS[-1]
            lower = DURATION_BOUNDS_MS[i - 1] if i > 0 else 0.0
            upper = DURATION_BOUNDS_MS[i]
            return lower + (upper - lower) * max(0.0, rank - seen) / n
        seen += n
    return DURATION_BOUNDS_MS[-1]  # pragma: no cover - the loop always returns


# --- the sidecar's Prometheus text -------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


class ExpositionError(ValueError):
    """A Prometheus text line that cannot be read."""


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            raise ExpositionError(f"bad labels: {text[pos : pos + 60]!r}")
        labels[m.group(1)] = (
            m.group(2).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        )
        pos = m.end()
    return labels


def parse_exposition(
    text: str, families: Iterable[str] | None = None
) -> list[tuple[str, dict[str, str], float]]:
    """Samples `(name, labels, value)` of a Prometheus text exposition (0.0.4);
    with `families`, only samples whose name starts with one of them."""
    wanted = tuple(families) if families is not None else None
    out: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if wanted is not None and not line.startswith(wanted):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ExpositionError(f"bad sample line: {line[:80]!r}")
        try:
            value = float(m.group(4))
        except ValueError:
            raise ExpositionError(f"bad sample value: {line[:80]!r}") from None
        out.append((m.group(1), parse_labels(m.group(3) or ""), value))
    return out


def istio_counts(text: str) -> dict[Key, Counts]:
    """Fold a sidecar's `istio_requests_total` and duration histogram into one
    `Counts` per (reporter, source_canonical_service, destination_service_name)."""
    out: dict[Key, Counts] = {}
    bounds = {_le_text(b): i for i, b in enumerate(DURATION_BOUNDS_MS)}
    # Cumulative bucket counts per (key, the series' other labels).
    cumulative: dict[tuple[Key, tuple], list[float]] = {}
    for name, labels, value in parse_exposition(
        text, ("istio_requests_total", "istio_request_duration_milliseconds_bucket")
    ):
        key = (
            labels.get("reporter", ""),
            labels.get("source_canonical_service", ""),
            labels.get("destination_service_name", ""),
        )
        if name == "istio_requests_total":
            counts = out.setdefault(key, Counts())
            n = int(value)
            counts.requests += n
            if is_failure(labels.get("response_code", ""), labels.get("grpc_response_status", "")):
                counts.failures += n
        elif name == "istio_request_duration_milliseconds_bucket":
            le = labels.pop("le", "")
            series = (key, tuple(sorted(labels.items())))
            row = cumulative.setdefault(series, [0.0] * (len(DURATION_BOUNDS_MS) + 1))
            if le == "+Inf":
                row[-1] = value
            elif le in bounds:
                row[bounds[le]] = value
    for (key, _), row in cumulative.items():
        counts = out.setdefault(key, Counts())
        previous = 0.0
        for i, c in enumerate(row):
            counts.buckets[i] += int(c - previous)
            previous = c
    return out


def _le_text(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else repr(bound)


def le_label(bound: float) -> str:
    """How a bucket bound is written in the `le` label (the same text both ways)."""
    return _le_text(bound)


def delta(current: dict[Key, Counts], previous: dict[Key, Counts]) -> dict[Key, Counts]:
    """What changed between two scrapes of one sidecar; a counter that went down
    (the sidecar restarted) counts from zero, as Prometheus' `increase()` does."""
    out: dict[Key, Counts] = {}
    for key, now in current.items():
        before = previous.get(key)
        if before is None or now.requests < before.requests:
            d = Counts(now.requests, now.failures, list(now.buckets))
        else:
            d = Counts(
                now.requests - before.requests,
                max(0, now.failures - before.failures),
                [max(0, a - b) for a, b in zip(now.buckets, before.buckets, strict=True)],
            )
        if not d.is_empty():
            out[key] = d
    return out


# --- the control plane's windows ---------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """Counts one node reported for one key over [start, end] (unix seconds)."""

    start: float
    end: float
    counts: Counts


def summarize(samples: Iterable[Sample], now: float, window_s: int) -> dict:
    """Golden metrics of the samples that ended within the last `window_s`.

    The rate divides by the time the summed samples cover (from the earliest
    start to now), so a service seen for 2 minutes has its true rate in the
    60-minute window rather than one diluted by 58 empty minutes, and a rate
    falls as soon as reports stop carrying requests.
    """
    total = Counts()
    earliest = math.inf
    for s in samples:
        if s.end <= now - window_s or s.end > now + 60:
            continue
        total.add(s.counts)
        earliest = min(earliest, s.start)
    covered = now - earliest if total.requests else 0.0
    rps = total.requests / covered if covered > 0 else 0.0
    return {
        "window_s": window_s,
        "requests": total.requests,
        "failures": total.failures,
        "rps": round(rps, 3),
        "success_rate": (
            round((total.requests - total.failures) / total.requests, 6) if total.requests else None
        ),
        "latency_ms": {
            f"p{round(q * 100)}": (
                None if (v := quantile(q, total.buckets)) is None else round(v, 3)
            )
            for q in QUANTILES
        },
    }


def bucket_start(t: float, step_s: int) -> float:
    """The start of the `step_s`-wide bucket holding time `t` (aligned to the epoch)."""
    return math.floor(t / step_s) * step_s


def series(samples: Iterable[Sample], now: float, window_s: int, step_s: int) -> list[dict]:
    """A chart's points over the last `window_s`: one per `step_s` bucket that
    holds samples (by their end), oldest first, each with its requests,
    failures, requests per second over the step, success rate and latency.

    A rolled-up sample (`start` on a bucket boundary, `end - start == step_s`)
    lands in the bucket it starts: its samples all ended there."""
    buckets: dict[float, Counts] = {}
    for s in samples:
        if s.end <= now - window_s or s.end > now + 60:
            continue
        rolled = s.end - s.start == step_s and s.start == bucket_start(s.start, step_s)
        t = s.start if rolled else bucket_start(s.end, step_s)
        buckets.setdefault(t, Counts()).add(s.counts)
    points = []
    for t in sorted(buckets):
        c = buckets[t]
        points.append(
            {
                "t": t,
                "requests": c.requests,
                "failures": c.failures,
                "rps": round(c.requests / step_s, 3),
                "success_rate": (
                    round((c.requests - c.failures) / c.requests, 6) if c.requests else None
                ),
                "latency_ms": {
                    f"p{round(q * 100)}": (
                        None if (v := quantile(q, c.buckets)) is None else round(v, 3)
                    )
                    for q in QUANTILES
                },
            }
        )
    return points
