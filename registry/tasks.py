"""Background work: check runs, TTL expiry, reaping. Celery tasks and the
embedded in-process loop call the same functions (`registry.domain.health`).

- Production (REDIS_URL set, MESH_TASKS=celery): `mesh beat` (or
  `mesh worker --beat`) sends `registry.tasks.tick` every
  MESH_TASK_TICK_SECONDS; `mesh worker` processes run it.
- Embedded (MESH_TASKS=inprocess): `run_inprocess()` in the server process
  calls `tick()` on the database thread pool at the same pace.

Tasks take ids and re-read state; every step claims its work with a
conditional update, so any number of workers (and servers) can tick at once.
"""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings

from meshweb.celery import app

log = logging.getLogger(__name__)


@app.task(name="registry.tasks.tick")
def tick() -> dict:
    """One pass of every periodic job; idempotent, safe to run concurrently."""
    from registry.domain import health

    return health.tick()


@app.task(name="registry.tasks.run_check")
def run_check(check_pk: int) -> dict | None:
    """Run one HTTP/TCP/gRPC check now; None when it is gone or already running."""
    from registry.domain import health

    result = health.run_check(int(check_pk))
    if result is None:
        return None
    return {"status": result.status, "output": result.output}


async def run_inprocess() -> None:
    """The embedded default's scheduler: `tick()` every MESH_TASK_TICK_SECONDS."""
    from registry import db

    while True:
        try:
            await db.run(tick)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background tick failed")
        await asyncio.sleep(settings.MESH_TASK_TICK_SECONDS)
