"""`mesh intention create|delete|get|list|check|match`: intentions over
`/v1/connect/intentions`, with consul intention's arguments, output and exit codes.

SRC and DST are `NAME` or `NAMESPACE/NAME`; `*` is the whole-name wildcard.
`check` exits 0 when allowed, 2 when denied and 1 on error, as consul's does.
"""

from __future__ import annotations

import argparse
import json
import re

from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    add_format_option,
    add_group,
    add_meta_option,
    api_failure,
    columnize,
    get_or_fail,
    load_data_source,
    out,
    out_json,
    out_json_or_none,
    path_escape,
)

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
DENIED_EXIT = 2


def _name(ns: str | None, name: str) -> str:
    return name if ns in (None, "", "default") else f"{ns}/{name}"


def describe(ixn: dict) -> str:
    """consul's `web => db (allow)` (or `(2 permissions)` for an L7 intention)."""
    perms = ixn.get("Permissions") or []
    if not perms:
        detail = ixn.get("Action", "")
    elif len(perms) == 1:
        detail = "1 permission"
    else:
        detail = f"{len(perms)} permissions"
    source = _name(ixn.get("SourceNS"), ixn.get("SourceName", ""))
    destination = _name(ixn.get("DestinationNS"), ixn.get("DestinationName", ""))
    return f"{source} => {destination} ({detail})"


def _pair(args: argparse.Namespace, verb: str) -> tuple[str, str]:
    if len(args.args) != 2:
        raise CommandError(
            f"Error! {verb} needs SRC and DST (got {len(args.args)} argument"
            f"{'' if len(args.args) == 1 else 's'})"
        )
    return args.args[0], args.args[1]


def _find(client: Client, args: argparse.Namespace, verb: str) -> dict:
    """The intention named by `ID` or `SRC DST` (1 argument or 2)."""
    try:
        if len(args.args) == 1 and _UUID.match(args.args[0]):
            resp = client.get(f"/v1/connect/intentions/{path_escape(args.args[0])}", ok=(200, 404))
        elif len(args.args) == 2:
            src, dst = args.args
            resp = client.get(
                "/v1/connect/intentions/exact", {"source": src, "destination": dst}, ok=(200, 404)
            )
        else:
            raise CommandError(f"Error! {verb} needs an intention ID, or SRC and DST")
    except ApiError as exc:
        raise api_failure("Error reading the intention", exc, client) from None
    if resp.status == 404:
        raise CommandError("Error: Intention not found.")
    return resp.json()


# --------------------------------------------------------------------------- commands


def _intentions_from_args(args: argparse.Namespace) -> list[dict]:
    if args.file:
        if not args.args:
            raise CommandError("Error! -file needs at least one FILE argument")
        out_list = []
        for path in args.args:
            text = load_data_source(f"@{path}" if path != "-" else "-", "intention file")
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CommandError(f"Error! {path} is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise CommandError(f"Error! {path} must hold one intention (a JSON object)")
            out_list.append(data)
        return out_list
    src, dst = _pair(args, "create")
    body: dict = {
        "SourceName": src.split("/")[-1],
        "DestinationName": dst.split("/")[-1],
        "SourceType": "consul",
        "Action": "deny" if args.deny else "allow",
    }
    if "/" in src:
        body["SourceNS"] = src.split("/")[0]
    if "/" in dst:
        body["DestinationNS"] = dst.split("/")[0]
    if args.meta:
        body["Meta"] = dict(args.meta)
    if args.description:
        body["Description"] = args.description
    return [body]


def cmd_create(args: argparse.Namespace) -> int:
    if args.allow and args.deny:
        raise CommandError("Error! Only one of -allow or -deny may be specified")
    client = Client.from_args(args)
    for ixn in _intentions_from_args(args):
        try:
            if args.replace:
                source = _name(ixn.get("SourceNS"), ixn.get("SourceName", ""))
                destination = _name(ixn.get("DestinationNS"), ixn.get("DestinationName", ""))
                body = {k: v for k, v in ixn.items() if not k.startswith(("Source", "Destination"))}
                body["SourceType"] = ixn.get("SourceType", "consul")
                client.request(
                    "PUT",
                    "/v1/connect/intentions/exact",
                    {"source": source, "destination": destination},
                    body=json.dumps(body).encode(),
                )
            else:
                client.request("POST", "/v1/connect/intentions", body=json.dumps(ixn).encode())
        except ApiError as exc:
            raise api_failure(f"Error creating intention {describe(ixn)!r}", exc, client) from None
        out(f"Created: {describe(ixn)}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    try:
        if len(args.args) == 1 and _UUID.match(args.args[0]):
            client.request("DELETE", f"/v1/connect/intentions/{path_escape(args.args[0])}")
        elif len(args.args) == 2:
            src, dst = args.args
            client.request(
                "DELETE", "/v1/connect/intentions/exact", {"source": src, "destination": dst}
            )
        else:
            raise CommandError("Error! delete needs an intention ID, or SRC and DST")
    except ApiError as exc:
        if exc.status == 404:
            raise CommandError("Error: Intention not found.") from None
        raise api_failure("Error deleting intention", exc, client) from None
    out("Intention deleted.")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    ixn = _find(client, args, "get")
    if args.format == "json":
        out_json(ixn)
        return 0
    rows = [
        ("Source:", _name(ixn.get("SourceNS"), ixn.get("SourceName", ""))),
        ("Destination:", _name(ixn.get("DestinationNS"), ixn.get("DestinationName", ""))),
    ]
    if ixn.get("Permissions"):
        rows.append(("Permissions:", json.dumps(ixn["Permissions"])))
    else:
        rows.append(("Action:", ixn.get("Action", "")))
    rows += [
        ("ID:", ixn.get("ID", "")),
        ("Precedence:", str(ixn.get("Precedence", 0))),
    ]
    if ixn.get("Description"):
        rows.append(("Description:", ixn["Description"]))
    for key in sorted(ixn.get("Meta") or {}):
        rows.append((f"Meta[{key}]:", ixn["Meta"][key]))
    rows.append(("Created At:", ixn.get("CreatedAt", "")))
    out(columnize(rows))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    listed = get_or_fail(
        client,
        "/v1/connect/intentions",
        "Error listing intentions",
        {"filter": args.filter or None},
    )
    if out_json_or_none(args, listed, "There are no intentions."):
        return 0
    rows = [("ID", "Source", "Action", "Destination", "Precedence")]
    for ixn in listed:
        action = ixn.get("Action") or f"{len(ixn.get('Permissions') or [])} permissions"
        rows.append(
            (
                ixn.get("ID", ""),
                _name(ixn.get("SourceNS"), ixn.get("SourceName", "")),
                action,
                _name(ixn.get("DestinationNS"), ixn.get("DestinationName", "")),
                str(ixn.get("Precedence", 0)),
            )
        )
    out(columnize(rows))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    src, dst = _pair(args, "check")
    client = Client.from_args(args)
    try:
        if args.explain:
            answer = client.get_json("/api/intentions/check/", {"source": src, "destination": dst})
            allowed, reason = bool(answer.get("allowed")), answer.get("reason", "")
        else:
            answer = client.get_json(
                "/v1/connect/intentions/check", {"source": src, "destination": dst}
            )
            allowed, reason = bool(answer.get("Allowed")), ""
    except ApiError as exc:
        raise api_failure("Error checking the connection", exc, client) from None
    out("Allowed" if allowed else "Denied")
    if reason:
        out(reason)
    return 0 if allowed else DENIED_EXIT


def cmd_match(args: argparse.Namespace) -> int:
    if args.source and args.destination:
        raise CommandError("Error! Only one of -source or -destination may be specified")
    if len(args.args) != 1:
        raise CommandError("Error! match needs exactly one service name")
    name = args.args[0]
    by = "source" if args.source else "destination"
    client = Client.from_args(args)
    found = get_or_fail(
        client,
        "/v1/connect/intentions/match",
        "Error matching intentions",
        {"by": by, "name": name},
    )
    for ixn in (found or {}).get(name, []):
        out(describe(ixn))
    return 0


# --------------------------------------------------------------------------- parsers


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(
        sub,
        "intention",
        "Create, inspect and check intentions (who may call whom)",
        """
        $ mesh intention create web db
        $ mesh intention create -deny '*' db
        $ mesh intention check web db
        $ mesh intention list
        """,
    )

    p = add_command(
        group,
        "create",
        cmd_create,
        "Create an L4 intention from SRC to DST (allow unless -deny)",
        """
Fails when SRC => DST already has an intention, unless -replace is given
(which replaces it in place). With -file, each FILE holds one intention as
JSON in Consul's shape (SourceName, DestinationName, Action or Permissions,
Description, Meta).""",
        """
        $ mesh intention create web db
        $ mesh intention create -deny -meta team=data '*' db
        $ mesh intention create -replace -allow web db
        $ mesh intention create -file web-to-db.json
        """,
    )
    p.add_argument(
        "args", nargs="*", metavar="SRC DST | FILE", help="source and destination, or files"
    )
    p.add_argument("-allow", "--allow", action="store_true", help="allow the connection (default)")
    p.add_argument("-deny", "--deny", action="store_true", help="deny the connection")
    p.add_argument(
        "-file", "--file", action="store_true", help="read intentions from FILE arguments"
    )
    add_meta_option(p, "metadata (repeatable)")
    p.add_argument("-description", "--description", default="", help="a description")
    p.add_argument(
        "-replace", "--replace", action="store_true", help="replace an existing intention"
    )

    p = add_command(
        group,
        "delete",
        cmd_delete,
        "Delete the intention from SRC to DST (or with that ID)",
        'Prints "Intention deleted."; deleting SRC DST that has none succeeds, as consul\'s.',
        """
        $ mesh intention delete web db
        $ mesh intention delete 3a5b1e55-0c4a-4e08-9d54-96c2f4c4b6f1
        """,
    )
    p.add_argument("args", nargs="*", metavar="SRC DST | ID")

    p = add_command(
        group,
        "get",
        cmd_get,
        "Show one intention (by SRC and DST, or by ID)",
        "",
        """
        $ mesh intention get web db
        $ mesh intention get -format=json web db
        """,
    )
    p.add_argument("args", nargs="*", metavar="SRC DST | ID")
    add_format_option(p)

    p = add_command(
        group,
        "list",
        cmd_list,
        "List every intention with its ID and precedence",
        "Highest precedence first (the order decisions consider them in).",
        """
        $ mesh intention list
        $ mesh intention list -filter 'DestinationName == "db"'
        """,
    )
    p.add_argument("-filter", "--filter", default="", help="a Consul filter expression")
    add_format_option(p)

    p = add_command(
        group,
        "check",
        cmd_check,
        "Check whether SRC may connect to DST (exit 0 allowed, 2 denied)",
        """
Prints Allowed or Denied for an L4 connection. An L7 intention (one with
Permissions) counts as Denied here: it is decided request by request. With
-explain, also prints which intention decided (or that the default did).""",
        """
        $ mesh intention check web db
        $ mesh intention check -explain web db
        """,
    )
    p.add_argument("args", nargs="*", metavar="SRC DST")
    p.add_argument("-explain", "--explain", action="store_true", help="print the reason too")

    p = add_command(
        group,
        "match",
        cmd_match,
        "List the intentions that apply to a service, in evaluation order",
        "By destination unless -source is given.",
        """
        $ mesh intention match db
        $ mesh intention match -source web
        """,
    )
    p.add_argument("args", nargs="*", metavar="NAME")
    p.add_argument("-source", "--source", action="store_true", help="match NAME as a source")
    p.add_argument(
        "-destination", "--destination", action="store_true", help="match NAME as a destination"
    )
