"""The sidecar's real observer: metrics, W3C trace context (+ OTLP spans) and
access logs for every request the HTTP path reports (`agents.proxy.observe`).

`begin` does the little that must happen before the request goes upstream:
read the caller's trace context and choose this hop's span, so that
`upstream_headers()` carries it on every attempt. `finish` does the rest once
the response is over: count it, log it, export its span when sampled.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agents.proxy.observe import Headers, RequestRecord
from agents.proxy.observe.accesslog import AccessLog, access_line
from agents.proxy.observe.metrics import RequestMetrics, TcpMetrics
from agents.proxy.observe.tracing import (
    SpanExporter,
    TraceParent,
    clean_tracestate,
    format_traceparent,
    new_id,
    parse_traceparent,
    sampled_by_ratio,
)

# Exporting a span costs the sidecar far more than counting the request (the
# SDK builds, checks and batches it): 1 % of new traces by default, as Istio.
DEFAULT_SAMPLE_RATIO = 0.01


@dataclass(frozen=True)
class ObserveOptions:
    """How a sidecar observes its requests (flags of `mesh-sidecar`, with the
    OpenTelemetry environment variables as defaults)."""

    otlp_endpoint: str = ""  # "" : no span export (trace context still propagates)
    sample_ratio: float = DEFAULT_SAMPLE_RATIO
    access_log: str = ""  # file path; "" : no access log
    access_log_max_bytes: int = 50 * 1024 * 1024
    access_log_keep: int = 5
    namespace: str = "default"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"trace sample ratio must be within 0..1, got {self.sample_ratio}")
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"OTLP endpoint must be an http(s) URL, got {self.otlp_endpoint!r}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ObserveOptions:
        """Defaults from the standard OpenTelemetry variables
        (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`,
        `OTEL_TRACES_SAMPLER_ARG`) and `MESH_ACCESS_LOG`."""
        env = os.environ if env is None else env
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT", ""
        )
        raw = env.get("OTEL_TRACES_SAMPLER_ARG", "")
        try:
            ratio = float(raw) if raw else DEFAULT_SAMPLE_RATIO
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a number, got {raw!r}") from None
        return cls(
            otlp_endpoint=endpoint, sample_ratio=ratio, access_log=env.get("MESH_ACCESS_LOG", "")
        )


class Span:
    """One request's trace context in this sidecar (a `RequestSpan`)."""

    __slots__ = ("observer", "parent", "trace_id", "span_id", "sampled", "tracestate", "_headers")

    def __init__(
        self,
        observer: MeshObserver,
        parent: TraceParent | None,
        trace_id: int,
        span_id: int,
        sampled: bool,
        tracestate: bytes,
    ) -> None:
        self.observer = observer
        self.parent = parent
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled
        self.tracestate = tracestate
        self._headers: Headers | None = None

    def upstream_headers(self) -> Headers:
        if self._headers is None:
            h = [(b"traceparent", format_traceparent(self.trace_id, self.span_id, self.sampled))]
            if self.tracestate:
                h.append((b"tracestate", self.tracestate))
            self._headers = h
        return self._headers

    def finish(self, record: RequestRecord) -> None:
        self.observer.finished(self, record)


class MeshObserver:
    """Counts, logs and traces every request (see the module docstring)."""

    def __init__(self, options: ObserveOptions) -> None:
        self.options = options
        self.metrics = RequestMetrics(options.namespace)
        self.tcp = TcpMetrics(options.namespace)
        self.exporter = (
            SpanExporter(options.otlp_endpoint, options.sample_ratio)
            if options.otlp_endpoint
            else None
        )
        self.access_log = (
            AccessLog(
                options.access_log,
                max_bytes=options.access_log_max_bytes,
                keep=options.access_log_keep,
            )
            if options.access_log
            else None
        )
        self.ratio = options.sample_ratio

    def begin(self, reporter: str, headers: Headers) -> Span:
        traceparent = None
        states: list[bytes] = []
        for name, value in headers:
            if name == b"traceparent":
                traceparent = value if traceparent is None else b"!"  # two: invalid
            elif name == b"tracestate":
                states.append(value)
        parent = parse_traceparent(traceparent) if traceparent is not None else None
        if parent is not None:
            return Span(
                self,
                parent,
                parent.trace_id,
                new_id(64),
                parent.sampled,
                clean_tracestate(states) if states else b"",
            )
        trace_id = new_id(128)
        return Span(self, None, trace_id, new_id(64), sampled_by_ratio(trace_id, self.ratio), b"")

    def finished(self, span: Span, r: RequestRecord) -> None:
        self.metrics.record(r)
        if self.access_log is not None:
            self.access_log.write_line(access_line(r, f"{span.trace_id:032x}"))
        if span.sampled and self.exporter is not None:
            server = r.reporter == "destination"
            start_ns = int(r.started * 1e9)
            attributes = {
                "http.request.method": r.method,
                "url.path": r.path.split("?", 1)[0],
                "url.scheme": "http",
                "server.address": r.authority,
                "http.response.status_code": r.status,
                "network.protocol.name": "http",
                "network.protocol.version": "2" if r.protocol in ("http2", "grpc") else "1.1",
                "http.request.body.size": r.request_bytes,
                "http.response.body.size": r.response_bytes,
                "mesh.source": r.source_service,
                "mesh.destination": r.destination_service,
                "mesh.response_flags": r.response_flags,
                "mesh.retries": r.retries,
            }
            if r.route:
                attributes["http.route"] = r.route
            if r.upstream:
                attributes["mesh.upstream"] = r.upstream
            if r.request_id:
                attributes["mesh.request_id"] = r.request_id
            if r.grpc_status:
                attributes["rpc.grpc.status_code"] = r.grpc_status
            self.exporter.export(
                r.destination_service if server else r.source_service,
                f"{r.method} {r.route}" if r.route else r.method,
                server,
                span.trace_id,
                span.span_id,
                span.parent,
                span.tracestate,
                start_ns,
                start_ns + int(r.duration_s * 1e9),
                attributes,
                r.status == 0 or r.status >= 500,
            )

    def tcp_opened(self, reporter: str, source: str, destination: str) -> object:
        return self.tcp.opened(reporter, source, destination)

    def tcp_closed(self, handle: object, received: int, sent: int) -> None:
        if handle is not None:
            self.tcp.closed(handle, received, sent)  # type: ignore[arg-type]

    def render(self, live: Iterable[Any] = ()) -> list[str]:
        """Prometheus text lines; `live`: open L4 connections (their `istio`, `rx`, `tx`)."""
        open_conns = [(c.istio, c.rx, c.tx) for c in live if getattr(c, "istio", None) is not None]
        return self.metrics.render() + self.tcp.render(open_conns)

    def close(self) -> None:
        """Flush the access log and the batched spans (bounded by the exporter's timeout)."""
        if self.access_log is not None:
            self.access_log.close()
        if self.exporter is not None:
            self.exporter.close()
