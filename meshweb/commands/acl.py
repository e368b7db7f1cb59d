"""`mesh acl bootstrap|token|policy|role`: ACL management over /v1/acl/*, as consul prints it."""

from __future__ import annotations

import argparse
import base64
import binascii
import re
from collections.abc import Callable

from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    add_format_option,
    add_group,
    add_name_option,
    api_failure,
    get_or_fail,
    load_data_source,
    out,
    out_json,
)

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_GO_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:?\d{2})?$")


def go_time(value: str | None) -> str:
    """An RFC 3339 time as Go's time.Time prints it (`2018-12-06 18:03:23.7426 +0000 UTC`)."""
    if not value:
        return "0001-01-01 00:00:00 +0000 UTC"
    m = _GO_TIME.match(value)
    if not m:
        return value
    date, clock, frac, zone = m.groups()
    text = f"{date} {clock}"
    if frac and frac.rstrip("0"):
        text += "." + frac.rstrip("0")
    if zone in (None, "Z"):
        return text + " +0000 UTC"
    offset = zone.replace(":", "")
    return f"{text} {offset} {offset}"


def _policy_lines(token: dict) -> list[str]:
    lines: list[str] = []
    if token.get("Policies"):
        lines.append("Policies:")
        lines += [f"   {p.get('ID', '')} - {p.get('Name', '')}" for p in token["Policies"]]
    if token.get("Roles"):
        lines.append("Roles:")
        lines += [f"   {r.get('ID', '')} - {r.get('Name', '')}" for r in token["Roles"]]
    if token.get("ServiceIdentities"):
        lines.append("Service Identities:")
        for s in token["ServiceIdentities"]:
            dcs = ", ".join(s.get("Datacenters") or []) or "all"
            lines.append(f"   {s.get('ServiceName', '')} (Datacenters: {dcs})")
    if token.get("NodeIdentities"):
        lines.append("Node Identities:")
        for n in token["NodeIdentities"]:
            lines.append(f"   {n.get('NodeName', '')} (Datacenter: {n.get('Datacenter', '')})")
    return lines


def format_token(token: dict, meta: bool = False, listing: bool = False) -> str:
    """consul's pretty token block (`acl token read/create`, one `acl token list` entry)."""
    lines = [
        f"AccessorID:       {token.get('AccessorID', '')}",
        f"SecretID:         {token.get('SecretID', '')}",
        f"Description:      {token.get('Description', '')}",
        f"Local:            {str(bool(token.get('Local'))).lower()}",
        f"Create Time:      {go_time(token.get('CreateTime'))}",
    ]
    if token.get("ExpirationTime"):
        lines.append(f"Expiration Time:  {go_time(token['ExpirationTime'])}")
    if listing and "Legacy" in token:
        lines.append(f"Legacy:           {str(bool(token.get('Legacy'))).lower()}")
    if meta:
        lines += [
            f"Hash:             {_hash_hex(token.get('Hash'))}",
            f"Create Index:     {token.get('CreateIndex', 0)}",
            f"Modify Index:     {token.get('ModifyIndex', 0)}",
        ]
    lines += _policy_lines(token)
    if token.get("Rules"):
        lines += ["Rules:", token["Rules"]]
    return "\n".join(lines)


def _hash_hex(value: str | None) -> str:
    # The API sends the hash base64-encoded (Go []byte); consul prints it as hex.
    if not value:
        return ""
    try:
        return base64.b64decode(value).hex()
    except (binascii.Error, ValueError):
        return value


def format_policy(policy: dict, meta: bool = False) -> str:
    lines = [
        f"ID:           {policy.get('ID', '')}",
        f"Name:         {policy.get('Name', '')}",
        f"Description:  {policy.get('Description', '')}",
        f"Datacenters:  {', '.join(policy.get('Datacenters') or [])}",
    ]
    if meta:
        lines += [
            f"Hash:         {_hash_hex(policy.get('Hash'))}",
            f"Create Index: {policy.get('CreateIndex', 0)}",
            f"Modify Index: {policy.get('ModifyIndex', 0)}",
        ]
    lines.append("Rules:")
    return "\n".join(lines) + "\n" + (policy.get("Rules") or "")


def format_policy_entry(policy: dict, meta: bool = False) -> str:
    lines = [
        f"{policy.get('Name', '')}:",
        f"   ID:           {policy.get('ID', '')}",
        f"   Description:  {policy.get('Description', '')}",
        f"   Datacenters:  {', '.join(policy.get('Datacenters') or [])}",
    ]
    if meta:
        lines += [
            f"   Hash:         {_hash_hex(policy.get('Hash'))}",
            f"   Create Index: {policy.get('CreateIndex', 0)}",
            f"   Modify Index: {policy.get('ModifyIndex', 0)}",
        ]
    return "\n".join(lines)


def _show_token(args: argparse.Namespace, token: dict) -> None:
    if args.format == "json":
        out_json(token)
    else:
        out(format_token(token, meta=getattr(args, "meta", False)))


# --------------------------------------------------------------------------- commands


def cmd_bootstrap(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    try:
        token = client.put_json("/v1/acl/bootstrap", None)
    except ApiError as exc:
        raise api_failure("Failed ACL bootstrapping", exc) from None
    _show_token(args, token)
    return 0


def _resolve_policy_id(client: Client, partial: str) -> str:
    """A full policy ID from a unique prefix, as consul's -policy-id accepts."""
    if _UUID.match(partial):
        return partial
    if partial == "anonymous":
        return partial
    policies = get_or_fail(client, "/v1/acl/policies", "Error resolving policy ID") or []
    matches = [p["ID"] for p in policies if p.get("ID", "").startswith(partial)]
    if len(matches) != 1:
        what = "No such policy ID with prefix" if not matches else "Ambiguous policy ID prefix"
        raise CommandError(f"Error resolving policy ID: {what}: {partial}")
    return matches[0]


def _service_identity(text: str) -> dict:
    name, _, dcs = text.partition(":")
    if not name:
        raise CommandError(f"Error! Malformed -service-identity argument: {text!r}")
    ident: dict = {"ServiceName": name}
    if dcs:
        ident["Datacenters"] = [dc for dc in dcs.split(",") if dc]
    return ident


def _node_identity(text: str) -> dict:
    name, sep, dc = text.partition(":")
    if not name or not sep or not dc:
        raise CommandError(
            f"Error! Malformed -node-identity argument: {text!r} (expected NODE:DATACENTER)"
        )
    return {"NodeName": name, "Datacenter": dc}


def _add_links(client: Client, args: argparse.Namespace, body: dict, roles: list[dict]) -> None:
    """Put the -policy-*, role and -*-identity flags of `token|role create` into `body`."""
    policies = [{"ID": _resolve_policy_id(client, pid)} for pid in args.policy_id or []]
    policies += [{"Name": name} for name in args.policy_name or []]
    if policies:
        body["Policies"] = policies
    if roles:
        body["Roles"] = roles
    if args.service_identity:
        body["ServiceIdentities"] = [_service_identity(s) for s in args.service_identity]
    if args.node_identity:
        body["NodeIdentities"] = [_node_identity(n) for n in args.node_identity]


def cmd_token_create(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    body: dict = {"Description": args.description, "Local": args.local}
    roles = [{"ID": rid} for rid in args.role_id or []]
    roles += [{"Name": name} for name in args.role_name or []]
    _add_links(client, args, body, roles=roles)
    if args.expires_ttl:
        body["ExpirationTTL"] = args.expires_ttl
    if args.accessor:
        body["AccessorID"] = args.accessor
    if args.secret:
        body["SecretID"] = args.secret
    try:
        token = client.put_json("/v1/acl/token", body)
    except ApiError as exc:
        raise api_failure("Failed to create new token", exc, client) from None
    _show_token(args, token)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    tokens = get_or_fail(client, "/v1/acl/tokens", "Failed to retrieve the token list") or []
    if args.format == "json":
        out_json(tokens)
        return 0
    out("\n\n".join(format_token(t, meta=args.meta, listing=True) for t in tokens))
    return 0


def _create(
    args: argparse.Namespace, client: Client, noun: str, body: dict, show: Callable[..., str]
) -> int:
    """`acl policy|role create`: PUT the body, print what the server made."""
    try:
        made = client.put_json(f"/v1/acl/{noun}", body)
    except ApiError as exc:
        raise api_failure(f"Failed to create new {noun}", exc, client) from None
    if args.format == "json":
        out_json(made)
    else:
        out(show(made, meta=args.meta))
    return 0


def _list(args: argparse.Namespace, plural: str, noun: str, show: Callable[..., str]) -> int:
    """`acl policy|role list`: every one, as `show` prints an entry."""
    client = Client.from_args(args)
    rows = get_or_fail(client, f"/v1/acl/{plural}", f"Failed to retrieve the {noun} list") or []
    if args.format == "json":
        out_json(rows)
        return 0
    for row in rows:
        out(show(row, meta=args.meta))
    return 0


def _require_name(args: argparse.Namespace) -> None:
    if not args.name:
        raise CommandError("Missing required '-name' flag")


def cmd_policy_create(args: argparse.Namespace) -> int:
    _require_name(args)
    rules = load_data_source(args.rules, "rules") if args.rules else ""
    body = {
        "Name": args.name,
        "Description": args.description,
        "Rules": rules,
        "Datacenters": args.valid_datacenter or [],
    }
    return _create(args, Client.from_args(args), "policy", body, format_policy)


def cmd_policy_list(args: argparse.Namespace) -> int:
    return _list(args, "policies", "policy", format_policy_entry)


def format_role(role: dict, meta: bool = False, indent: str = "") -> str:
    """A role as `consul acl role read` prints it."""
    lines = [
        f"ID:           {role.get('ID', '')}",
        f"Name:         {role.get('Name', '')}",
        f"Description:  {role.get('Description', '')}",
    ]
    if meta:
        lines += [
            f"Hash:         {_hash_hex(role.get('Hash'))}",
            f"Create Index: {role.get('CreateIndex', 0)}",
            f"Modify Index: {role.get('ModifyIndex', 0)}",
        ]
    lines += _policy_lines(role)
    return "\n".join(indent + line for line in lines)


def format_role_entry(role: dict, meta: bool = False) -> str:
    """One role of `consul acl role list`: its name, then the role indented."""
    return f"{role.get('Name', '')}:\n" + format_role(role, meta=meta, indent="   ")


def cmd_role_create(args: argparse.Namespace) -> int:
    _require_name(args)
    client = Client.from_args(args)
    body: dict = {"Name": args.name, "Description": args.description}
    _add_links(client, args, body, roles=[])
    return _create(args, client, "role", body, format_role)


def cmd_role_list(args: argparse.Namespace) -> int:
    return _list(args, "roles", "role", format_role_entry)


# --------------------------------------------------------------------------- parsers


def _meta_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "-meta",
        "--meta",
        action="store_true",
        help=f"also show {what} metadata (hash, create and modify indexes)",
    )


def _repeatable(
    p: argparse.ArgumentParser, flag: str, help: str, metavar: str | None = None
) -> None:
    dest = flag.replace("-", "_")
    p.add_argument(f"-{flag}", f"--{flag}", dest=dest, action="append", metavar=metavar, help=help)


def _link_options(p: argparse.ArgumentParser, *, roles: bool) -> None:
    """The links `token create` and `role create` share (a token may also link roles)."""
    _repeatable(p, "policy-id", "policy ID or unique ID prefix to link (repeatable)")
    _repeatable(p, "policy-name", "policy name to link (repeatable)")
    if roles:
        _repeatable(p, "role-id", "role ID to link (repeatable)")
        _repeatable(p, "role-name", "role name to link (repeatable)")
    _repeatable(
        p, "service-identity", "service identity to link (repeatable)", metavar="NAME[:DC1,DC2]"
    )
    _repeatable(p, "node-identity", "node identity to link (repeatable)", metavar="NODE:DC")


def register(sub: argparse._SubParsersAction) -> None:
    acl = add_group(
        sub,
        "acl",
        "Bootstrap the ACL system and manage tokens and policies",
        """
        $ mesh acl bootstrap
        $ mesh acl policy create -name=web-write -rules=@web.hcl
        $ mesh acl token create -description="web" -policy-name=web-write
        """,
    )

    p = add_command(
        acl,
        "bootstrap",
        cmd_bootstrap,
        "Create the initial management token (once per cluster)",
        """
Works only while no management token exists; afterwards the server answers
403 "ACL bootstrap no longer allowed". The SecretID is shown once: keep it.""",
        """
        $ mesh acl bootstrap
        $ mesh acl bootstrap -format=json
        """,
    )
    add_format_option(p)

    token = add_group(
        acl,
        "token",
        "Create and list ACL tokens",
        """
        $ mesh acl token create -description="web" -policy-name=web-write
        $ mesh acl token list
        """,
    )
    p = add_command(
        token,
        "create",
        cmd_token_create,
        "Create a token linked to policies, roles or identities",
        """
Link policies by name (-policy-name) or by ID or unique ID prefix (-policy-id);
each flag may be given several times.""",
        """
        $ mesh acl token create -description="read-only" -policy-name=node-read
        $ mesh acl token create -policy-id=06acc965 -policy-name=web-write
        $ mesh acl token create -service-identity=web:dc1 -format=json
        """,
    )
    p.add_argument("-description", "--description", default="", help="the token's description")
    _link_options(p, roles=True)
    p.add_argument(
        "-local", "--local", action="store_true", help="a token local to this datacenter"
    )
    p.add_argument(
        "-expires-ttl", "--expires-ttl", dest="expires_ttl", help="lifetime, e.g. 1h or 30m"
    )
    p.add_argument("-accessor", "--accessor", help="use this AccessorID instead of a generated one")
    p.add_argument("-secret", "--secret", help="use this SecretID instead of a generated one")
    _meta_option(p, "token")
    add_format_option(p)

    p = add_command(
        token,
        "list",
        cmd_token_list,
        "List all ACL tokens",
        examples="""
        $ mesh acl token list
        $ mesh acl token list -meta -format=json
        """,
    )
    _meta_option(p, "token")
    add_format_option(p)

    policy = add_group(
        acl,
        "policy",
        "Create and list ACL policies",
        """
        $ mesh acl policy create -name=web-write -rules=@web.hcl
        $ mesh acl policy list
        """,
    )
    p = add_command(
        policy,
        "create",
        cmd_policy_create,
        "Create a policy from HCL or JSON rules",
        """
-rules takes the rules inline, @FILE to read a file, or - to read stdin.""",
        """
        $ mesh acl policy create -name=node-read -rules='node_prefix "" { policy = "read" }'
        $ mesh acl policy create -name=web-write -description="web" -rules=@web.hcl
        $ cat web.hcl | mesh acl policy create -name=web-write -rules=-
        """,
    )
    add_name_option(p, "the policy's name (required)", default="")
    p.add_argument("-description", "--description", default="", help="the policy's description")
    p.add_argument("-rules", "--rules", help="rules: inline HCL/JSON, @FILE or - (stdin)")
    p.add_argument(
        "-valid-datacenter",
        "--valid-datacenter",
        dest="valid_datacenter",
        action="append",
        help="datacenter the policy applies in (repeatable; default all)",
    )
    _meta_option(p, "policy")
    add_format_option(p)

    p = add_command(
        policy,
        "list",
        cmd_policy_list,
        "List all ACL policies",
        examples="""
        $ mesh acl policy list
        $ mesh acl policy list -format=json
        """,
    )
    _meta_option(p, "policy")
    add_format_option(p)

    role = add_group(
        acl,
        "role",
        "Create and list ACL roles",
        """
        $ mesh acl role create -name=web-deployer -service-identity=web
        $ mesh acl role list
        """,
    )
    p = add_command(
        role,
        "create",
        cmd_role_create,
        "Create a role: policies and service or node identities under one name",
        """
Link policies by name (-policy-name) or by ID or unique ID prefix (-policy-id).
A service identity (NAME or NAME:DC1,DC2) may write that service and its sidecar
and read every service and node; a node identity (NODE:DC) may write that node.""",
        """
        $ mesh acl role create -name=web-deployer -service-identity=web
        $ mesh acl role create -name=ops -policy-name=node-read -node-identity=host-1:dc1
        """,
    )
    add_name_option(p, "the role's name (required)", default="")
    p.add_argument("-description", "--description", default="", help="the role's description")
    _link_options(p, roles=False)
    _meta_option(p, "role")
    add_format_option(p)

    p = add_command(
        role,
        "list",
        cmd_role_list,
        "List all ACL roles",
        examples="""
        $ mesh acl role list
        $ mesh acl role list -format=json
        """,
    )
    _meta_option(p, "role")
    add_format_option(p)
