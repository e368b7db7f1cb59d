"""`mesh join-token create|list|revoke`: tokens per-host agents join with (`/api/join-tokens/`).

`create` prints the token (shown once), the CA pin the agent checks the
control plane against, and the `mesh agent` command line to run on the host.
Needs a token with `acl:write` (`acl:read` to list) when ACLs are on.

Scope: `-service NAME` (repeatable; `api-*` a prefix, `'*'` any) lists what a
node that joins with the token may register; with none, the node may register
no services. `-node NAME` binds the token to one node name.
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
    api_failure,
    api_message,
    columnize,
    out,
    out_json,
    out_json_or_none,
    path_escape,
)


def _failure(prefix: str, exc: ApiError, client: Client) -> CommandError:
    return api_failure(prefix, api_message(exc), client)


def _uses(token: dict) -> str:
    if not token.get("max_uses"):
        return f"{token.get('uses', 0)} (unlimited)"
    return f"{token.get('uses', 0)}/{token['max_uses']}"


def cmd_create(args: argparse.Namespace) -> int:
    if args.uses < 0:
        raise CommandError("-uses must be 0 (unlimited) or a positive integer")
    body = {"ttl": args.ttl, "uses": args.uses, "description": args.description or ""}
    if args.datacenter:
        body["datacenter"] = args.datacenter
    body["services"] = list(args.services or [])
    if args.node:
        body["node"] = args.node
    client = Client.for_api(args)  # the token's datacenter is in the body
    try:
        data = client.post_json("/api/join-tokens/", body, ok=(200, 201))
    except ApiError as exc:
        raise _failure("Error creating the join token", exc, client) from None
    if args.format == "json":
        out_json(data)
        return 0
    out(f"Token:       {data['token']}")
    out(f"CA pin:      {data['ca_pin']}")
    out(f"ID:          {data['id']}")
    out(f"Datacenter:  {data['datacenter']}")
    out(f"Uses:        {'unlimited' if not data['max_uses'] else data['max_uses']}")
    out(f"Expires:     {data['expires_at']}")
    out(f"Node:        {data.get('node_name') or '(any name)'}")
    services = data.get("services") or []
    out(f"Services:    {', '.join(services) if services else '(none: -service to allow some)'}")
    if data.get("description"):
        out(f"Description: {data['description']}")
    out("")
    out("Run on the new host (the token is shown only this once):")
    out(f"  {data['agent_command']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client = Client.for_api(args)
    tokens: list[dict] = []
    offset = 0
    try:
        while True:
            page = client.get_json("/api/join-tokens/", {"limit": 1000, "offset": offset})
            tokens.extend(page.get("results") or [])
            if not page.get("next"):
                break
            offset += 1000
    except ApiError as exc:
        raise _failure("Error listing join tokens", exc, client) from None
    if out_json_or_none(args, tokens, "No join tokens"):
        return 0
    rows = [
        ["ID", "State", "Uses", "Expires", "Datacenter", "Services", "Last used by", "Description"]
    ]
    for t in tokens:
        rows.append(
            [
                t["id"],
                t["state"],
                _uses(t),
                t.get("expires_at") or "never",
                t.get("datacenter", ""),
                ",".join(t.get("services") or []) or "-",
                t.get("last_used_by") or "-",
                t.get("description", ""),
            ]
        )
    out(columnize(rows))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    token_id = args.id.split(".", 1)[0]  # the whole token works too
    client = Client.for_api(args)
    path = f"/api/join-tokens/{path_escape(token_id)}/" + ("?nodes=true" if args.nodes else "")
    try:
        client.request("DELETE", path)
    except ApiError as exc:
        raise _failure(f"Error revoking join token {token_id}", exc, client) from None
    out(
        f"Revoked join token {token_id}"
        + (" and the nodes that joined with it" if args.nodes else "")
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(
        sub,
        "join-token",
        "Create, list and revoke the tokens per-host agents join the mesh with",
        """
        $ mesh join-token create -ttl 1h -service web
        $ mesh join-token create -uses 0 -ttl 24h -service 'web*' -description "autoscaling group web"
        $ mesh join-token list
        $ mesh join-token revoke -nodes 3f9c0a1b2c3d4e5f
        """,
    )
    p = add_command(
        group,
        "create",
        cmd_create,
        "Create a join token and print it with the CA pin and the agent command",
        "A single-use token (-uses 1, the default) lets one host join; -uses 0 any number "
        "until it expires. The joined node may register only the services named with "
        "-service (none by default; '*' for any). Needs acl:write.",
        """
        $ mesh join-token create -service web
        $ mesh join-token create -ttl 30m -uses 5 -service 'api-*' -description "rack 12"
        $ mesh join-token create -node web-1 -service web -format=json
        """,
    )
    add_format_option(p)
    p.add_argument(
        "-ttl", "--ttl", dest="ttl", default="1h", metavar="DURATION", help="validity (default 1h)"
    )
    p.add_argument(
        "-uses",
        "--uses",
        dest="uses",
        type=int,
        default=1,
        metavar="N",
        help="how many hosts may join with it; 0 for unlimited (default 1)",
    )
    p.add_argument("-description", "--description", dest="description", default="", metavar="TEXT")
    p.add_argument(
        "-service",
        "--service",
        dest="services",
        action="append",
        metavar="NAME",
        help="a service the node may register (repeatable; 'api-*' a prefix, '*' any); "
        "default: none",
    )
    p.add_argument(
        "-node", "--node", dest="node", default="", metavar="NAME", help="the only node name"
    )

    p = add_command(
        group,
        "list",
        cmd_list,
        "List join tokens (never their secrets)",
        examples="$ mesh join-token list",
    )
    add_format_option(p)

    p = add_command(
        group,
        "revoke",
        cmd_revoke,
        "Revoke a join token; with -nodes also the nodes that joined with it",
        "Without -nodes, agents that joined with it stay joined. With -nodes their node "
        "certificates are refused at once and their services leave the catalog.",
        examples="$ mesh join-token revoke -nodes 3f9c0a1b2c3d4e5f",
    )
    p.add_argument(
        "-nodes",
        "--nodes",
        dest="nodes",
        action="store_true",
        help="also revoke every node that joined with the token",
    )
    p.add_argument("id", metavar="ID", help="the token's ID (the part before the dot)")
