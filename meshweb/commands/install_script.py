"""`mesh install-script`: the agent install script for a new host (`GET /install.sh`).

With `-join-token TOKEN` it fetches the script for that token; without, it
first creates a join token (`-ttl`, `-uses`, `-service`, `-node`, as `mesh
join-token create`; needs acl:write) and prints the one-liner to run on the
host (`curl -fsS '<control plane>/install.sh?token=...' | sh`) on stderr.
"""

from __future__ import annotations

import argparse
import os
import re

from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    api_failure,
    api_message,
    error,
    out_bytes,
)
from meshweb.install.script import one_liner

_CP_URL = re.compile(r"^MESH_CP_URL='([^']*)'$", re.MULTILINE)
_REFUSAL = re.compile(r"meshweb install: error: (.*?)' >&2")


def _create_token(client: Client, args: argparse.Namespace) -> dict:
    if args.uses < 0:
        raise CommandError("-uses must be 0 (unlimited) or a positive integer")
    body = {
        "ttl": args.ttl,
        "uses": args.uses,
        "description": args.description or "install script",
        "services": list(args.services or []),
    }
    if args.node:
        body["node"] = args.node
    try:
        return client.post_json("/api/join-tokens/", body, ok=(201,))
    except ApiError as exc:
        raise api_failure("Error creating the join token", api_message(exc), client) from None


def cmd_install_script(args: argparse.Namespace) -> int:
    client = Client.for_api(args)
    created = None
    token = args.join_token
    if not token:
        created = _create_token(client, args)
        token = created["token"]
    try:
        script = client.request("GET", "/install.sh", {"token": token}).body
    except ApiError as exc:
        found = _REFUSAL.search(exc.body)
        message = found.group(1).replace("'\\''", "'") if found else exc.body.strip()
        raise CommandError(f"Error getting the install script: {message}") from None
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "wb") as fh:
            fh.write(script)
    else:
        out_bytes(script.rstrip(b"\n"))
    url = _CP_URL.search(script.decode("utf-8", "replace"))
    command = one_liner(url.group(1) if url else client.base_url, token)
    if created is not None:
        error(
            f"Created join token {created['id']} (uses: {created['max_uses'] or 'unlimited'}, "
            f"expires {created['expires_at']}); it is shown only this once."
        )
    if created is not None or args.output:
        error("Run on the new host, as root:")
        error(f"  {command}" if not args.output else f"  sh {args.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "install-script",
        cmd_install_script,
        "Print the script that installs and joins an agent on a new host",
        "The script (POSIX sh, run as root on the host) installs the meshweb wheel this "
        "control plane serves into a virtual environment, checks the control plane's CA "
        "against the pin before it sends the join token, writes the agent's config and "
        "starts it (systemd) or prints its start command. With -join-token it embeds that "
        "token; without, it creates one first (needs acl:write) and prints the curl "
        "one-liner on stderr.",
        """
        $ mesh install-script -service web -ttl 30m
        $ mesh install-script -join-token 3f9c0a1b2c3d4e5f.Xq1... -o install.sh
        """,
    )
    p.add_argument(
        "-join-token",
        "--join-token",
        dest="join_token",
        default="",
        metavar="TOKEN",
        help="the join token to embed (default: create one)",
    )
    p.add_argument(
        "-o",
        "--output",
        dest="output",
        default="",
        metavar="FILE",
        help="write the script to FILE (mode 0700) instead of stdout",
    )
    p.add_argument(
        "-ttl",
        "--ttl",
        dest="ttl",
        default="1h",
        metavar="DURATION",
        help="a created token's validity (default 1h)",
    )
    p.add_argument(
        "-uses",
        "--uses",
        dest="uses",
        type=int,
        default=1,
        metavar="N",
        help="hosts a created token may join (0 unlimited; default 1)",
    )
    p.add_argument(
        "-service",
        "--service",
        dest="services",
        action="append",
        metavar="NAME",
        help="a service the joined node may register (repeatable; 'api-*', '*')",
    )
    p.add_argument(
        "-node",
        "--node",
        dest="node",
        default="",
        metavar="NAME",
        help="the only node name a created token joins as",
    )
    p.add_argument("-description", "--description", dest="description", default="", metavar="TEXT")
