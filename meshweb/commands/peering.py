"""`mesh peering generate-token|establish|list|read|delete`: cluster peering (`/v1/peering`).

As Consul's `consul peering`: the accepting cluster generates a token for a
peer name, the dialing cluster establishes with it, either side lists, reads
and deletes. Needs `peering:write` (`peering:read` to list and read) when
ACLs are on.
"""

from __future__ import annotations

import argparse

from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    add_format_option,
    add_group,
    add_meta_option,
    add_name_option,
    api_failure,
    columnize,
    get_or_fail,
    load_data_source,
    out,
    out_json,
    out_json_or_none,
    path_escape,
)


def cmd_generate_token(args: argparse.Namespace) -> int:
    body: dict = {"PeerName": args.name}
    if args.meta:
        body["Meta"] = dict(args.meta)
    if args.addresses:
        body["ServerExternalAddresses"] = [a for a in args.addresses.split(",") if a]
    if args.expires_in:
        body["ExpiresIn"] = args.expires_in
    client = Client.from_args(args)
    try:
        data = client.post_json("/v1/peering/token", body)
    except ApiError as exc:
        raise api_failure("Error generating peering token", exc, client) from None
    if args.format == "json":
        out_json(data)
    else:
        out(data["PeeringToken"])
    return 0


def cmd_establish(args: argparse.Namespace) -> int:
    token = load_data_source(args.token, "peering token").strip()
    body: dict = {"PeerName": args.name, "PeeringToken": token}
    if args.meta:
        body["Meta"] = dict(args.meta)
    client = Client.from_args(args)
    try:
        client.post_json("/v1/peering/establish", body)
    except ApiError as exc:
        raise api_failure("Error establishing peering", exc, client) from None
    out(f'Successfully established peering connection with "{args.name}"')
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    peerings = get_or_fail(client, "/v1/peerings", "Error listing peerings")
    if out_json_or_none(args, peerings, "There are no peering connections."):
        return 0
    rows = [["Name", "State", "Imported Svcs", "Exported Svcs", "Peer Trust Domain"]]
    for p in peerings:
        status = p.get("StreamStatus") or {}
        rows.append(
            [
                p["Name"],
                p["State"],
                str(len(status.get("ImportedServices") or [])),
                str(len(status.get("ExportedServices") or [])),
                p.get("PeerTrustDomain") or "-",
            ]
        )
    out(columnize(rows))
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    try:
        p = client.get_json(f"/v1/peering/{path_escape(args.name)}")
    except ApiError as exc:
        if exc.status == 404:
            raise CommandError(f'No peering with name "{args.name}" found.') from None
        raise api_failure("Error reading peering", exc, client) from None
    if args.format == "json":
        out_json(p)
        return 0
    status = p.get("StreamStatus") or {}
    out(f"Name:         {p['Name']}")
    out(f"ID:           {p['ID']}")
    out(f"State:        {p['State']}")
    out(f"Peer ID:      {p.get('PeerID') or '-'}")
    out(f"Trust domain: {p.get('PeerTrustDomain') or '-'}")
    out(f"Datacenter:   {(p.get('Remote') or {}).get('Datacenter') or '-'}")
    out(f"Servers:      {', '.join(p.get('PeerServerAddresses') or []) or '-'}")
    out(f"CA roots:     {len(p.get('PeerCAPems') or [])}")
    out(f"Imported:     {', '.join(status.get('ImportedServices') or []) or '-'}")
    out(f"Exported:     {', '.join(status.get('ExportedServices') or []) or '-'}")
    out(f"Last receive: {status.get('LastReceive')}")
    out(f"Last send:    {status.get('LastSend')}")
    if p.get("LastError"):
        out(f"Last error:   {p['LastError']}")
    for k, v in sorted((p.get("Meta") or {}).items()):
        out(f"Meta:         {k}={v}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    try:
        client.request("DELETE", f"/v1/peering/{path_escape(args.name)}")
    except ApiError as exc:
        raise api_failure("Error deleting peering", exc, client) from None
    out(f'Successfully submitted peering connection, "{args.name}", for deletion')
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(
        sub,
        "peering",
        "Peer this cluster with another control plane (cluster peering)",
        """
        $ mesh peering generate-token -name cluster-b > token    # on the accepting cluster
        $ mesh peering establish -name cluster-a -peering-token @token    # on the dialer
        $ mesh peering list
        $ mesh peering read -name cluster-a
        $ mesh peering delete -name cluster-a
        """,
    )
    p = add_command(
        group,
        "generate-token",
        cmd_generate_token,
        "Generate a peering token for another cluster to establish with",
        "The token is signed, single-use and expires (-expires-in, default 1h). It carries "
        "this cluster's server addresses and the pin of its CA roots; hand it to the other "
        "cluster's operator over a channel you trust.",
        "$ mesh peering generate-token -name cluster-b -server-external-addresses 10.0.0.5:8500",
    )
    add_format_option(p)
    add_name_option(p, "the name this cluster gives the peer", required=True)
    add_meta_option(p, "metadata for the peering (repeatable)")
    p.add_argument(
        "-server-external-addresses",
        "--server-external-addresses",
        dest="addresses",
        default="",
        metavar="ADDR,...",
        help="host:port addresses the peer reaches this cluster's API at "
        "(default: MESH_PEERING_ADDRESSES, else the server's HTTP address)",
    )
    p.add_argument(
        "-expires-in",
        "--expires-in",
        dest="expires_in",
        default="",
        metavar="DURATION",
        help="how long the token stays usable (default 1h, at most 168h)",
    )

    p = add_command(
        group,
        "establish",
        cmd_establish,
        "Establish a peering with the cluster that generated a token",
        examples="$ mesh peering establish -name cluster-a -peering-token @token.txt",
    )
    add_name_option(p, "the name this cluster gives the peer", required=True)
    add_meta_option(p, "metadata for the peering (repeatable)")
    p.add_argument(
        "-peering-token",
        "--peering-token",
        dest="token",
        required=True,
        metavar="TOKEN",
        help="the token, or @file, or - for stdin",
    )

    p = add_command(group, "list", cmd_list, "List peerings", examples="$ mesh peering list")
    add_format_option(p)

    p = add_command(
        group, "read", cmd_read, "Show one peering", examples="$ mesh peering read -name cluster-a"
    )
    add_format_option(p)
    add_name_option(p, "the peering's name", required=True)

    p = add_command(
        group,
        "delete",
        cmd_delete,
        "Delete a peering: imported services and the peer's trust go at once",
        examples="$ mesh peering delete -name cluster-a",
    )
    add_name_option(p, "the peering's name", required=True)
