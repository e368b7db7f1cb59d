"""Cloud sync as background work: a Celery task per run, and the schedule.

- Production (MESH_TASKS=celery): `mesh beat` sends `clouds.tasks.schedule`
  every MESH_CLOUD_TICK_SECONDS; it queues a run for each account that is due
  and sends `clouds.tasks.sync_cloud_account` for it to the workers.
- Embedded (MESH_TASKS=inprocess): `run_inprocess()` in the server process
  does the same, and runs go to threads of the server (two at a time).

On-demand syncs (`POST /api/clouds/<name>/sync`) are queued and dispatched the
same way. However many are dispatched, one run per account works at a time
(`clouds.domain.sync` claims the account).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models import Q
from django.utils import timezone

from clouds.models import CloudAccount, SyncRun
from meshweb.celery import app

log = logging.getLogger(__name__)
# In-process runs: at most two at once, on daemon threads, so that stopping the server
# never waits for a sync (a run cut short commits nothing; the next run marks it abandoned).
_slots = threading.BoundedSemaphore(2)


@app.task(name="clouds.tasks.sync_cloud_account")
def sync_cloud_account(run_id: int) -> dict | None:
    """Run one queued sync run; idempotent (a run that is not queued is left alone)."""
    from clouds.domain import sync

    run = sync.sync_cloud_account(int(run_id))
    return None if run is None else {"id": run.pk, "status": run.status}


def _in_thread(run_id: int) -> None:
    from clouds.domain import sync

    with _slots:
        close_old_connections()
        try:
            sync.sync_cloud_account(run_id)
        except Exception:
            log.exception("cloud sync run %s failed", run_id)
        finally:
            connection.close()


def dispatch(run: SyncRun) -> None:
    """Send a queued run to the workers (or the server's own pool) once it is committed."""
    run_id = run.pk
    if settings.MESH_TASKS == "celery":
        transaction.on_commit(lambda: sync_cloud_account.apply_async(args=[run_id]))
        return
    transaction.on_commit(
        lambda: threading.Thread(
            target=_in_thread, args=(run_id,), name=f"cloud-sync-{run_id}", daemon=True
        ).start()
    )


@app.task(name="clouds.tasks.schedule")
def schedule() -> int:
    """Queue a run for every enabled account that is due; returns how many."""
    now = timezone.now()
    queued = 0
    due = CloudAccount.objects.filter(enabled=True).filter(
        Q(next_sync_at__isnull=True) | Q(next_sync_at__lte=now)
    )
    for account in due:
        # Claim the slot: only one scheduler (beat, or any server) queues this one.
        taken = CloudAccount.objects.filter(
            pk=account.pk, next_sync_at=account.next_sync_at
        ).update(next_sync_at=now + timedelta(seconds=account.interval_seconds))
        if not taken:
            continue
        run = SyncRun.objects.create(account=account, trigger="schedule")
        dispatch(run)
        queued += 1
    return queued


async def run_inprocess() -> None:
    """The embedded default's scheduler: `schedule()` every MESH_CLOUD_TICK_SECONDS."""
    from registry import db

    while True:
        try:
            await db.run(schedule)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cloud sync schedule failed")
        await asyncio.sleep(settings.MESH_CLOUD_TICK_SECONDS)
