"""`mesh server`: prepare the database, then serve the ASGI app with uvicorn."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from django.conf import settings
from django.core.management import call_command

log = logging.getLogger("meshweb.server")


@contextlib.contextmanager
def _startup_lock() -> Iterator[None]:
    """Serialise migrations of servers starting at once on one database.

    PostgreSQL: a session advisory lock; SQLite: a lock file beside the database.
    """
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", [_MIGRATE_LOCK_ID])
        try:
            yield
        finally:
            with connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", [_MIGRATE_LOCK_ID])
        return
    import fcntl

    path = f"{settings.DATABASES['default']['NAME']}.migrate-lock"
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_MIGRATE_LOCK_ID = 0x6D657368  # "mesh"
SHUTDOWN_GRACE_SECONDS = 5


def prepare() -> str | None:
    """Migrate, create the server's node and, with ACLs on, the first management token.

    Returns a newly bootstrapped management secret (to print once), or None.
    """
    with _startup_lock():
        call_command("migrate", interactive=False, verbosity=0)
    from registry.ca.manager import ensure_initialized as ensure_ca_initialized
    from registry.domain import acl, catalog

    catalog.ensure_local_node()
    ensure_ca_initialized()
    if not settings.MESH_ACL_ENABLED:
        return None
    if settings.MESH_ACL_INITIAL_MANAGEMENT_TOKEN:
        acl.ensure_initial_management(settings.MESH_ACL_INITIAL_MANAGEMENT_TOKEN)
        return None
    if settings.MESH_ACL_BOOTSTRAP_ON_START and not acl.bootstrapped():
        _token, secret = acl.bootstrap()
        secret_file = settings.DATA_DIR / "bootstrap-token"
        secret_file.write_text(secret + "\n")
        secret_file.chmod(0o600)
        if not settings.MESH_ACL_DNS_TOKEN:
            acl.create_dns_token(settings.DATA_DIR / "dns-token")
        return secret
    return None


def serve(quiet: bool = False) -> int:
    import uvicorn

    secret = prepare()
    host, port = settings.MESH_HTTP_ADDR
    if not quiet:
        url = f"http://{host}:{port}"
        lines = [
            "meshweb control plane",
            f"  REST API:  {url}/api/  (docs: {url}/api/docs/, schema: {url}/api/schema/)",
            f"  Consul API: {url}/v1/  (export CONSUL_HTTP_ADDR={host}:{port})",
        ]
        if settings.MESH_DNS_ADDR:
            dhost, dport = settings.MESH_DNS_ADDR
            lines.append(
                f"  DNS:       {dhost}:{dport}  (dig @{dhost} -p {dport} <service>.service.{settings.MESH_DNS_DOMAIN})"
            )
        lines.append(
            f"  data:      {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}, tasks {settings.MESH_TASKS}"
        )
        if settings.MESH_ACL_ENABLED:
            if secret:
                lines.append(
                    f"  ACL bootstrap token (shown once, also in {settings.DATA_DIR / 'bootstrap-token'}):"
                )
                lines.append(f"    {secret}")
                lines.append(f"    export CONSUL_HTTP_TOKEN={secret} MESH_HTTP_TOKEN={secret}")
            else:
                token_file = settings.DATA_DIR / "bootstrap-token"
                hint = f" (bootstrap token in {token_file})" if token_file.exists() else ""
                lines.append(
                    f"  ACLs:      enabled, default policy {settings.MESH_ACL_DEFAULT_POLICY}{hint}"
                )
        else:
            lines.append("  ACLs:      disabled")
        print("\n".join(lines), flush=True)
    config = uvicorn.Config(
        "meshweb.asgi:application",
        host=host,
        port=port,
        lifespan="on",
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=65,
        # A stop must not wait for every blocking query (up to 10 min) to end:
        # in-flight requests get this long, then their connections are closed.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        backlog=4096,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0
