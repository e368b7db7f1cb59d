"""`mesh top`: live golden metrics of the mesh in the terminal.

Like `linkerd viz top` / `stat`: every `-interval` it reads
`/api/metrics/services/` and `/api/metrics/edges` (or, with `-service`, that
service's metrics and its edges) and redraws a table of requests per second,
success rate and latency p50 / p95 / p99 over one window (`-window`, default
1m). On a terminal it refreshes until Ctrl-C; piped, or with `-once`, it
prints one table and exits; `-count N` stops after N tables.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

from meshproto.durations import DurationError, parse_duration
from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    add_format_option,
    api_failure,
    api_message,
    columnize,
    out,
    out_json,
    path_escape,
)

WINDOWS = ("1m", "5m", "15m", "1h", "24h")
CLEAR = "\x1b[H\x1b[2J"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cells(w: dict[str, Any]) -> list[str]:
    lat = w.get("latency_ms") or {}
    rate = w.get("success_rate")
    return [
        _num(w.get("rps"), ".2f"),
        "-" if rate is None else f"{100 * rate:.2f}%",
        _num(lat.get("p50"), ".1f"),
        _num(lat.get("p95"), ".1f"),
        _num(lat.get("p99"), ".1f"),
        str(w.get("requests", 0)),
    ]


HEAD = ["RPS", "SUCCESS", "P50 ms", "P95 ms", "P99 ms", "REQUESTS"]


def render_mesh(services: list[dict], edges: list[dict], window: str) -> str:
    """The table of every service, then every edge, over one window."""
    rows = [["SERVICE", *HEAD]]
    for s in sorted(services, key=lambda s: -(s["windows"][window]["rps"] or 0)):
        rows.append([s["service"], *_cells(s["windows"][window])])
    lines = [f"Services (as their sidecars answered), last {window}:", columnize(rows)]
    if len(rows) == 1:
        lines.append("(no traffic reported yet)")
    erows = [["SOURCE", "DESTINATION", *HEAD]]
    for e in edges:
        erows.append([e["source"], e["destination"], *_cells(e["windows"][window])])
    lines += ["", f"Edges (as the callers saw them), last {window}:", columnize(erows)]
    if len(erows) == 1:
        lines.append("(no edges reported yet)")
    return "\n".join(lines)


def render_service(data: dict, edges_in: list[dict], edges_out: list[dict], window: str) -> str:
    """One service: every window, its callers, and the edges in and out."""
    name = data["service"]
    rows = [["WINDOW", *HEAD]] + [[w, *_cells(data["windows"][w])] for w in WINDOWS]
    lines = [f"{name} (as its sidecars answered):", columnize(rows), ""]
    srows = [["SOURCE", *HEAD]] + [
        [s["source"], *_cells(s["windows"][window])] for s in data.get("sources", [])
    ]
    lines += [f"Callers of {name}, last {window}:", columnize(srows), ""]
    erows = [["SOURCE", "DESTINATION", *HEAD]] + [
        [e["source"], e["destination"], *_cells(e["windows"][window])]
        for e in [*edges_in, *edges_out]
    ]
    lines += [f"Edges in and out of {name} (as the callers saw them), last {window}:"]
    lines.append(columnize(erows))
    return "\n".join(lines)


def _read(client: Client, service: str, window: str) -> tuple[dict, str]:
    """The JSON of one refresh and its text rendering's inputs (lists over `window` only)."""
    if service:
        data = client.get_json(f"/api/metrics/services/{path_escape(service)}")
        edges_in = client.get_json(
            "/api/metrics/edges", {"destination": service, "window": window}
        )["edges"]
        edges_out = client.get_json("/api/metrics/edges", {"source": service, "window": window})[
            "edges"
        ]
        return {"service": data, "edges_in": edges_in, "edges_out": edges_out}, "service"
    services = client.get_json("/api/metrics/services/", {"window": window})["services"]
    edges = client.get_json("/api/metrics/edges", {"window": window})["edges"]
    return {"services": services, "edges": edges}, "mesh"


def cmd_top(args: argparse.Namespace) -> int:
    try:
        interval = parse_duration(args.interval)
    except DurationError as exc:
        raise CommandError(f"-interval: {exc}", 1) from None
    if interval < 0.5:
        raise CommandError("-interval: at least 0.5s", 1)
    if args.count is not None and args.count < 1:
        raise CommandError("-count: at least 1", 1)
    client = Client.from_args(args)
    live = not args.once and args.format == "text" and sys.stdout.isatty()
    count = args.count if args.count is not None else (None if live else 1)
    shown = 0
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            try:
                data, kind = _read(client, args.service, args.window)
            except ApiError as exc:
                raise api_failure(
                    "Error reading golden metrics", api_message(exc), client
                ) from None
            if args.format == "json":
                out_json(data)
            else:
                text = (
                    render_service(
                        data["service"], data["edges_in"], data["edges_out"], args.window
                    )
                    if kind == "service"
                    else render_mesh(data["services"], data["edges"], args.window)
                )
                stamp = time.strftime("%H:%M:%S")
                out((CLEAR if live else "") + f"mesh top  {stamp}  window {args.window}\n\n{text}")
            shown += 1
            if count is not None and shown >= count:
                return 0
            time.sleep(interval)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `top` to the `mesh` subcommands."""
    p = add_command(
        sub,
        "top",
        cmd_top,
        "Live golden metrics: requests per second, success rate, latency per service and edge",
        "Reads /api/metrics/services and /api/metrics/edges (rolling windows kept by the "
        "control plane from what the agents report). Refreshes until Ctrl-C on a terminal; "
        "piped or with -once, prints one table.",
        """
        $ mesh top
        $ mesh top -service api -window 5m
        $ mesh top -once -format json
        """,
    )
    p.add_argument(
        "-service", "--service", default="", metavar="NAME", help="one service in detail"
    )
    p.add_argument(
        "-window", "--window", choices=WINDOWS, default="1m", help="the window shown (default 1m)"
    )
    p.add_argument(
        "-interval", "--interval", default="2s", help="refresh interval, a duration (default 2s)"
    )
    p.add_argument("-once", "--once", action="store_true", help="print one table and exit")
    p.add_argument("-count", "--count", type=int, default=None, help="stop after N tables")
    add_format_option(p, ("text", "json"), "text (tables) or json (the API's documents)")
