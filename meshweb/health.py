"""Health endpoints for load balancers and orchestrators, answered before Django's stack.

- `GET /livez`: the process and its event loop answer (a liveness probe; it
  never touches the database, so a database outage does not get every
  control plane restarted).
- `GET /healthz`: ready to serve: the database answers `SELECT 1` and, with
  `REDIS_URL`, Redis answers `PING` (a readiness probe; 503 with the failing
  part named, so a load balancer stops sending requests here).

Why outside Django's URLconf: probes come with the pod's or the balancer's
address as `Host`, which `MESH_ALLOWED_HOSTS` would refuse, and a probe must
not queue behind the API's thread pool.
"""

from __future__ import annotations

import asyncio
import json

from django.conf import settings

PATHS = ("/livez", "/healthz")
CHECK_TIMEOUT_SECONDS = 5.0


def _database() -> str:
    from django.db import close_old_connections, connection

    close_old_connections()  # drops a connection the database closed
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
    except Exception as exc:
        connection.close()
        return f"error: {exc.__class__.__name__}: {str(exc).strip()[:200]}"
    return "ok"


def _redis() -> str:
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:
        return f"error: {exc.__class__.__name__}: {str(exc).strip()[:200]}"
    finally:
        client.close()
    return "ok"


def readiness() -> dict[str, str]:
    """Each dependency's state, "ok" or "error: ..." (blocking: run it in a thread)."""
    checks = {"database": _database()}
    if settings.REDIS_URL:
        checks["redis"] = _redis()
    return checks


async def handle(scope, receive, send) -> None:
    """Answer `scope["path"]` (one of PATHS) with a small JSON body."""
    status, body = 200, {"status": "ok"}
    if scope["path"] == "/healthz":
        try:
            checks = await asyncio.wait_for(
                asyncio.to_thread(readiness), timeout=CHECK_TIMEOUT_SECONDS
            )
        except TimeoutError:
            checks = {"database": f"error: no answer within {CHECK_TIMEOUT_SECONDS:g}s"}
        ok = all(v == "ok" for v in checks.values())
        status = 200 if ok else 503
        body = {"status": "ok" if ok else "unavailable", "checks": checks}
    payload = json.dumps(body).encode()
    head = scope["method"] == "HEAD"
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else payload})
