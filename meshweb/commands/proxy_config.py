"""`mesh proxy-config <service>`: print what one sidecar of a service enforces.

Reads `GET /api/services/<service>/proxy-config` (the document the config
stream pushes to agents) and prints it as JSON (`-format=json`) or as a
readable summary: inbound listener, upstreams with their routes, clusters and
endpoints, the intentions in precedence order, and the CA roots' IDs (looked
up in `/v1/connect/ca/roots`).
"""

from __future__ import annotations

import argparse
import hashlib
from typing import Any

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


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _match(m: dict[str, Any]) -> str:
    """A route match in a few words (`/admin* GET x-canary present`)."""
    parts: list[str] = []
    if m.get("path_exact"):
        parts.append(f"path = {m['path_exact']}")
    if m.get("path_prefix") and m["path_prefix"] != "/":
        parts.append(f"path {m['path_prefix']}*")
    if m.get("path_regex"):
        parts.append(f"path ~ {m['path_regex']}")
    if m.get("methods"):
        parts.append("|".join(m["methods"]))
    for h in m.get("headers") or ():
        if h.get("present"):
            test = "present"
        elif h.get("exact"):
            test = f"= {h['exact']}"
        elif h.get("prefix"):
            test = f"{h['prefix']}*"
        elif h.get("suffix"):
            test = f"*{h['suffix']}"
        elif h.get("regex"):
            test = f"~ {h['regex']}"
        else:
            test = "present"
        parts.append(f"header {h['name']} {'not ' if h.get('invert') else ''}{test}")
    for name, value in m.get("query") or ():
        parts.append(f"?{name}={value}" if value else f"?{name}")
    return " ".join(parts) or "*"


def _route(r: dict[str, Any]) -> str:
    splits = ", ".join(f"{s['cluster']} {s['weight']:g}%" for s in r.get("splits") or ())
    extras = []
    if r.get("prefix_rewrite"):
        extras.append(f"rewrite {r['prefix_rewrite']}")
    if r.get("timeout_s"):
        extras.append(f"timeout {_seconds(r['timeout_s'])}")
    retry = r.get("retry") or {}
    if retry.get("num_retries"):
        extras.append(f"retries {retry['num_retries']}")
    tail = f"  ({', '.join(extras)})" if extras else ""
    return f"route {_match(r.get('match') or {})} -> {splits}{tail}"


def _cluster_lines(c: dict[str, Any]) -> list[str]:
    head = f"cluster {c['name']}  {c['spiffe_id']}"
    details = [c.get("lb_policy", ""), f"connect timeout {_seconds(c['connect_timeout_s'])}"]
    if c.get("failover"):
        details.append("failover " + ", ".join(c["failover"]))
    if c.get("gateway"):
        details.append(f"via mesh gateway {c['gateway']['address']}:{c['gateway']['port']}")
    lines = [head, "  " + ", ".join(d for d in details if d)]
    rows = [
        [f"{e['address']}:{e['port']}", e.get("node", ""), e.get("health", ""), f"w={e['weight']}"]
        for e in c.get("endpoints") or ()
    ]
    if rows:
        lines.extend("  " + line for line in columnize(rows).splitlines())
    else:
        lines.append("  (no healthy endpoints)")
    return lines


def _intention_rows(config: dict[str, Any]) -> list[list[str]]:
    rows = [["Precedence", "Source", "Destination", "Action"]]
    for i in config.get("intentions") or ():
        perms = i.get("Permissions") or []
        action = i.get("Action") or f"L7 ({len(perms)} permission{'' if len(perms) == 1 else 's'})"
        rows.append(
            [
                str(i.get("Precedence", "")),
                i.get("SourceName", ""),
                i.get("DestinationName", ""),
                action,
            ]
        )
    return rows


def root_label(pem: str, ids: dict[str, str]) -> str:
    """A root's ID from the CA's list, else a fingerprint of its PEM."""
    return ids.get(pem.strip()) or "sha256:" + hashlib.sha256(pem.encode()).hexdigest()[:16]


def render_text(config: dict[str, Any], root_ids: dict[str, str] | None = None) -> str:
    """The readable summary of a proxy config's JSON."""
    root_ids = root_ids or {}
    inbound = config["inbound"]
    lines = [
        f"Proxy:     {config['proxy_id']} on node {config['node']} ({config['datacenter']}), "
        f"version {config['version']}",
        f"Service:   {config['service']}  {config['spiffe_id']}",
        f"Inbound:   {inbound['bind_address']}:{inbound['port']} -> "
        f"{inbound['local_app_address']}:{inbound['local_app_port']} ({inbound['protocol']})",
    ]
    rl = inbound.get("rate_limit") or {}
    if rl.get("requests_per_second"):
        lines.append(
            f"           rate limit {rl['requests_per_second']:g} req/s, burst {rl.get('burst', 0)}"
        )
    if (inbound.get("limits") or {}).get("max_connections"):
        lines.append(f"           max connections {inbound['limits']['max_connections']}")
    lines.append("")
    upstreams = config.get("upstreams") or []
    lines.append(f"Upstreams ({len(upstreams)}):")
    for u in upstreams:
        lines.append(
            f"  {u['destination']} -> {u['local_bind_address']}:{u['local_bind_port']} "
            f"({u['protocol']}, {u['datacenter']})"
        )
        for r in u.get("routes") or ():
            lines.append("    " + _route(r))
        if not u.get("clusters"):
            lines.append("    (no clusters: the discovery chain did not compile)")
        for c in u.get("clusters") or ():
            lines.extend("    " + line for line in _cluster_lines(c))
    lines.append("")
    default = "allow" if config.get("default_allow") else "deny"
    lines.append(f"Intentions (default {default}):")
    rows = _intention_rows(config)
    if len(rows) > 1:
        lines.extend("  " + line for line in columnize(rows).splitlines())
    else:
        lines.append("  (none)")
    lines.append("")
    roots = config.get("roots") or []
    lines.append(f"Roots ({len(roots)}):")
    for i, pem in enumerate(roots):
        lines.append(f"  {root_label(pem, root_ids)}{'  (active)' if i == 0 else ''}")
    return "\n".join(lines)


def _root_ids(client: Client) -> dict[str, str]:
    try:
        data = client.get_json("/v1/connect/ca/roots") or {}
    except ApiError:
        return {}
    return {(r.get("RootCert") or "").strip(): r.get("ID", "") for r in data.get("Roots") or ()}


def cmd_proxy_config(args: argparse.Namespace) -> int:
    if not args.service:
        raise CommandError("Error! Missing SERVICE argument")
    client = Client.from_args(args)
    params = {"proxy_id": args.proxy_id or None, "node": args.node or None}
    try:
        config = client.get_json(f"/api/services/{path_escape(args.service)}/proxy-config", params)
    except ApiError as exc:
        raise api_failure("Error reading the proxy config", api_message(exc), client) from None
    if args.format == "json":
        out_json(config)
        return 0
    out(render_text(config, _root_ids(client)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "proxy-config",
        cmd_proxy_config,
        "Print what a service's sidecar enforces (its compiled proxy config)",
        "The same document the agents receive on the config stream. With several "
        "sidecars, -proxy-id and/or -node pick one (default: the first).",
        """
        $ mesh proxy-config web
        $ mesh proxy-config web -node host-a -format json
        """,
    )
    p.add_argument("service", nargs="?", metavar="SERVICE", help="the service the sidecar fronts")
    p.add_argument(
        "-proxy-id", "--proxy-id", dest="proxy_id", metavar="ID", help="the sidecar's service ID"
    )
    p.add_argument("-node", "--node", dest="node", metavar="NODE", help="the sidecar's node")
    add_format_option(
        p, ("text", "pretty", "json"), "output format: text (a summary) or json (default text)"
    )
