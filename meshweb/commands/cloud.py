"""`mesh cloud add|list|show|sync|remove` (`/api/clouds/`) and `mesh gateway-config <dc>`.

Cloud accounts import a cloud's own registry (AWS Cloud Map, tagged EC2
instances) into the catalog and export mesh services back. Credentials given
to `add` are stored encrypted by the control plane and never shown again;
without them the control plane uses its own environment (an instance role,
AWS_* variables). Needs `operator:write` (`operator:read` to look).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    add_format_option,
    add_group,
    add_name_option,
    api_failure,
    api_message,
    columnize,
    get_or_fail,
    load_data_source,
    out,
    out_json,
    out_json_or_none,
    path_escape,
)

TERMINAL = ("succeeded", "failed", "skipped", "abandoned")


def _failure(prefix: str, exc: ApiError, client: Client) -> CommandError:
    return api_failure(prefix, api_message(exc), client)


def _post(client: Client, path: str, body: dict | None) -> dict:
    return client.post_json(path, body, ok=(200, 201, 202))


def _credentials(args: argparse.Namespace) -> dict | None:
    if args.env_credentials:
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise CommandError(
                "-store-env-credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set"
            )
        creds = {"access_key_id": key, "secret_access_key": secret}
        if os.environ.get("AWS_SESSION_TOKEN"):
            creds["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        return creds
    if args.access_key_id or args.secret_access_key:
        if not (args.access_key_id and args.secret_access_key):
            raise CommandError("-access-key-id and -secret-access-key go together")
        secret = load_data_source(args.secret_access_key, "the secret access key").strip()
        return {"access_key_id": args.access_key_id, "secret_access_key": secret}
    return None


def cmd_add(args: argparse.Namespace) -> int:
    if not args.regions:
        raise CommandError("-region: name at least one region")
    if not args.datacenter:
        raise CommandError("-datacenter: name the datacenter the account's services join")
    cloud_map: dict = {"enabled": not args.no_cloud_map}
    if args.namespaces:
        cloud_map["namespaces"] = args.namespaces
    if args.service_name:
        cloud_map["service_name"] = args.service_name
    ec2: dict = {"enabled": not args.no_ec2}
    if args.service_tag:
        ec2["service_tag"] = args.service_tag
    export: dict = {}
    if args.export_namespace:
        export = {
            "namespace": args.export_namespace,
            "create_namespace": args.create_namespace,
            "services": args.export_services or [],
        }
    elif args.export_services:
        raise CommandError("-export-service needs -export-namespace")
    body = {
        "name": args.name,
        "provider": args.provider,
        "datacenter": args.datacenter,
        "regions": args.regions,
        "endpoint_url": args.endpoint_url or "",
        "credentials": _credentials(args),
        "import": {"cloud_map": cloud_map, "ec2": ec2},
        "export": export,
        "gateway_security_group": args.security_group or "",
        "interval": args.interval,
        "enabled": not args.disabled,
    }
    client = Client.for_api(args)
    try:
        data = _post(client, "/api/clouds/", body)
    except ApiError as exc:
        raise _failure(f"Error adding cloud account {args.name}", exc, client) from None
    if args.format == "json":
        out_json(data)
        return 0
    out(f"Added cloud account {data['name']} ({data['provider']}, datacenter {data['datacenter']})")
    out(f"Credentials: {data['credentials']}")
    if data["enabled"]:
        out(
            f"Its first sync starts shortly; then every {data['interval']}s (mesh cloud show {data['name']})"
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client = Client.for_api(args)
    page = get_or_fail(
        client, "/api/clouds/", "Error listing cloud accounts", {"limit": 1000}, api=True
    )
    accounts = page.get("results") or []
    if out_json_or_none(args, accounts, "No cloud accounts"):
        return 0
    rows = [["Name", "Provider", "Datacenter", "Regions", "Credentials", "Last run", "Next sync"]]
    for a in accounts:
        last = a.get("last_run") or {}
        rows.append(
            [
                a["name"],
                a["provider"],
                a["datacenter"],
                ",".join(a["regions"]),
                a["credentials"],
                f"{last.get('status')} {last.get('finished_at') or ''}".strip() if last else "-",
                a.get("next_sync_at") or "-",
            ]
        )
    out(columnize(rows))
    return 0


def _run_lines(run: dict) -> list[str]:
    lines = [
        f"Run {run['id']} ({run['trigger']}): {run['status']}",
        f"  started {run.get('started_at') or '-'}, finished {run.get('finished_at') or '-'}",
        f"  catalog: {run['created']} created, {run['updated']} updated, {run['removed']} removed",
        f"  exported: {run['exported_created']} created, {run['exported_updated']} updated, "
        f"{run['exported_removed']} removed",
        f"  API calls: {run['api_calls']}, retries: {run['retries']}",
    ]
    for note in run.get("notes") or []:
        lines.append(f"  note: {note}")
    for err in run.get("errors") or []:
        lines.append(f"  error: {err.get('ref', '')}: {err.get('message', '')}")
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    client = Client.for_api(args)
    name = path_escape(args.name)
    try:
        account = client.get_json(f"/api/clouds/{name}/")
        runs = client.get_json(f"/api/clouds/{name}/runs/", {"limit": args.runs}).get("results")
    except ApiError as exc:
        raise _failure(f"Error reading cloud account {args.name}", exc, client) from None
    if args.format == "json":
        out_json({**account, "runs": runs})
        return 0
    for key in ("name", "provider", "datacenter", "node", "endpoint_url", "credentials"):
        out(f"{key.replace('_', ' ').capitalize() + ':':<14}{account.get(key) or '-'}")
    out(f"{'Regions:':<14}{', '.join(account['regions'])}")
    out(f"{'Import:':<14}{json.dumps(account['import'], sort_keys=True)}")
    out(f"{'Export:':<14}{json.dumps(account['export'], sort_keys=True)}")
    out(f"{'Gateway SG:':<14}{account.get('gateway_security_group') or '-'}")
    out(
        f"{'Interval:':<14}{account['interval']}s, {'enabled' if account['enabled'] else 'disabled'}"
    )
    out(f"{'Next sync:':<14}{account.get('next_sync_at') or '-'}")
    for run in runs or []:
        out("")
        for line in _run_lines(run):
            out(line)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    client = Client.for_api(args)
    name = path_escape(args.name)
    try:
        run = _post(client, f"/api/clouds/{name}/sync", None)
        deadline = time.monotonic() + args.timeout
        while args.wait and run["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise CommandError(
                    f"Sync run {run['id']} of {args.name} still {run['status']} after "
                    f"{args.timeout:.0f}s (see mesh cloud show {args.name})"
                )
            time.sleep(0.5)
            run = client.get_json(f"/api/clouds/{name}/runs/{run['id']}/")
    except ApiError as exc:
        raise _failure(f"Error syncing cloud account {args.name}", exc, client) from None
    if args.format == "json":
        out_json(run)
    else:
        for line in _run_lines(run):
            out(line)
    return 0 if run["status"] in ("succeeded", "queued", "running") else 1


def cmd_remove(args: argparse.Namespace) -> int:
    client = Client.for_api(args)
    try:
        client.request("DELETE", f"/api/clouds/{path_escape(args.name)}/")
    except ApiError as exc:
        raise _failure(f"Error removing cloud account {args.name}", exc, client) from None
    out(f"Removed cloud account {args.name} and what it imported into the catalog")
    return 0


def _rule(r: dict) -> str:
    return f"{r['protocol']}/{r['port']} from {r['cidr']}  ({r.get('description', '')})"


def cmd_gateway_config(args: argparse.Namespace) -> int:
    client = Client.for_api(args)
    base = f"/api/datacenters/{path_escape(args.datacenter)}/gateway-config"
    try:
        if not args.apply:
            config = client.get_json(base)
            if args.format == "json":
                out_json(config)
                return 0
            out(f"Datacenter:  {config['datacenter']} ({config['provider']} {config['region']})")
            out(f"SNI domain:  {config['sni_domain']}")
            out(f"Port:        {config['port']}")
            out("Peers:")
            for p in config["peers"] or []:
                out(
                    f"  {p['datacenter']}/{p['node']}  {p['address']}:{p['port']}  {p['sni_domain']}"
                )
            if not config["peers"]:
                out("  (none registered yet)")
            out("Service definition (put it in the agent's config dir):")
            out(json.dumps(config["service_definition"], indent=2))
            out("Agent command:")
            out(f"  {config['agent_command']}")
            fw = config["firewall"]
            out(f"Firewall ({fw['provider']}, security group {fw.get('security_group') or '-'}):")
            for r in fw["ingress"]:
                out(f"  allow {_rule(r)}")
            for note in fw.get("notes") or []:
                out(f"  note: {note}")
            return 0
        plan = client.request("POST", base + "/apply", {"dry_run": "true"}).json()
        out(f"Plan for security group {plan['security_group']} (account {plan['account']}):")
        for r in plan["add"]:
            out(f"  + {_rule(r)}")
        for r in plan["remove"]:
            out(f"  - {_rule(r)}")
        if plan["unchanged"]:
            out("  no changes: the rules are in place")
            return 0
        if args.dry_run:
            return 0
        done = client.request("POST", base + "/apply").json()
        out(
            f"Applied: {len(done['add'])} added, {len(done['remove'])} removed"
            if done["applied"]
            else "No changes were needed"
        )
    except ApiError as exc:
        raise _failure(f"Error with the gateway config of {args.datacenter}", exc, client) from None
    return 0


def _account_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the cloud account's name")


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(
        sub,
        "cloud",
        "Add, list, show, sync and remove cloud accounts (AWS Cloud Map and EC2 sync)",
        """
        $ mesh cloud add -name prod -datacenter aws-east -region us-east-1
        $ mesh cloud sync prod
        $ mesh cloud show prod
        """,
    )
    p = add_command(
        group,
        "add",
        cmd_add,
        "Add a cloud account whose services are imported into a datacenter",
        "Credentials: none (the control plane's environment or instance role), "
        "-access-key-id with -secret-access-key (a value, @file or - for stdin), or "
        "-store-env-credentials (this shell's AWS_* variables). Stored ones are encrypted "
        "at rest and never shown again.",
        """
        $ mesh cloud add -name prod -datacenter aws-east -region us-east-1 -namespace prod.local
        $ mesh cloud add -name dev -datacenter dev -region eu-west-1 -access-key-id AKIA... -secret-access-key @key.txt
        $ mesh cloud add -name prod -datacenter aws-east -region us-east-1 -export-namespace mesh.local -create-namespace -export-service web
        """,
    )
    add_format_option(p)
    add_name_option(p, "the account's name (unique)", required=True)
    p.add_argument(
        "-provider",
        "--provider",
        dest="provider",
        default="aws",
        metavar="NAME",
        help="the cloud provider (default aws)",
    )
    # -datacenter (the global option) names the datacenter the account's imports join.
    p.add_argument(
        "-region",
        "--region",
        dest="regions",
        action="append",
        metavar="REGION",
        default=[],
        help="region to sync (repeatable; at least one)",
    )
    p.add_argument(
        "-endpoint-url",
        "--endpoint-url",
        dest="endpoint_url",
        metavar="URL",
        help="the provider's API endpoint, for a local stand-in (default: the provider's own)",
    )
    p.add_argument(
        "-access-key-id",
        "--access-key-id",
        dest="access_key_id",
        metavar="ID",
        help="access key to store (with -secret-access-key)",
    )
    p.add_argument(
        "-secret-access-key",
        "--secret-access-key",
        dest="secret_access_key",
        metavar="VALUE",
        help="its secret: a value, @FILE or - (stdin)",
    )
    p.add_argument(
        "-store-env-credentials",
        "--store-env-credentials",
        dest="env_credentials",
        action="store_true",
        help="store this shell's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (encrypted)",
    )
    p.add_argument(
        "-namespace",
        "--namespace",
        dest="namespaces",
        action="append",
        metavar="NAME",
        help="Cloud Map namespace to import (repeatable; default all)",
    )
    p.add_argument(
        "-service-name",
        "--service-name",
        dest="service_name",
        metavar="TEMPLATE",
        help="catalog name of a Cloud Map service: {service}, {namespace} (default {service})",
    )
    p.add_argument(
        "-no-cloud-map",
        "--no-cloud-map",
        dest="no_cloud_map",
        action="store_true",
        help="do not import Cloud Map services",
    )
    p.add_argument(
        "-no-ec2",
        "--no-ec2",
        dest="no_ec2",
        action="store_true",
        help="do not import tagged EC2 instances",
    )
    p.add_argument(
        "-service-tag",
        "--service-tag",
        dest="service_tag",
        metavar="TAG",
        help="EC2 tag whose value names an instance's service (default mesh:service)",
    )
    p.add_argument(
        "-export-namespace",
        "--export-namespace",
        dest="export_namespace",
        metavar="NS",
        help="Cloud Map namespace mesh services are exported to",
    )
    p.add_argument(
        "-create-namespace",
        "--create-namespace",
        dest="create_namespace",
        action="store_true",
        help="create the export namespace if it does not exist",
    )
    p.add_argument(
        "-export-service",
        "--export-service",
        dest="export_services",
        action="append",
        metavar="NAME",
        help="mesh service to register in Cloud Map (repeatable)",
    )
    p.add_argument(
        "-security-group",
        "--security-group",
        dest="security_group",
        metavar="SG",
        help="security group of the datacenter's mesh gateway (for gateway-config -apply)",
    )
    p.add_argument(
        "-interval",
        "--interval",
        dest="interval",
        type=int,
        default=300,
        metavar="SECONDS",
        help="seconds between syncs (default 300)",
    )
    p.add_argument(
        "-disabled",
        "--disabled",
        dest="disabled",
        action="store_true",
        help="add the account without syncing it",
    )

    p = add_command(group, "list", cmd_list, "List cloud accounts", examples="$ mesh cloud list")
    add_format_option(p)

    p = add_command(
        group,
        "show",
        cmd_show,
        "Show a cloud account and its latest sync runs",
        examples="$ mesh cloud show prod",
    )
    add_format_option(p)
    p.add_argument(
        "-runs",
        "--runs",
        dest="runs",
        type=int,
        default=5,
        metavar="N",
        help="how many recent sync runs to show (default 5)",
    )
    _account_arg(p)

    p = add_command(
        group,
        "sync",
        cmd_sync,
        "Sync a cloud account now and print the run (non-zero exit if it failed)",
        examples="$ mesh cloud sync prod",
    )
    add_format_option(p)
    p.add_argument(
        "-wait",
        "--wait",
        dest="wait",
        type=lambda v: v.lower() in ("1", "true", "yes"),
        default=True,
        metavar="BOOL",
        help="wait for the run to finish (default true)",
    )
    p.add_argument(
        "-timeout",
        "--timeout",
        dest="timeout",
        type=float,
        default=600,
        metavar="SECONDS",
        help="how long -wait waits (default 600)",
    )
    _account_arg(p)

    p = add_command(
        group,
        "remove",
        cmd_remove,
        "Remove a cloud account and everything it imported into the catalog",
        examples="$ mesh cloud remove prod",
    )
    _account_arg(p)

    p = add_command(
        sub,
        "gateway-config",
        cmd_gateway_config,
        "Show what a datacenter's mesh gateway needs; -apply its cloud firewall rules",
        "With -apply, the plan (rules to add and remove in the gateway's security group) is "
        "shown, then applied through the datacenter's cloud account; a second -apply "
        "changes nothing. -dry-run shows the plan only.",
        """
        $ mesh gateway-config aws-east
        $ mesh gateway-config aws-east -apply
        """,
    )
    add_format_option(p)
    p.add_argument(
        "-apply",
        "--apply",
        dest="apply",
        action="store_true",
        help="apply the firewall plan through the datacenter's cloud account",
    )
    p.add_argument(
        "-dry-run",
        "--dry-run",
        dest="dry_run",
        action="store_true",
        help="with -apply: show the plan only",
    )
    p.add_argument("datacenter", metavar="DC", help="the datacenter whose gateway to show")
