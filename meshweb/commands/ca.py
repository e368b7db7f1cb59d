"""`mesh ca roots|rotate|get-config|set-config`: the Connect CA over HTTP.

`roots`, `get-config` and `set-config` use Consul's `/v1/connect/ca/...`
(`get-config` / `set-config` print and take what `consul connect ca` does);
`rotate` has no Consul counterpart and uses `POST /api/ca/rotate`.
"""

from __future__ import annotations

import argparse
import json

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
    get_or_fail,
    load_data_source,
    out,
    out_json,
)


def cmd_roots(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    try:
        if args.pem:
            resp = client.get("/v1/connect/ca/roots", {"pem": "true"})
            out(resp.body.decode().rstrip("\n"))
            return 0
        data = client.get_json("/v1/connect/ca/roots")
    except ApiError as exc:
        raise api_failure("Error reading CA roots", exc, client) from None
    if args.format == "json":
        out_json(data)
        return 0
    out(f"Trust domain: {data.get('TrustDomain', '')}")
    rows = [["ID", "Active", "Key", "Not after", "Intermediates"]]
    for root in data.get("Roots") or []:
        rows.append(
            [
                root.get("ID", ""),
                "yes" if root.get("Active") else "no",
                f"{root.get('PrivateKeyType', '')}-{root.get('PrivateKeyBits', '')}",
                root.get("NotAfter", ""),
                str(len(root.get("IntermediateCerts") or [])),
            ]
        )
    out(columnize(rows))
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    try:
        data = client.request("POST", "/api/ca/rotate").json()
    except ApiError as exc:
        raise api_failure("Error rotating the CA root", api_message(exc), client) from None
    if args.format == "json":
        out_json(data)
        return 0
    previous = [r["id"] for r in data.get("roots", []) if not r.get("active")]
    out(f"Rotated: the active root is now {data.get('active_root_id', '')}")
    if previous:
        out("Still trusted until their last leaf expires: " + ", ".join(previous))
    return 0


def cmd_get_config(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    data = get_or_fail(client, "/v1/connect/ca/configuration", "Error request CA configuration")
    out_json(data)
    return 0


def cmd_set_config(args: argparse.Namespace) -> int:
    if not args.config_file:
        raise CommandError("-config-file is required")
    text = load_data_source(
        args.config_file if args.config_file == "-" else "@" + args.config_file, "config file"
    )
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"Error parsing the config file: {exc}") from None
    if not isinstance(config, dict):
        raise CommandError("Error parsing the config file: expected a JSON object")
    if args.force_without_cross_signing:
        config["ForceWithoutCrossSigning"] = True
    client = Client.from_args(args)
    try:
        client.request("PUT", "/v1/connect/ca/configuration", body=json.dumps(config).encode())
    except ApiError as exc:
        raise api_failure("Error setting CA configuration", exc, client) from None
    out("Configuration updated!")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    ca = add_group(
        sub,
        "ca",
        "Inspect and manage the Connect CA (roots, rotation, configuration)",
        """
        $ mesh ca roots
        $ mesh ca rotate
        $ mesh ca get-config
        $ mesh ca set-config -config-file ca.json
        """,
    )
    p = add_command(
        ca,
        "roots",
        cmd_roots,
        "List the CA's trusted roots",
        "The active root signs new leaves; older roots stay listed until their last leaf expires.",
        """
        $ mesh ca roots
        $ mesh ca roots -pem > ca-bundle.pem
        """,
    )
    add_format_option(p)
    p.add_argument("-pem", "--pem", action="store_true", help="print the PEM trust bundle")

    p = add_command(
        ca,
        "rotate",
        cmd_rotate,
        "Rotate to a new root, cross-signed with the current one",
        "Needs operator:write. Connections keep working: see docs/connect-ca.md.",
        "$ mesh ca rotate",
    )
    add_format_option(p)

    add_command(
        ca,
        "get-config",
        cmd_get_config,
        "Display the CA configuration (as consul connect ca get-config)",
        examples="$ mesh ca get-config",
    )

    p = add_command(
        ca,
        "set-config",
        cmd_set_config,
        "Modify the CA configuration (as consul connect ca set-config)",
        "A new PrivateKeyType or PrivateKeyBits rotates to a root of that kind.",
        """
        $ mesh ca set-config -config-file ca.json
        $ echo '{"Provider":"consul","Config":{"LeafCertTTL":"24h"}}' | mesh ca set-config -config-file -
        """,
    )
    p.add_argument(
        "-config-file", "--config-file", dest="config_file", metavar="PATH", help="JSON file, or -"
    )
    p.add_argument(
        "-force-without-cross-signing",
        "--force-without-cross-signing",
        dest="force_without_cross_signing",
        action="store_true",
        help="rotate even if the provider cannot cross-sign (breaks connections)",
    )
