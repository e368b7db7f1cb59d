"""Request metrics under Istio's standard names and labels, and meshweb's own
request counters, rendered as Prometheus text.

Istio's names and labels (`istio_requests_total{reporter, source_workload,
destination_service_name, response_code, ...}`) let existing dashboards and
PromQL run unchanged against the sidecar's `/metrics`. Counting is exact: every
finished request adds one to exactly one series, synchronously, on the event
loop that served it; nothing is sampled or dropped.

One series per distinct label set; its label text is built once, when the set
is first seen, so a request costs a tuple, a dict lookup and a few adds.
"""

from __future__ import annotations

from bisect import bisect_left

from agents.proxy.observe import RequestRecord
from meshproto.golden import BYTES_BOUNDS, DURATION_BOUNDS_MS, le_label

# Envoy response flags that meshweb also counts as events of their own.
FLAG_COUNTERS = {
    "UO": "mesh_circuit_breaker_overflows_total",
    "RL": "mesh_rate_limited_requests_total",
}

_LABEL_NAMES = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_canonical_service",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Series:
    __slots__ = ("labels", "count", "dur", "dur_sum", "req", "req_sum", "resp", "resp_sum")

    def __init__(self, labels: str) -> None:
        self.labels = labels  # 'a="x",b="y"' without braces
        self.count = 0
        self.dur = [0] * (len(DURATION_BOUNDS_MS) + 1)  # non-cumulative
        self.dur_sum = 0.0
        self.req = [0] * (len(BYTES_BOUNDS) + 1)
        self.req_sum = 0
        self.resp = [0] * (len(BYTES_BOUNDS) + 1)
        self.resp_sum = 0


class RequestMetrics:
    """The sidecar's per-request counters (see the module docstring)."""

    def __init__(self, namespace: str = "default") -> None:
        self.namespace = namespace
        self.series: dict[tuple, _Series] = {}
        self.retries: dict[tuple[str, str, str], int] = {}  # (reporter, src, dst)
        self.flagged: dict[tuple[str, str, str, str], int] = {}  # (name, reporter, src, dst)
        self.budget_exhausted: dict[tuple[str, str, str], int] = {}
        self.outlier_ejections: dict[tuple[str, str], int] = {}  # (destination, upstream)

    def record(self, r: RequestRecord) -> None:
        """Count one finished request."""
        key = (
            r.reporter,
            r.source_service,
            r.destination_service,
            r.protocol,
            r.status,
            r.grpc_status,
            r.response_flags,
            r.mtls,
        )
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = _Series(self._labels(r))
        s.count += 1
        ms = r.duration_s * 1000.0
        s.dur[bisect_left(DURATION_BOUNDS_MS, ms)] += 1
        s.dur_sum += ms
        s.req[bisect_left(BYTES_BOUNDS, r.request_bytes)] += 1
        s.req_sum += r.request_bytes
        s.resp[bisect_left(BYTES_BOUNDS, r.response_bytes)] += 1
        s.resp_sum += r.response_bytes
        edge = (r.reporter, r.source_service, r.destination_service)
        if r.retries:
            self.retries[edge] = self.retries.get(edge, 0) + r.retries
        if r.response_flags != "-":
            for flag in r.response_flags.split(","):
                name = FLAG_COUNTERS.get(flag)
                if name is not None:
                    k = (name, *edge)
                    self.flagged[k] = self.flagged.get(k, 0) + 1
        if r.extra and r.extra.get("retry_budget_exhausted"):
            self.budget_exhausted[edge] = self.budget_exhausted.get(edge, 0) + 1

    def outlier_ejected(self, destination: str, upstream: str) -> None:
        """An upstream instance was ejected by passive health checking."""
        k = (destination, upstream)
        self.outlier_ejections[k] = self.outlier_ejections.get(k, 0) + 1

    def _labels(self, r: RequestRecord) -> str:
        ns = self.namespace
        src = r.source_service or "unknown"
        dst = r.destination_service or "unknown"
        values = (
            r.reporter,
            src,
            ns,
            src,
            dst,
            ns,
            f"{dst}.{ns}.svc" if r.destination_service else "unknown",
            dst,
            ns,
            dst,
            r.protocol,
            str(r.status),
            r.grpc_status,
            r.response_flags or "-",
            "mutual_tls" if r.mtls else "none",
        )
        return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(_LABEL_NAMES, values, strict=True))

    def render(self) -> list[str]:
        """Prometheus text lines (0.0.4) of every family, HELP and TYPE included."""
        out: list[str] = []
        series = list(self.series.values())
        out += [
            "# HELP istio_requests_total Requests the sidecar finished, by source, destination and response.",
            "# TYPE istio_requests_total counter",
        ]
        out += [f"istio_requests_total{{{s.labels}}} {s.count}" for s in series]
        _histogram(
            out,
            "istio_request_duration_milliseconds",
            "Request durations (ms), from the request head to the end of the response.",
            series,
            DURATION_BOUNDS_MS,
            "dur",
        )
        _histogram(
            out, "istio_request_bytes", "Request body sizes (bytes).", series, BYTES_BOUNDS, "req"
        )
        _histogram(
            out,
            "istio_response_bytes",
            "Response body sizes (bytes).",
            series,
            BYTES_BOUNDS,
            "resp",
        )

        def edge_family(name: str, help_: str, counts: dict) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} counter")
            for (reporter, src, dst), n in sorted(counts.items()):
                out.append(
                    f'{name}{{reporter="{_escape(reporter)}",source_canonical_service="{_escape(src)}",'
                    f'destination_service_name="{_escape(dst)}"}} {n}'
                )

        edge_family(
            "mesh_request_retries_total", "Retries made (attempts after the first).", self.retries
        )
        edge_family(
            "mesh_retry_budget_exhausted_total",
            "Requests that could not be retried because the retry budget was spent.",
            self.budget_exhausted,
        )
        for name, help_ in (
            (
                "mesh_circuit_breaker_overflows_total",
                "Requests refused by a circuit breaker (response flag UO).",
            ),
            (
                "mesh_rate_limited_requests_total",
                "Requests refused by rate limiting (response flag RL).",
            ),
        ):
            edge_family(
                name,
                help_,
                {k[1:]: n for k, n in self.flagged.items() if k[0] == name},
            )
        out.append(
            "# HELP mesh_outlier_ejections_total Upstream instances ejected by passive health checking."
        )
        out.append("# TYPE mesh_outlier_ejections_total counter")
        for (dst, upstream), n in sorted(self.outlier_ejections.items()):
            out.append(
                f'mesh_outlier_ejections_total{{destination_service_name="{_escape(dst)}",'
                f'upstream="{_escape(upstream)}"}} {n}'
            )
        return out


def _histogram(
    out: list[str], name: str, help_: str, series: list[_Series], bounds: tuple, attr: str
) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} histogram")
    les = [le_label(b) for b in bounds]
    for s in series:
        buckets = getattr(s, attr)
        running = 0
        for le, n in zip(les, buckets, strict=False):
            running += n
            out.append(f'{name}_bucket{{{s.labels},le="{le}"}} {running}')
        out.append(f'{name}_bucket{{{s.labels},le="+Inf"}} {s.count}')
        total = getattr(s, attr + "_sum")
        shown = f"{total:.3f}" if isinstance(total, float) else str(total)
        out.append(f"{name}_sum{{{s.labels}}} {shown}")
        out.append(f"{name}_count{{{s.labels}}} {s.count}")
