"""`mesh connect status`: the service mesh at a glance.

Reads `GET /api/connect/status/` and prints, per service with sidecars, each
sidecar's node, address, health and the config versions the control plane
pushed and the agent acked; then the CA roots and the intentions count.
`-format json` prints the document as the API answers it.
"""

from __future__ import annotations

import argparse
from typing import Any

from meshweb.commands.base import (
    ApiError,
    Client,
    add_command,
    add_format_option,
    add_group,
    api_failure,
    api_message,
    columnize,
    out,
    out_json,
)


def _version(v: int) -> str:
    return str(v) if v else "-"


def _config_cell(cfg: dict[str, Any]) -> str:
    if cfg.get("stream") != "connected":
        return cfg.get("stream") or "-"
    if cfg.get("nacked_version", 0) > cfg.get("acked_version", 0):
        return "rejected: " + (cfg.get("error") or "(no reason given)")[:60]
    if cfg.get("in_sync"):
        return "in sync"
    return "pushing" if cfg.get("pushed_version") else "waiting"


def render_text(data: dict[str, Any]) -> str:
    """The readable summary of the status document."""
    lines: list[str] = []
    services = data.get("services") or []
    total = sum(len(s["proxies"]) for s in services)
    lines.append(
        f"Datacenter {data.get('datacenter', '')}, answered by "
        f"{data.get('server') or '(a server; naming it needs node:read)'}: "
        f"{len(services)} service{'' if len(services) == 1 else 's'} with sidecars, "
        f"{total} sidecar{'' if total == 1 else 's'}"
    )
    for svc in services:
        lines.append("")
        lines.append(f"{svc['service']}")
        rows = [["Proxy", "Node", "Address", "Health", "Pushed", "Acked", "Config"]]
        for p in svc["proxies"]:
            cfg = p.get("config") or {}
            rows.append(
                [
                    p["proxy_id"],
                    p["node"],
                    f"{p['address']}:{p['port']}",
                    p["health"],
                    _version(cfg.get("pushed_version", 0)),
                    _version(cfg.get("acked_version", 0)),
                    _config_cell(cfg),
                ]
            )
        lines.extend("  " + line for line in columnize(rows).splitlines())
    if not services:
        lines.append("")
        lines.append("(no sidecars registered)")
    ca = data.get("ca")
    lines.append("")
    if ca is None:
        lines.append("CA roots: not shown (needs operator:read)")
    else:
        lines.append(f"CA roots (trust domain {ca.get('trust_domain', '')}):")
        rows = [["ID", "Name", "Active", "Not after"]]
        for r in ca.get("roots") or ():
            rows.append([r["id"], r["name"], "yes" if r["active"] else "no", r["not_after"] or ""])
        lines.extend("  " + line for line in columnize(rows).splitlines())
    i = data.get("intentions") or {}
    lines.append("")
    lines.append(
        f"Intentions: {i.get('total', 0)} ({i.get('allow', 0)} allow, {i.get('deny', 0)} deny, "
        f"{i.get('l7', 0)} L7)"
    )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    params = {"service": args.service} if args.service else None
    try:
        data = client.get_json("/api/connect/status/", params)
    except ApiError as exc:
        raise api_failure("Error reading the connect status", api_message(exc), client) from None
    if args.format == "json":
        out_json(data)
    else:
        out(render_text(data))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `connect status` to the `mesh` subcommands."""
    group = add_group(
        sub,
        "connect",
        "Service mesh (Connect) commands",
        """
        $ mesh connect status
        """,
    )
    p = add_command(
        group,
        "status",
        cmd_status,
        "Show the sidecars per service (health, config pushed and acked), CA roots, intentions",
        "Pushed/acked versions are those of the config streams of the server answering: "
        "an agent connected to another server shows 'not connected here'.",
        """
        $ mesh connect status
        $ mesh connect status -service api -format json
        """,
    )
    p.add_argument("-service", "--service", default="", metavar="NAME", help="only this service")
    add_format_option(
        p, ("text", "pretty", "json"), "output format: text (a summary) or json (default text)"
    )
