"""`mesh config write|read|list|delete`: config entries over `/v1/config`, as `consul config`.

`write` takes a file (or `-` for stdin) in HCL or JSON, as `consul config
write` does: HCL is Consul's (HCL1: `Match { HTTP { PathPrefix = "/" } }`
blocks inside lists work), field names may be CamelCase or snake_case; the
server validates and answers with the field at fault.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    add_group,
    add_name_option,
    api_failure,
    out,
    out_json,
    path_escape,
    uint,
)


def _field(entry: dict, name: str) -> Any:
    want = name.lower()
    for key, value in entry.items():
        if str(key).replace("_", "").lower() == want:
            return value
    return None


def parse_entry(text: str, source: str) -> dict:
    """A config entry from HCL or JSON text (JSON first when it looks like JSON)."""
    stripped = text.lstrip()
    data: Any
    try:
        if stripped.startswith("{"):
            data = json.loads(text)
        else:
            import hcl  # pyhcl: HCL1, the dialect Consul's config entry files use

            data = hcl.loads(text)
    except Exception as exc:  # json and pyhcl raise many types; all mean "bad input"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CommandError(f"Failed to decode config entry input from {source}: {detail}") from None
    if not isinstance(data, dict) or not data:
        raise CommandError(f"Failed to decode config entry input from {source}: not an entry")
    if not _field(data, "kind"):
        raise CommandError(f"Failed to decode config entry input from {source}: Kind is required")
    return data


def _read_source(source: str) -> str:
    if source == "-":
        try:
            return sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise CommandError(f"Failed to read stdin: {exc}") from None
    try:
        with open(source, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CommandError(f"Failed to read file {source}: {reason}") from None


def _label(entry: dict) -> str:
    kind = _field(entry, "kind")
    name = _field(entry, "name") or ("mesh" if kind == "mesh" else "")
    return f"{kind}/{name}"


def cmd_write(args: argparse.Namespace) -> int:
    if len(args.source) != 1:
        raise CommandError(
            "Must provide exactly one positional argument to specify the config entry to write"
        )
    entry = parse_entry(_read_source(args.source[0]), args.source[0])
    client = Client.from_args(args)
    params = {"cas": args.modify_index} if args.cas else None
    try:
        resp = client.request("PUT", "/v1/config", params, body=json.dumps(entry).encode())
    except ApiError as exc:
        raise api_failure(f"Error writing config entry {_label(entry)}", exc, client) from None
    if resp.json() is not True:
        raise CommandError(f"Config entry not updated: {_label(entry)}")
    out(f"Config entry written: {_label(entry)}")
    _warn(resp)
    return 0


def _warn(resp) -> None:
    """The server's warnings about the entry (a failover that can never trigger)."""
    text = next((v for k, v in resp.headers.items() if k.lower() == "x-mesh-warning"), "")
    for line in filter(None, (w.strip() for w in text.split(" | "))):
        print(f"Warning: {line}", file=sys.stderr)


def _need(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if not getattr(args, name):
            raise CommandError(f"Must specify the -{name} parameter")


def cmd_read(args: argparse.Namespace) -> int:
    _need(args, "kind", "name")
    client = Client.from_args(args)
    try:
        resp = client.get(f"/v1/config/{path_escape(args.kind)}/{path_escape(args.name)}")
    except ApiError as exc:
        raise api_failure(
            f"Error reading config entry {args.kind}/{args.name}", exc, client
        ) from None
    out_json(resp.json())
    _warn(resp)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    _need(args, "kind")
    client = Client.from_args(args)
    params = {"filter": args.filter} if args.filter else None
    try:
        found = client.get_json(f"/v1/config/{path_escape(args.kind)}", params)
    except ApiError as exc:
        raise api_failure(
            f"Error listing config entries for kind {args.kind}", exc, client
        ) from None
    for entry in found or []:
        out(entry.get("Name", ""))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    if args.filename:
        if args.kind or args.name:
            raise CommandError("Cannot specify -filename together with -kind or -name")
        entry = parse_entry(_read_source(args.filename), args.filename)
        kind = _field(entry, "kind")
        name = _field(entry, "name") or ("mesh" if kind == "mesh" else "")
    else:
        _need(args, "kind", "name")
        kind, name = args.kind, args.name
    if args.cas and not args.modify_index:
        raise CommandError("Must specify a -modify-index greater than 0 with -cas")
    client = Client.from_args(args)
    params = {"cas": args.modify_index} if args.cas else None
    try:
        resp = client.request(
            "DELETE", f"/v1/config/{path_escape(kind)}/{path_escape(name)}", params
        )
    except ApiError as exc:
        raise api_failure(f"Error deleting config entry {kind}/{name}", exc, client) from None
    if args.cas and resp.json() is not True:
        raise CommandError(f"Config entry not deleted: {kind}/{name}")
    out(f"Config entry deleted: {kind}/{name}")
    return 0


def _cas_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-cas",
        "--cas",
        action="store_true",
        help="check-and-set: act only if the entry's ModifyIndex is -modify-index",
    )
    p.add_argument(
        "-modify-index",
        "--modify-index",
        dest="modify_index",
        type=uint,
        default=0,
        metavar="INDEX",
        help="with -cas, the ModifyIndex the entry must still have (0: must not exist yet)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(
        sub,
        "config",
        "Write, read, list and delete config entries",
        """
        $ mesh config write web-defaults.hcl
        $ mesh config read -kind service-defaults -name web
        $ mesh config list -kind service-router
        $ mesh config delete -kind service-router -name web
        """,
    )

    p = add_command(
        group,
        "write",
        cmd_write,
        "Create or update a config entry from a file (HCL or JSON), or - for stdin",
        """
The file holds one entry (Kind, Name and the kind's fields), in HCL or JSON,
as for `consul config write`. Prints "Config entry written: KIND/NAME"; a
failed -cas prints "Config entry not updated: KIND/NAME" and exits 1.""",
        """
        $ mesh config write web-router.hcl
        $ mesh config write -cas -modify-index=42 web-router.hcl
        $ cat web.json | mesh config write -
        """,
    )
    p.add_argument("source", nargs="*", metavar="FILE", help="entry file, or - for stdin")
    _cas_options(p)

    p = add_command(
        group,
        "read",
        cmd_read,
        "Show one config entry as JSON",
        examples="$ mesh config read -kind service-defaults -name web",
    )
    p.add_argument("-kind", "--kind", dest="kind", help="the entry's kind")
    add_name_option(p, "the entry's name")

    p = add_command(
        group,
        "list",
        cmd_list,
        "List the names of the config entries of one kind",
        examples="$ mesh config list -kind service-resolver",
    )
    p.add_argument("-kind", "--kind", dest="kind", help="the kind to list")
    p.add_argument("-filter", "--filter", dest="filter", help="a Consul filter expression")

    p = add_command(
        group,
        "delete",
        cmd_delete,
        "Delete a config entry (by -kind and -name, or as named in -filename)",
        examples="""
        $ mesh config delete -kind service-router -name web
        $ mesh config delete -filename web-router.hcl
        $ mesh config delete -cas -modify-index=42 -kind service-router -name web
        """,
    )
    p.add_argument("-kind", "--kind", dest="kind", help="the entry's kind")
    add_name_option(p, "the entry's name")
    p.add_argument(
        "-filename", "--filename", dest="filename", help="take kind and name from this file"
    )
    _cas_options(p)
