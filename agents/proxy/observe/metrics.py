"""Request metrics under Istio's standard names and labels, rendered as
Prometheus text. (meshweb's own counters of retries, budget exhaustion,
breaker overflows, ejections and rate limiting are events of the HTTP path,
counted where they happen: `agents.proxy.metrics`.)

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


class _TcpSeries:
    __slots__ = ("labels", "opened", "closed", "received", "sent")

    def __init__(self, labels: str) -> None:
        self.labels = labels
        self.opened = 0
        self.closed = 0
        self.received = 0  # bytes from the calling side, of closed connections
        self.sent = 0  # bytes back to the calling side, of closed connections


class TcpMetrics:
    """`istio_tcp_*` for L4 connections, by reporter, source and destination.

    A connection's bytes are folded in when it closes; a scrape adds the open
    connections' live counters (`render(live)`), so bytes are exact at any time."""

    def __init__(self, namespace: str = "default") -> None:
        self.namespace = namespace
        self.series: dict[tuple[str, str, str], _TcpSeries] = {}

    def opened(self, reporter: str, source: str, destination: str) -> _TcpSeries:
        key = (reporter, source, destination)
        s = self.series.get(key)
        if s is None:
            ns = self.namespace
            src, dst = source or "unknown", destination or "unknown"
            values = (reporter, src, ns, src, dst, ns, f"{dst}.{ns}.svc", dst, ns, dst)
            names = _LABEL_NAMES[:10]
            labels = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
            s = self.series[key] = _TcpSeries(
                labels + ',request_protocol="tcp",connection_security_policy="mutual_tls"'
            )
        s.opened += 1
        return s

    def closed(self, series: _TcpSeries, received: int, sent: int) -> None:
        series.closed += 1
        series.received += received
        series.sent += sent

    def render(self, live: list[tuple[_TcpSeries, int, int]]) -> list[str]:
        received = {id(s): s.received for s in self.series.values()}
        sent = {id(s): s.sent for s in self.series.values()}
        for s, rx, tx in live:
            if id(s) in received:
                received[id(s)] += rx
                sent[id(s)] += tx
        out: list[str] = []
        for name, help_, value in (
            ("istio_tcp_connections_opened_total", "L4 connections opened.", lambda s: s.opened),
            ("istio_tcp_connections_closed_total", "L4 connections closed.", lambda s: s.closed),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received from the calling side of L4 connections.",
                lambda s: received[id(s)],
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent back to the calling side of L4 connections.",
                lambda s: sent[id(s)],
            ),
        ):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} counter")
            out += [f"{name}{{{s.labels}}} {value(s)}" for s in self.series.values()]
        return out
