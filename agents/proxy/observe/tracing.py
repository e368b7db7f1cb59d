"""W3C trace context for the sidecar, and its spans exported over OTLP.

Propagation is always on: `begin` reads `traceparent` / `tracestate` from the
request (a malformed or absent `traceparent` starts a new trace), picks this
hop's span id and decides sampling parent-based — a parent's sampled flag is
followed, a new trace is sampled when the low 64 bits of its trace id fall
below `ratio` of the range (the OpenTelemetry SDK's `TraceIdRatioBased` rule,
so the SDK, which decides again when the span is made, always agrees).

Export is optional: with an OTLP/HTTP endpoint, each sampled request becomes
one span (SERVER on the inbound side, CLIENT on the outbound side): an
OpenTelemetry SDK `ReadableSpan`, batched by the SDK's `BatchSpanProcessor`
and posted by `opentelemetry-exporter-otlp-proto-http`. The SDK is imported
on the first sampled span only, so a sidecar without tracing never loads it.
A span's ids are the ones `begin` already sent upstream, so the next hop's
span names this one as its parent.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from agents.proxy.logs import log

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_TRACE_ID_LIMIT = (1 << 64) - 1
_getrandbits = random.getrandbits
MAX_TRACESTATE = 512  # W3C: a vendor may drop a longer tracestate
MAX_TRACESTATE_MEMBERS = 32
_TRACESTATE_MEMBER = re.compile(
    r"^([a-z0-9][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]$"
)


@dataclass(frozen=True)
class TraceParent:
    trace_id: int
    span_id: int
    sampled: bool


def parse_traceparent(value: bytes | str) -> TraceParent | None:
    """The parent a `traceparent` header names, or None when it is not valid.

    Version 00 must be exactly 55 characters; a later version is read by its
    first four fields (the spec's forward compatibility); version ff, all-zero
    ids and upper-case hex are invalid.
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip(" \t")
    m = _TRACEPARENT.match(text)
    if m is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return TraceParent(trace_id, span_id, bool(int(flags_hex, 16) & 1))


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}".encode()


def clean_tracestate(values: list[bytes]) -> bytes:
    """The `tracestate` to pass on: the received headers joined, or b"" when it
    is malformed or too long (W3C lets a hop drop what it cannot keep)."""
    text = ",".join(v.decode("latin-1") for v in values)
    members = [m.strip(" \t") for m in text.split(",") if m.strip(" \t")]
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return b""
    if not all(_TRACESTATE_MEMBER.match(m) for m in members):
        return b""
    joined = ",".join(members)
    return joined.encode() if len(joined) <= MAX_TRACESTATE else b""


def sampled_by_ratio(trace_id: int, ratio: float) -> bool:
    """TraceIdRatioBased: the low 64 bits of the trace id under ratio * 2^64."""
    return trace_id & _TRACE_ID_LIMIT < round(ratio * (_TRACE_ID_LIMIT + 1))


def new_id(bits: int) -> int:
    """A random non-zero id of `bits` bits.

    Trace and span ids must be unique, not secret: like the OpenTelemetry
    SDK's `RandomIdGenerator`, `random.getrandbits` (no system call per
    request, as `os.urandom` would cost)."""
    while True:
        value = _getrandbits(bits)
        if value:
            return value


def _sdk_logs_as_json() -> None:
    """The SDK reports through `logging` (an unreachable collector, dropped
    spans): turn its records into the sidecar's JSON lines on stderr."""
    import logging

    class ToJson(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            level = "error" if record.levelno >= logging.ERROR else "warning"
            getattr(log, level)("tracing: " + record.getMessage(), component=record.name)

    sdk = logging.getLogger("opentelemetry")
    sdk.handlers[:] = [ToJson(level=logging.WARNING)]
    sdk.setLevel(logging.WARNING)
    sdk.propagate = False


class SpanExporter:
    """Exports sampled requests as spans with the OpenTelemetry SDK (see the module docstring).

    `endpoint` is the collector's OTLP/HTTP base URL (`http://host:4318`) or its
    full traces URL (`.../v1/traces`). Each span is the SDK's `ReadableSpan`
    — the finished span a `Tracer` would hand its processors — made directly
    from the request: its ids and sampling were decided in `begin`, so the
    tracer's id generation and second sampling pass would only cost time (a
    tracer-made span costs several times more, mostly checking attributes we
    build ourselves). It goes to the SDK's `BatchSpanProcessor` and
    `OTLPSpanExporter`, which post from their own thread. `export` runs on the
    event loop only.
    """

    def __init__(self, endpoint: str, ratio: float, *, timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        if not self.endpoint.endswith("/v1/traces"):
            self.endpoint += "/v1/traces"
        self.ratio = ratio
        self.timeout_s = timeout_s
        self._processor: Any = None
        self._make: Any = None
        self.failed = False

    def _start(self, service: str) -> None:
        """Load the SDK and build the processor (once, on the first sampled span)."""
        from opentelemetry import trace as api
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace.status import Status, StatusCode

        resource = Resource.create({"service.name": service or "unknown"})
        scope = InstrumentationScope("meshweb.sidecar")
        sampled, unsampled = api.TraceFlags(1), api.TraceFlags(0)
        kinds = {True: api.SpanKind.SERVER, False: api.SpanKind.CLIENT}
        error, unset = Status(StatusCode.ERROR), Status(StatusCode.UNSET)
        SpanContext, TraceState = api.SpanContext, api.TraceState  # noqa: N806

        def make(
            name, server, trace_id, span_id, parent, tracestate, start_ns, end_ns, attrs, failed
        ):
            state = TraceState.from_header([tracestate.decode("latin-1")]) if tracestate else None
            parent_ctx = (
                SpanContext(
                    trace_id,
                    parent.span_id,
                    is_remote=True,
                    trace_flags=sampled if parent.sampled else unsampled,
                    trace_state=state,
                )
                if parent is not None
                else None
            )
            return ReadableSpan(
                name,
                context=SpanContext(trace_id, span_id, False, sampled, state),
                parent=parent_ctx,
                resource=resource,
                attributes=attrs,
                kind=kinds[server],
                status=error if failed else unset,
                start_time=start_ns,
                end_time=end_ns,
                instrumentation_scope=scope,
            )

        self._make = make
        self._processor = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=self.endpoint, timeout=self.timeout_s)
        )
        _sdk_logs_as_json()
        log.info("tracing", endpoint=self.endpoint, ratio=self.ratio, service=service)

    def export(
        self,
        service: str,
        name: str,
        server: bool,
        trace_id: int,
        span_id: int,
        parent: TraceParent | None,
        tracestate: bytes,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any],
        error: bool,
    ) -> None:
        if self.failed:
            return
        try:
            if self._processor is None:
                self._start(service)
            self._processor.on_end(
                self._make(
                    name,
                    server,
                    trace_id,
                    span_id,
                    parent,
                    tracestate,
                    start_ns,
                    end_ns,
                    attributes,
                    error,
                )  # fmt: skip
            )
        except Exception as exc:  # tracing must never break the data path
            self.failed = True
            log.error("tracing disabled after an error", error=repr(exc))

    def close(self) -> None:
        """Flush what is batched and stop the SDK's thread (bounded by the exporter's timeout)."""
        if self._processor is not None:
            self._processor.shutdown()
