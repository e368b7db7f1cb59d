"""Health endpoints for load balancers and orchestrators, answered before Django's stack.

- `GET /livez`: the process and its event loop answer (a liveness probe; it
  never touches the database, so a database outage does not get every
  control plane restarted).
- `GET /healthz`: ready to serve: the database answers `SELECT 1` (a
  readiness probe; 503 naming the failure, so a load balancer stops sending
  requests here). With `REDIS_URL`, Redis must answer `PING` too, but a
  failing Redis only makes the answer `"status": "degraded"` (still 200): every
  server shares the one Redis, so failing readiness on it would take every
  server out of the load balancer at once, while without it they still serve
  reads and writes (only cross-server wake-ups and Celery work wait).

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
    """`SELECT 1` on a connection of its own, closed after: probes run on whichever
    executor thread is free, and must not leave an idle connection on each."""
    from django.db import connection

    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
    except Exception as exc:
        return f"error: {exc.__class__.__name__}: {str(exc).strip()[:200]}"
    finally:
        connection.close()
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
        if checks["database"] != "ok":
            status, state = 503, "unavailable"
        else:
            state = "ok" if all(v == "ok" for v in checks.values()) else "degraded"
        body = {"status": state, "checks": checks}
    payload = json.dumps(body).encode()
    head = scope["method"] == "HEAD"
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else payload})
