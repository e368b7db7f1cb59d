"""`mesh gateway`: define, register, inspect and run mesh gateways.

    mesh gateway definition -dc dc2 -address 10.0.2.4:8443 -wan-address 198.51.100.2:8443
    mesh gateway register   -dc dc2 -address 10.0.2.4:8443 -wan-address 198.51.100.2:8443
    mesh gateway list
    mesh gateway routes -node gw-dc2 [-id mesh-gateway]
    mesh gateway run -config routes.json [-listen 0.0.0.0:8443]

A gateway is a `kind: mesh-gateway` service on an agent: `definition` prints the
file for the agent's config dir, `register` gives it to the running agent
(`-http-addr` is the agent's local API); either way the agent starts the
`mesh-gateway` process and feeds it the routing table the control plane
compiles. `list` and `routes` ask the control plane; `run` serves a fixed
table from a file, without agent or control plane.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    add_format_option,
    add_group,
    add_name_option,
    api_failure,
    columnize,
    get_or_fail,
    out,
    out_json,
    path_escape,
)

_DC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
DEFAULT_PORT = 8443


def _host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = (value or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise CommandError(f"{flag}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def definition(args: argparse.Namespace) -> dict[str, Any]:
    """The `kind: mesh-gateway` service definition the flags describe (Consul's fields)."""
    if not args.dc or not _DC.match(args.dc):
        raise CommandError(f"-dc: {args.dc!r} is not a datacenter name")
    if not args.address:
        raise CommandError("Must specify -address (the gateway's LAN address, HOST:PORT)")
    lan, port = _host_port(args.address, "-address")
    wan, wan_port = (
        _host_port(args.wan_address, "-wan-address") if args.wan_address else (lan, port)
    )
    service: dict[str, Any] = {
        "Kind": "mesh-gateway",
        "Name": args.name,
        "Port": port,
        "Address": lan,
        "TaggedAddresses": {
            "lan": {"Address": lan, "Port": port},
            "wan": {"Address": wan, "Port": wan_port},
        },
        "Meta": {"datacenter": args.dc},
        "Check": {
            "Name": "mesh gateway listening",
            "TCP": f"{lan}:{port}",
            "Interval": args.check_interval,
            "Timeout": "2s",
        },
    }
    if args.id:
        service["ID"] = args.id
    return service


def cmd_definition(args: argparse.Namespace) -> int:
    out_json({"service": definition(args)})
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    service = definition(args)
    client = Client.from_args(args)
    try:
        agent_dc = ((client.get_json("/v1/agent/self") or {}).get("Config") or {}).get("Datacenter")
    except ApiError as exc:
        raise api_failure("Error asking the agent its datacenter", exc, client) from None
    if agent_dc and agent_dc != args.dc:
        raise CommandError(
            f'The agent at {client.base_url} is in datacenter "{agent_dc}", not "{args.dc}": '
            "a gateway registers with an agent of its own datacenter"
        )
    try:
        client.put_json("/v1/agent/service/register", service)
    except ApiError as exc:
        raise api_failure("Error registering the mesh gateway", exc, client) from None
    out(f"Registered mesh gateway {service.get('ID') or service['Name']} in {args.dc}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    rows = get_or_fail(client, "/api/gateways/", "Error listing mesh gateways", api=True)
    if args.format == "json":
        out_json(rows)
        return 0
    table = [["Datacenter", "Node", "ID", "LAN", "WAN"]]
    for r in rows:
        wan = r.get("wan") or {}
        wan_text = f"{wan.get('Address')}:{wan.get('Port')}" if wan.get("Address") else ""
        table.append([r["datacenter"], r["node"], r["id"], f"{r['address']}:{r['port']}", wan_text])
    out(columnize(table))
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    if not args.node:
        raise CommandError("Must specify -node (the gateway's node)")
    client = Client.from_args(args)
    path = f"/api/gateways/{path_escape(args.node)}/{path_escape(args.id)}/config"
    config = get_or_fail(
        client, path, f"Error reading the routing table of {args.id} on {args.node}", api=True
    )
    if args.format == "json":
        out_json(config)
        return 0
    out(
        f"Mesh gateway {config['proxy_id']} on {config['node']} ({config['datacenter']}), "
        f"listening on {config['bind_address']}:{config['port']}, version {config['version']}"
    )
    table = [["SNI", "To", "Endpoints"]]
    for r in config["routes"]:
        eps = ", ".join(f"{e['address']}:{e['port']}" for e in r["endpoints"]) or "(none healthy)"
        table.append([r["sni"], f"{r['kind']} {r['service']}", eps])
    for d in config["datacenters"]:
        eps = ", ".join(f"{e['address']}:{e['port']}" for e in d["gateways"])
        table.append([f"*{d['sni_suffix']}", f"gateways of {d['datacenter']}", eps])
    out(columnize(table))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gateways import main as gateway_main

    argv = ["--config", args.config]
    if args.listen:
        argv += ["--listen", args.listen]
    if args.metrics_addr:
        argv += ["--metrics-addr", args.metrics_addr]
    return gateway_main.main(argv)


def _definition_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-dc", "--dc", dest="dc", metavar="DC", help="the gateway's datacenter")
    add_name_option(p, "service name (mesh-gateway)", default="mesh-gateway")
    p.add_argument("-id", "--id", default="", help="service ID (default: the name)")
    p.add_argument(
        "-address", "--address", metavar="HOST:PORT", help="LAN address: local sidecars dial it"
    )
    p.add_argument(
        "-wan-address",
        "--wan-address",
        dest="wan_address",
        metavar="HOST:PORT",
        help="WAN address: other datacenters' gateways dial it (default: -address)",
    )
    p.add_argument(
        "-check-interval", "--check-interval", dest="check_interval", default="10s",
        help="interval of its TCP check (default 10s)",
    )  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(
        sub,
        "gateway",
        "Define, register, inspect and run mesh gateways",
        """
        $ mesh gateway definition -dc dc2 -address 10.0.2.4:8443 -wan-address 198.51.100.2:8443
        $ mesh gateway routes -node gw-dc2
        """,
    )
    p = add_command(
        group,
        "definition",
        cmd_definition,
        "Print a mesh gateway's service definition (for an agent's config dir)",
    )
    _definition_flags(p)
    p = add_command(
        group,
        "register",
        cmd_register,
        "Register a mesh gateway with the local agent, which starts it",
        "-http-addr names the agent's local API; its token is the agent's.",
    )
    _definition_flags(p)
    for name, func, synopsis in (
        ("list", cmd_list, "List the mesh gateways of every datacenter"),
        ("routes", cmd_routes, "Print the routing table the control plane compiled for a gateway"),
    ):
        p = add_command(group, name, func, synopsis)
        add_format_option(p, ("text", "json"), "output format: text or json (default text)")
        if name == "routes":
            p.add_argument("-node", "--node", help="the gateway's node")
            p.add_argument("-id", "--id", default="mesh-gateway", help="its service ID")
    p = add_command(
        group, "run", cmd_run, "Run a mesh gateway serving a fixed routing table from a file"
    )
    p.add_argument("-config", "--config", required=True, help="GatewayConfig JSON file")
    p.add_argument("-listen", "--listen", help="HOST:PORT (default: the file's)")
    p.add_argument("-metrics-addr", "--metrics-addr", dest="metrics_addr", help="HOST:PORT")
