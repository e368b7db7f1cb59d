"""Health endpoints for load balancers and orchestrators, answered before Django's stack.

- `GET /livez`: the process and its event loop answer (a liveness probe; it
  never touches the database, so a database outage does not get every
  control plane restarted).
- `GET /healthz`: ready to serve, judged as `/v1/agent/health` judges it
  (`registry.server_metrics.health`: the write thread runs and the database
  answers on the server's own pool; a readiness probe: 503 naming the failure,
  so a load balancer stops sending requests here). With `REDIS_URL`, Redis must answer `PING` too, but a
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
# As /v1/agent/health: a database that takes longer than this to answer is down for us.
CHECK_TIMEOUT_SECONDS = 2.0


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


async def readiness() -> tuple[int, dict]:
    """(status, body): this server's health as /v1/agent/health judges it (the writer
    runs, the database answers on the server's own pool), and Redis's."""
    from registry import db, server_metrics

    error: str | None = None
    try:
        await asyncio.wait_for(db.run(server_metrics.ping_database), CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        error = f"no answer within {CHECK_TIMEOUT_SECONDS:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is the answer
        error = f"{type(exc).__name__}: {exc}".strip()[:300]
    state = server_metrics.health(error)
    checks = {
        "database": f"error: {error}" if error else "ok",
        "writer": "ok" if state.writer_alive else "error: the writer thread has stopped",
    }
    if settings.REDIS_URL:
        checks["redis"] = await asyncio.to_thread(_redis)
    if not state.ok:
        return 503, {"status": "unavailable", "checks": checks}
    degraded = any(v != "ok" for v in checks.values())
    return 200, {"status": "degraded" if degraded else "ok", "checks": checks}


async def handle(scope, receive, send) -> None:
    """Answer `scope["path"]` (one of PATHS) with a small JSON body."""
    status, body = 200, {"status": "ok"}
    if scope["path"] == "/healthz":
        status, body = await readiness()
    payload = json.dumps(body).encode()
    head = scope["method"] == "HEAD"
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else payload})
