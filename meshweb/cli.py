"""`mesh`: the meshweb command line (server, worker, and Consul-style client commands)."""

from __future__ import annotations

import argparse
import inspect
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


def _celery_argv(args: argparse.Namespace, command: str) -> list[str] | None:
    """Celery's argv for `command`, or None (after saying why) when REDIS_URL is unset."""
    if args.data_dir:
        os.environ["MESH_DATA_DIR"] = args.data_dir
    _django()
    from django.conf import settings

    if not settings.REDIS_URL:
        print(
            f"mesh {args.command}: REDIS_URL is not set. Celery needs Redis as its broker, e.g.\n"
            f"  REDIS_URL=redis://127.0.0.1:6379/0 mesh {args.command}\n"
            "Without Redis, `mesh server` runs the background tasks itself (MESH_TASKS=inprocess).",
            file=sys.stderr,
        )
        return None
    argv = [command, f"--loglevel={args.loglevel}"]
    if command == "beat" or getattr(args, "beat", False):
        argv.append(f"--schedule={settings.CELERY_BEAT_SCHEDULE_FILENAME}")
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker for the background tasks (health checks, TTL expiry, reaping).

    Needs REDIS_URL (the broker) and the same database settings as the servers
    (DATABASE_URL, or MESH_DATA_DIR for SQLite). With --beat it also schedules
    the periodic tick, so one process is a complete background runner.
    """
    argv = _celery_argv(args, "worker")
    if argv is None:
        return 2
    # Mingle and gossip sync revoked-task lists between workers at start-up and
    # on every heartbeat; our tasks are idempotent ticks, so skip the chatter.
    argv += ["--without-mingle", "--without-gossip"]
    if args.beat:
        argv.append("--beat")
    if args.concurrency:
        argv.append(f"--concurrency={args.concurrency}")
    if args.pool:
        argv.append(f"--pool={args.pool}")
    if args.queues:
        argv.append(f"--queues={args.queues}")
    from meshweb.celery import app

    return int(app.start(argv) or 0)


def cmd_beat(args: argparse.Namespace) -> int:
    """Run Celery beat: send `registry.tasks.tick` every MESH_TASK_TICK_SECONDS.

    Run exactly one beat per deployment (or one `mesh worker --beat`).
    """
    argv = _celery_argv(args, "beat")
    if argv is None:
        return 2
    from meshweb.celery import app

    return int(app.start(argv) or 0)


def _add_celery_commands(sub) -> None:
    p = sub.add_parser(
        "worker",
        help="run a Celery worker for background tasks (needs REDIS_URL)",
        description=inspect.cleandoc(cmd_worker.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--beat", action="store_true", help="also run the beat scheduler in this process"
    )
    p.add_argument("--concurrency", type=int, help="worker processes/threads (default: CPU count)")
    p.add_argument(
        "--pool",
        choices=["prefork", "threads", "solo"],
        help="Celery execution pool (default prefork)",
    )
    p.add_argument(
        "--queues", help="comma-separated queues to consume (default MESH_CELERY_QUEUE or celery)"
    )
    p.add_argument("--data-dir", help="data directory (env MESH_DATA_DIR; SQLite lives there)")
    p.add_argument("--loglevel", default="info", help="log level (default info)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "beat",
        help="run the Celery beat scheduler for background tasks (needs REDIS_URL)",
        description=inspect.cleandoc(cmd_beat.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data-dir", help="data directory (env MESH_DATA_DIR; the schedule file lives there)"
    )
    p.add_argument("--loglevel", default="info", help="log level (default info)")
    p.set_defaults(func=cmd_beat)


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
    _add_celery_commands(sub)

    from meshweb import client_cli

    client_cli.add_commands(sub)
    from agents import cli as agent_cli  # Django-free: `mesh agent` never loads the registry

    agent_cli.register(sub)
    from agents import demo
    from meshweb import dev

    dev.register(sub)  # `mesh dev`: control plane + agent + demo services (supervisor, Django-free)
    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Start-up problems (a bad setting, an undecryptable CA key, an
        # unreachable database) are the operator's to fix: say what, not where.
        from django.core.exceptions import ImproperlyConfigured
        from django.db import DatabaseError

        if (
            isinstance(exc, ImproperlyConfigured | DatabaseError)
            or type(exc).__name__ == "KeyDecryptionError"
        ):
            print(f"Error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
