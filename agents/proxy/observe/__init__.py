"""The seam between the sidecar's HTTP path and what watches it.

The HTTP proxy (`agents.proxy.http`) knows requests; metrics, traces and
access logs know how to report them. They meet here and nowhere else: for each
request the proxy calls `Observer.begin` when the request head is parsed and
`RequestSpan.finish` with a `RequestRecord` once the response is done (or
failed). The proxy sends `RequestSpan.upstream_headers()` with every attempt
it makes upstream, so a trace follows the call to the next hop.

The L4 path reports connections the same way: `tcp_opened` when a connection
is established and allowed, `tcp_closed` with its byte counts when it ends.

`NULL_OBSERVER` does nothing and costs one call; the sidecar builds the real
observer from its configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Headers = list[tuple[bytes, bytes]]  # lower-cased names, as received


@dataclass(slots=True)
class RequestRecord:
    """One finished HTTP request as the sidecar saw it (either direction)."""

    reporter: str  # "source" (outbound listener) | "destination" (inbound listener)
    source_service: str
    destination_service: str
    method: str
    path: str
    authority: str
    protocol: str  # "http" | "http2" | "grpc"
    status: int  # 0 when no response was sent (client went away)
    started: float  # time.time() when the request head arrived
    duration_s: float
    request_bytes: int = 0
    response_bytes: int = 0
    route: str = ""  # the matched route's name or index, "" for the default
    cluster: str = ""  # the chosen cluster (target) name
    upstream: str = ""  # "host:port" of the instance that answered
    retries: int = 0
    response_flags: str = "-"  # Envoy-style: UF, UO, URX, UT, DC, NR, RL, UH, ...
    grpc_status: str = ""
    request_id: str = ""
    mtls: bool = True
    denied_by: str = ""  # intention id when an L7 intention denied it


class RequestSpan(Protocol):
    def upstream_headers(self) -> Headers:
        """Headers to add to each upstream attempt (e.g. `traceparent`)."""

    def finish(self, record: RequestRecord) -> None:
        """Report the request once it is over; called exactly once."""


class Observer(Protocol):
    def begin(self, reporter: str, headers: Headers) -> RequestSpan:
        """A request head has been parsed; `headers` are the incoming ones."""

    def tcp_opened(self, reporter: str, source: str, destination: str) -> object:
        """An L4 connection was established (and allowed); the handle to close it with."""

    def tcp_closed(self, handle: object, received: int, sent: int) -> None:
        """The connection `tcp_opened` answered `handle` for is over, with its byte counts."""


class _NullSpan:
    __slots__ = ()

    def upstream_headers(self) -> Headers:
        return []

    def finish(self, record: RequestRecord) -> None:
        return None


class _NullObserver:
    __slots__ = ()
    _span = _NullSpan()

    def begin(self, reporter: str, headers: Headers) -> RequestSpan:
        return self._span

    def tcp_opened(self, reporter: str, source: str, destination: str) -> object:
        return None

    def tcp_closed(self, handle: object, received: int, sent: int) -> None:
        return None


NULL_OBSERVER: Observer = _NullObserver()
