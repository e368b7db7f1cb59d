"""`mesh`: the meshweb command line (server, worker, and Consul-style client commands)."""

from __future__ import annotations

import argparse
import os
import sys


def _django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "meshweb.settings")
    import django

    django.setup()


def cmd_server(args: argparse.Namespace) -> int:
    """Run the control plane: migrations, HTTP API, DNS and (embedded) background tasks."""
    if args.http_addr:
        os.environ["MESH_HTTP_ADDR"] = args.http_addr
    if args.dns_addr is not None:
        os.environ["MESH_DNS_ADDR"] = args.dns_addr
    if args.data_dir:
        os.environ["MESH_DATA_DIR"] = args.data_dir
    _django()
    from meshweb.server import serve

    return serve(quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="meshweb: a web-managed, multi-cloud service mesh with a Consul-compatible registry.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    p = sub.add_parser(
        "server",
        help="run the control plane (HTTP API, DNS, background tasks)",
        description=cmd_server.__doc__,
    )
    p.add_argument(
        "--http-addr", help="HTTP listen address (env MESH_HTTP_ADDR, default 127.0.0.1:8500)"
    )
    p.add_argument(
        "--dns-addr",
        help="DNS listen address, '' to disable (env MESH_DNS_ADDR, default 127.0.0.1:8600)",
    )
    p.add_argument(
        "--data-dir", help="data directory for the embedded SQLite database (env MESH_DATA_DIR)"
    )
    p.add_argument("--quiet", action="store_true", help="do not print the start-up banner")
    p.set_defaults(func=cmd_server)

    from meshweb import client_cli

    client_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
