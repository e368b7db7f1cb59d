"""Background work: check runs, TTL expiry, reaping. Celery tasks and the
embedded in-process loop call the same functions (`registry.domain.health`)."""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings

log = logging.getLogger(__name__)


def tick() -> dict:
    """One pass of every periodic job; idempotent, safe to run concurrently."""
    from registry.domain import health

    return health.tick()


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
