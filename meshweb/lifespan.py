"""What a `mesh server` process runs beside its HTTP API, started and stopped with it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from django.conf import settings

from registry import db
from registry.changes import hub, listen_redis

log = logging.getLogger("meshweb.server")

WRITER_STOP_SECONDS = 5.0


def _tune_gc() -> None:
    """Keep full garbage collections rare and short.

    Everything loaded at start-up (Django, the URLconf, models) lives for the
    process's life: freezing it takes it out of every later collection. A
    higher young-generation threshold means fewer collections while a write
    wakes a thousand watchers at once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


async def _start() -> list[asyncio.Task]:
    _tune_gc()
    hub.bind(asyncio.get_running_loop())
    tasks: list[asyncio.Task] = [asyncio.create_task(db.watch_writer(), name="writer-watchdog")]
    if settings.REDIS_URL:
        tasks.append(asyncio.create_task(listen_redis(settings.REDIS_URL), name="redis-changes"))
    if settings.MESH_DNS_ADDR:
        from registry.dns import start_dns

        tasks.append(asyncio.create_task(start_dns(*settings.MESH_DNS_ADDR), name="dns"))
    if settings.MESH_GRPC_ADDR:
        from registry.grpc.server import start_grpc

        tasks.append(await start_grpc(*settings.MESH_GRPC_ADDR))
    from registry.domain.servers import heartbeat

    tasks.append(asyncio.create_task(heartbeat(), name="server-heartbeat"))
    from registry.peering_replication import run as run_peering

    tasks.append(asyncio.create_task(run_peering(), name="peering"))
    if settings.MESH_TASKS == "inprocess":
        from registry.tasks import run_inprocess

        tasks.append(asyncio.create_task(run_inprocess(), name="tasks"))
        from clouds.tasks import run_inprocess as run_cloud_schedule

        tasks.append(asyncio.create_task(run_cloud_schedule(), name="cloud-sync-schedule"))
    return tasks


async def lifespan(scope, receive, send) -> None:
    tasks: list[asyncio.Task] = []
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                tasks = await _start()
            except Exception as exc:
                log.exception("startup failed")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            # Let the writer finish what is queued (bounded: a stuck database
            # must not hold the process).
            await asyncio.to_thread(db.writer.stop, WRITER_STOP_SECONDS)
            await send({"type": "lifespan.shutdown.complete"})
            return
