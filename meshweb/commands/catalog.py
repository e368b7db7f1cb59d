"""`mesh catalog services|nodes|datacenters` and `mesh members`, as consul prints them."""

from __future__ import annotations

import argparse
import ipaddress
import re

from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    add_format_option,
    add_group,
    api_failure,
    columnize,
    get_or_fail,
    key_value,
    out,
    out_json,
    path_escape,
    report_nothing,
    tabulate,
)


def _no_positional(args: argparse.Namespace) -> None:
    if args.extra:
        raise CommandError(f"Too many arguments (expected 0, got {len(args.extra)})")


def _node_meta(args: argparse.Namespace) -> list[tuple[str, str]]:
    # The CLI takes key=value (as consul's); the API wants node-meta=key:value.
    return [("node-meta", f"{k}:{v}") for k, v in args.node_meta or []]


def cmd_services(args: argparse.Namespace) -> int:
    _no_positional(args)
    client = Client.from_args(args)
    services: dict[str, list[str]] = {}
    if args.node:
        try:
            resp = client.get(
                "/v1/catalog/node/" + path_escape(args.node), _node_meta(args), ok=(200, 404)
            )
        except ApiError as exc:
            raise api_failure("Error listing services for node", exc, client) from None
        data = resp.json() if resp.status == 200 else None
        for svc in ((data or {}).get("Services") or {}).values():
            services.setdefault(svc.get("Service", ""), []).extend(svc.get("Tags") or [])
    else:
        try:
            resp = client.get("/v1/catalog/services", _node_meta(args))
        except ApiError as exc:
            raise api_failure("Error listing services", exc, client) from None
        services = resp.json() or {}
    if args.format == "json":
        out_json({name: sorted(set(tags or [])) for name, tags in sorted(services.items())})
        return 0
    if not services:
        return report_nothing("services", resp, client)
    names = sorted(services)
    if args.tags:
        rows = [(name, ",".join(sorted(set(services[name] or [])))) for name in names]
        out("\n".join(tabulate(rows, padding=6)).strip())
    else:
        for name in names:
            out(name)
    return 0


def _pairs(mapping: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((mapping or {}).items()))


def cmd_nodes(args: argparse.Namespace) -> int:
    _no_positional(args)
    client = Client.from_args(args)
    params = [*_node_meta(args), ("filter", args.filter), ("near", args.near)]
    try:
        if args.service:
            resp = client.get("/v1/catalog/service/" + path_escape(args.service), params)
            entries = resp.json()
            nodes = [
                {
                    "ID": e.get("ID", ""),
                    "Node": e.get("Node", ""),
                    "Address": e.get("Address", ""),
                    "Datacenter": e.get("Datacenter", ""),
                    "TaggedAddresses": e.get("TaggedAddresses") or {},
                    "Meta": e.get("NodeMeta") or {},
                    "CreateIndex": e.get("CreateIndex", 0),
                    "ModifyIndex": e.get("ModifyIndex", 0),
                }
                for e in entries or []
            ]
        else:
            resp = client.get("/v1/catalog/nodes", params)
            nodes = resp.json() or []
    except ApiError as exc:
        prefix = "Error listing nodes for service" if args.service else "Error listing nodes"
        raise api_failure(prefix, exc, client) from None
    if args.format == "json":
        out_json(nodes)
        return 0
    if not nodes:
        return report_nothing("nodes", resp, client)
    if args.detailed:
        rows = [("Node", "ID", "Address", "DC", "TaggedAddresses", "Meta")]
        for n in nodes:
            rows.append(
                (
                    n.get("Node", ""),
                    n.get("ID", ""),
                    n.get("Address", ""),
                    n.get("Datacenter", ""),
                    _pairs(n.get("TaggedAddresses")),
                    _pairs(n.get("Meta")),
                )
            )
    else:
        rows = [("Node", "ID", "Address", "DC")]
        for n in nodes:
            # The short form shows the node ID's first group only, as consul does.
            rows.append(
                (
                    n.get("Node", ""),
                    (n.get("ID") or "").split("-", 1)[0],
                    n.get("Address", ""),
                    n.get("Datacenter", ""),
                )
            )
    out(columnize(rows))
    return 0


def cmd_datacenters(args: argparse.Namespace) -> int:
    _no_positional(args)
    client = Client.from_args(args)
    dcs = get_or_fail(client, "/v1/catalog/datacenters", "Error listing datacenters") or []
    if args.format == "json":
        out_json(dcs)
        return 0
    if not dcs:
        raise CommandError("No datacenters found")
    for dc in dcs:
        out(dc)
    return 0


# serf's MemberStatus names, by the integer /v1/agent/members carries.
_MEMBER_STATUS = {0: "none", 1: "alive", 2: "leaving", 3: "left", 4: "failed"}


def _member_addr(member: dict) -> str:
    addr, port = member.get("Addr", ""), member.get("Port", 0)
    try:
        if ipaddress.ip_address(addr).version == 6:
            return f"[{addr}]:{port}"
    except ValueError:
        pass
    return f"{addr}:{port}"


def _member_row(member: dict) -> tuple[str, ...]:
    tags = member.get("Tags") or {}
    status = _MEMBER_STATUS.get(member.get("Status", 0), "unknown")
    role = {"consul": "server", "node": "client"}.get(tags.get("role", ""))
    name, addr = member.get("Name", ""), _member_addr(member)
    if role is None:
        return (name, addr, status, "unknown", "", "", "", "", "")
    build = tags.get("build", "") or "< 0.3"
    build = build.split(":", 1)[0]
    protocol = tags.get("vsn") or str(member.get("ProtocolCur", ""))
    partition = tags.get("ap") or "default"
    if partition == "default":
        segment = "<all>" if role == "server" else (tags.get("segment") or "<default>")
    else:
        segment = ""
    return (name, addr, status, role, build, protocol, tags.get("dc", ""), partition, segment)


def cmd_members(args: argparse.Namespace) -> int:
    _no_positional(args)
    try:
        status_re = re.compile(args.status)
    except re.error as exc:
        raise CommandError(f"Failed to compile status regexp: {exc}") from None
    client = Client.from_args(args)
    try:
        members = client.get_json(
            "/v1/agent/members", [("wan", args.wan or None), ("filter", args.filter)]
        )
    except ApiError as exc:
        raise api_failure("Error retrieving members", exc, client) from None
    members = [
        m
        for m in members or []
        if status_re.search(_MEMBER_STATUS.get(m.get("Status", 0), "unknown"))
    ]
    if not members:
        return 2  # consul's exit code for "no member matches"
    # Servers first, then by name (consul also orders partitions and segments).
    members.sort(key=lambda m: ((m.get("Tags") or {}).get("role") != "consul", m.get("Name", "")))
    if args.detailed:
        rows = [("Node", "Address", "Status", "Tags")]
        for m in members:
            tags = ",".join(f"{k}={v}" for k, v in sorted((m.get("Tags") or {}).items()))
            status = _MEMBER_STATUS.get(m.get("Status", 0), "unknown")
            rows.append((m.get("Name", ""), _member_addr(m), status, tags))
    else:
        rows = [
            ("Node", "Address", "Status", "Type", "Build", "Protocol", "DC", "Partition", "Segment")
        ]
        rows += [_member_row(m) for m in members]
    out(columnize(rows))
    return 0


def _positional_sink(p: argparse.ArgumentParser) -> None:
    # Collected so that a stray argument gets consul's "Too many arguments" message.
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)


def register(sub: argparse._SubParsersAction) -> None:
    cat = add_group(
        sub,
        "catalog",
        "List services, nodes and datacenters in the catalog",
        """
        $ mesh catalog services -tags
        $ mesh catalog nodes -service=web
        $ mesh catalog datacenters
        """,
    )

    p = add_command(
        cat,
        "services",
        cmd_services,
        "List the services registered in a datacenter",
        """
Prints one service name per line, sorted; -tags adds each service's tags as a
comma-separated list; -node lists the services of one node only.""",
        """
        $ mesh catalog services
        $ mesh catalog services -tags
        $ mesh catalog services -node=web-01
        $ mesh catalog services -node-meta=rack=r1 -format=json
        """,
    )
    p.add_argument("-node", "--node", help="list the services on this node (name or ID)")
    p.add_argument(
        "-node-meta",
        "--node-meta",
        dest="node_meta",
        type=key_value,
        action="append",
        metavar="KEY=VALUE",
        help="only services on nodes with this metadata (repeatable)",
    )
    p.add_argument("-tags", "--tags", action="store_true", help="show each service's tags")
    add_format_option(p)
    _positional_sink(p)

    p = add_command(
        cat,
        "nodes",
        cmd_nodes,
        "List the nodes in a datacenter",
        """
Prints a table of Node, ID (first group), Address and DC; -detailed shows the
full ID, tagged addresses and metadata; -service lists only the nodes that
provide a service.""",
        """
        $ mesh catalog nodes
        $ mesh catalog nodes -detailed
        $ mesh catalog nodes -service=web
        $ mesh catalog nodes -node-meta=rack=r1
        $ mesh catalog nodes -filter='Meta.env == "prod"'
        """,
    )
    p.add_argument("-service", "--service", help="only nodes providing this service")
    p.add_argument(
        "-detailed",
        "--detailed",
        action="store_true",
        help="full IDs, tagged addresses and metadata",
    )
    p.add_argument(
        "-node-meta",
        "--node-meta",
        dest="node_meta",
        type=key_value,
        action="append",
        metavar="KEY=VALUE",
        help="only nodes with this metadata (repeatable)",
    )
    p.add_argument("-filter", "--filter", help="a filter expression (as ?filter= takes)")
    p.add_argument("-near", "--near", help="sort by estimated round-trip time from this node")
    add_format_option(p)
    _positional_sink(p)

    p = add_command(
        cat,
        "datacenters",
        cmd_datacenters,
        "List the known datacenters",
        examples="""
        $ mesh catalog datacenters
        """,
    )
    add_format_option(p)
    _positional_sink(p)

    p = add_command(
        sub,
        "members",
        cmd_members,
        "List the members of the mesh (the control plane's server nodes and agents)",
        """
Prints Node, Address, Status, Type, Build, Protocol, DC, Partition and Segment
for each member, servers first. Exits 2 when no member matches -status.""",
        """
        $ mesh members
        $ mesh members -detailed
        $ mesh members -status=alive
        """,
    )
    p.add_argument(
        "-detailed", "--detailed", action="store_true", help="show every member tag instead"
    )
    p.add_argument(
        "-status",
        "--status",
        default=".*",
        help="only members whose status matches this regular expression",
    )
    p.add_argument("-wan", "--wan", action="store_true", help="list the WAN pool's members")
    p.add_argument("-filter", "--filter", help="a filter expression (as ?filter= takes)")
    _positional_sink(p)
