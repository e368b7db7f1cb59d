"""`mesh services register|deregister`: service definitions from files (JSON, YAML, HCL) or flags."""

from __future__ import annotations

import argparse
import json
from typing import Any

from meshproto import servicedefs
from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    add_group,
    add_meta_option,
    add_name_option,
    api_failure,
    key_value,
    out,
    path_escape,
)


def _field(definition: dict, name: str) -> Any:
    """A definition's field, matched as the server matches it (case and `_` ignored)."""
    return servicedefs.field(definition, name)


def load_definition_file(path: str) -> list[dict]:
    """The service definitions in a file (meshproto.servicedefs, shared with the agent)."""
    try:
        return servicedefs.load_definition_file(path)
    except servicedefs.DefinitionError as exc:
        raise CommandError(f"Error: {exc}") from None


def _from_flags(args: argparse.Namespace) -> dict:
    spec: dict[str, Any] = {"Name": args.name}
    for field, value in (
        ("ID", args.id),
        ("Kind", args.kind),
        ("Address", args.address),
        ("Port", args.port),
        ("SocketPath", args.socket),
    ):
        if value:
            spec[field] = value
    if args.tag:
        spec["Tags"] = args.tag
    if args.meta:
        spec["Meta"] = dict(args.meta)
    if args.tagged_address:
        spec["TaggedAddresses"] = {k: _service_addr(v) for k, v in args.tagged_address}
    return spec


def _service_addr(text: str) -> dict:
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and host:
        return {"Address": host.strip("[]"), "Port": int(port)}
    return {"Address": text}


def cmd_register(args: argparse.Namespace) -> int:
    if not args.files and not args.name:
        raise CommandError("Service registration requires at least one argument or flags.")
    if args.files and args.name:
        raise CommandError("Service registration requires arguments or -id, not both.")
    if args.files:
        specs = [d for path in args.files for d in load_definition_file(path)]
        # As consul: a flag fills what the file leaves out; tags and meta add up.
        flags = _from_flags(args)
        for spec in specs:
            for field in ("ID", "Address", "Port", "Kind", "SocketPath"):
                if field in flags and not _field(spec, field):
                    spec[field] = flags[field]
            if args.tag:
                key = next((k for k in spec if k.lower() == "tags"), "Tags")
                spec[key] = list(spec.get(key) or []) + args.tag
            if args.meta:
                key = next((k for k in spec if k.lower() == "meta"), "Meta")
                spec[key] = {**(spec.get(key) or {}), **dict(args.meta)}
    else:
        specs = [_from_flags(args)]
    client = Client.from_args(args)
    for spec in specs:
        name = _field(spec, "name") or ""
        try:
            client.request("PUT", "/v1/agent/service/register", body=json.dumps(spec).encode())
        except ApiError as exc:
            raise api_failure(f"Error registering service {name!r}", exc, client) from None
        out(f"Registered service: {name}")
    return 0


def cmd_deregister(args: argparse.Namespace) -> int:
    if not args.files and not args.id:
        raise CommandError("Service deregistration requires at least one argument or -id.")
    if args.files and args.id:
        raise CommandError("Service deregistration requires arguments or -id, not both.")
    if args.id:
        ids = [args.id]
    else:
        ids = []
        for path in args.files:
            for spec in load_definition_file(path):
                ident = _field(spec, "id") or _field(spec, "name")
                if not ident:
                    raise CommandError(f"Error: {path}: a service has neither an ID nor a name")
                ids.append(ident)
    client = Client.from_args(args)
    for ident in ids:
        try:
            client.request("PUT", "/v1/agent/service/deregister/" + path_escape(ident))
        except ApiError as exc:
            raise api_failure(f"Error deregistering service {ident!r}", exc, client) from None
        out(f"Deregistered service: {ident}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    svc = add_group(
        sub,
        "services",
        "Register and deregister services on the control plane's node",
        """
        $ mesh services register web.json
        $ mesh services deregister -id=web
        """,
    )

    p = add_command(
        svc,
        "register",
        cmd_register,
        "Register services from definition files (JSON, YAML or HCL) or flags",
        """
A file holds {"service": {...}}, {"services": [...]} or one bare definition,
with Consul's field names (Name, Port, Tags, Check, Connect, ...) or the
config files' snake_case ones. Flags fill in what a file leaves out.""",
        """
        $ mesh services register web.json
        $ mesh services register web.yaml db.hcl
        $ mesh services register -name=web -port=8080 -tag=v1 -meta=team=core
        """,
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="service definition file(s)")
    add_name_option(p, "name of a service registered from flags")
    p.add_argument("-id", "--id", help="service ID (default: the name)")
    p.add_argument("-address", "--address", help="service address")
    p.add_argument("-port", "--port", type=int, default=0, help="service port")
    p.add_argument("-socket", "--socket", help="unix socket path instead of address and port")
    p.add_argument("-kind", "--kind", help="the service's kind (e.g. connect-proxy)")
    p.add_argument("-tag", "--tag", action="append", help="tag to add (repeatable)")
    add_meta_option(p, "metadata to set (repeatable)")
    p.add_argument(
        "-tagged-address",
        "--tagged-address",
        dest="tagged_address",
        type=key_value,
        action="append",
        metavar="KEY=ADDR[:PORT]",
        help="tagged address to set (repeatable)",
    )

    p = add_command(
        svc,
        "deregister",
        cmd_deregister,
        "Deregister services by ID or by the files that registered them",
        examples="""
        $ mesh services deregister -id=web
        $ mesh services deregister web.json
        """,
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="service definition file(s)")
    p.add_argument("-id", "--id", help="ID of the service to deregister")
