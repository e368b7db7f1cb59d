"""The sidecar's counters and their Prometheus text, served on a local port.

Counting stays off the hot path: a connection keeps its own byte counters (slot
increments), which are folded into the totals when it closes; a scrape adds the
open connections' counters to those totals. Everything else (handshake
failures, denials, config applies) happens once per connection or per push.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from agents.proxy.listen import listen_socket
from agents.proxy.logs import log

DIRECTIONS = ("inbound", "outbound")


class Metrics:
    """Process-wide counters of one sidecar."""

    def __init__(self) -> None:
        self.opened = dict.fromkeys(DIRECTIONS, 0)
        self.active = dict.fromkeys(DIRECTIONS, 0)
        # Bytes of closed connections; open ones are added at scrape time.
        # rx: read from the caller's side, tx: written back to the caller's side.
        self.rx = dict.fromkeys(DIRECTIONS, 0)
        self.tx = dict.fromkeys(DIRECTIONS, 0)
        self.handshake_failures: Counter[tuple[str, str]] = Counter()
        self.authz_denials: Counter[str] = Counter()  # by source service
        self.authz_allowed = 0
        self.connect_failures: Counter[tuple[str, str]] = (
            Counter()
        )  # (upstream|"local_app", reason)
        self.config_version = 0
        self.config_applied = 0
        self.config_rejected = 0
        self.leaf_not_after: float | None = None
        self.control_connected = 0
        self.started = time.time()
        # HTTP (L7) listeners: requests by (reporter, status), and what the
        # resilience features did.
        self.http_requests: Counter[tuple[str, int]] = Counter()
        self.http_bad_requests: Counter[tuple[str, int]] = Counter()  # (direction, status)
        self.http_denied: Counter[str] = Counter()  # L7 intention denials, by source
        self.http_rate_limited = 0
        self.http_overflows: Counter[tuple[str, str]] = Counter()  # (cluster, breaker)
        self.http_retries: Counter[str] = Counter()  # by cluster
        self.http_budget_exhausted: Counter[str] = Counter()
        self.http_ejections: Counter[str] = Counter()

    def closed(self) -> int:
        """Connections closed so far (both directions)."""
        return sum(self.opened.values()) - sum(self.active.values())

    def handshake_failed(self, direction: str, reason: str) -> None:
        self.handshake_failures[(direction, reason)] += 1

    def render(self, live: Iterable[Any] = ()) -> str:
        """Prometheus text exposition (version 0.0.4)."""
        rx = dict(self.rx)
        tx = dict(self.tx)
        for conn in live:
            rx[conn.direction] += conn.rx
            tx[conn.direction] += conn.tx
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(
                    f"{name}{labels} {value:g}"
                    if isinstance(value, float)
                    else f"{name}{labels} {value}"
                )

        def lab(**kw: str) -> str:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in kw.items())
            return "{" + inner + "}"

        family(
            "mesh_sidecar_connections_opened_total",
            "counter",
            "Connections accepted by the sidecar's listeners.",
            [(lab(direction=d), self.opened[d]) for d in DIRECTIONS],
        )
        family(
            "mesh_sidecar_connections_active",
            "gauge",
            "Connections open now (accepted and not yet closed).",
            [(lab(direction=d), self.active[d]) for d in DIRECTIONS],
        )
        family(
            "mesh_sidecar_rx_bytes_total",
            "counter",
            "Application bytes received from the calling side.",
            [(lab(direction=d), rx[d]) for d in DIRECTIONS],
        )
        family(
            "mesh_sidecar_tx_bytes_total",
            "counter",
            "Application bytes sent back to the calling side.",
            [(lab(direction=d), tx[d]) for d in DIRECTIONS],
        )
        family(
            "mesh_sidecar_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed, or whose peer identity was refused, by reason.",
            [
                (lab(direction=d, reason=r), n)
                for (d, r), n in sorted(self.handshake_failures.items())
            ],
        )
        family(
            "mesh_sidecar_authz_denials_total",
            "counter",
            "Inbound connections refused by intentions, by source service.",
            [(lab(source=s), n) for s, n in sorted(self.authz_denials.items())],
        )
        family(
            "mesh_sidecar_authz_allowed_total",
            "counter",
            "Inbound connections allowed by intentions.",
            [("", self.authz_allowed)],
        )
        family(
            "mesh_sidecar_connect_failures_total",
            "counter",
            "Connections to an upstream endpoint or the local app that failed, by reason.",
            [(lab(target=t, reason=r), n) for (t, r), n in sorted(self.connect_failures.items())],
        )
        family(
            "mesh_sidecar_config_version",
            "gauge",
            "Version (control-plane index) of the proxy config being enforced.",
            [("", self.config_version)],
        )
        family(
            "mesh_sidecar_config_applied_total",
            "counter",
            "Messages from the agent that were applied (acked).",
            [("", self.config_applied)],
        )
        family(
            "mesh_sidecar_config_rejected_total",
            "counter",
            "Messages from the agent that were rejected (nacked); the last good state stayed.",
            [("", self.config_rejected)],
        )
        if self.leaf_not_after is not None:
            family(
                "mesh_sidecar_leaf_expiry_seconds",
                "gauge",
                "Seconds until the leaf certificate expires (negative once expired).",
                [("", float(round(self.leaf_not_after - time.time(), 3)))],
            )
        family(
            "mesh_sidecar_http_requests_total",
            "counter",
            "HTTP requests answered by the sidecar's HTTP listeners, by reporter and status.",
            [
                (lab(reporter=r, status=str(c)), n)
                for (r, c), n in sorted(self.http_requests.items())
            ],
        )
        family(
            "mesh_sidecar_http_malformed_total",
            "counter",
            "Requests refused before they were parsed whole (400, 408, 413, 431...).",
            [
                (lab(direction=d, status=str(c)), n)
                for (d, c), n in sorted(self.http_bad_requests.items())
            ],
        )
        family(
            "mesh_sidecar_http_denied_total",
            "counter",
            "Requests denied (403) by L7 intentions, by source service.",
            [(lab(source=s), n) for s, n in sorted(self.http_denied.items())],
        )
        family(
            "mesh_sidecar_http_rate_limited_total",
            "counter",
            "Inbound requests answered 429 by a rate limit.",
            [("", self.http_rate_limited)],
        )
        family(
            "mesh_sidecar_http_overflows_total",
            "counter",
            "Requests answered 503 by an open circuit breaker, by cluster and breaker.",
            [(lab(cluster=c, breaker=b), n) for (c, b), n in sorted(self.http_overflows.items())],
        )
        family(
            "mesh_sidecar_http_retries_total",
            "counter",
            "Retried attempts, by cluster.",
            [(lab(cluster=c), n) for c, n in sorted(self.http_retries.items())],
        )
        family(
            "mesh_sidecar_http_retry_budget_exhausted_total",
            "counter",
            "Retries not made because the retry budget was spent, by cluster.",
            [(lab(cluster=c), n) for c, n in sorted(self.http_budget_exhausted.items())],
        )
        family(
            "mesh_sidecar_http_outlier_ejections_total",
            "counter",
            "Endpoints ejected by outlier detection, by cluster.",
            [(lab(cluster=c), n) for c, n in sorted(self.http_ejections.items())],
        )
        family(
            "mesh_sidecar_control_connected",
            "gauge",
            "1 while the sidecar is connected to its agent's socket.",
            [("", self.control_connected)],
        )
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def serve_metrics(
    host: str, port: int, render: Callable[[], str]
) -> asyncio.base_events.Server:
    """Serve `GET /metrics` (Prometheus text) on host:port; one request per connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].split(b"?", 1)[0] if len(parts) >= 2 else b""
            if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD") and path == b"/metrics":
                body = render().encode()
                status = b"200 OK"
                ctype = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            payload = b"" if parts and parts[0] == b"HEAD" else body
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: "
                + ctype
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + payload
            )
            await asyncio.wait_for(writer.drain(), 5)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception as exc:  # a scrape must never take the sidecar down
            log.error("metrics request failed", error=repr(exc))
        finally:
            writer.close()

    return await asyncio.start_server(handle, sock=listen_socket(host, port, backlog=16))
