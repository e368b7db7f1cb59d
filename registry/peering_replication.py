"""Pull what peers export to us, one long-poll loop per active peering.

Each loop asks the peer's `/v1/peering/exported` with our stream secret and
the hash of what we hold; the peer answers when its export differs (or at
`wait`), and `peering.apply_import` writes only the services that changed.
A refused secret means the peer deleted the peering: ours turns TERMINATED.
Unreachable peers are retried with a capped backoff while the imports are
kept (sidecars keep their last endpoints).

Runs in every `mesh server` process; with several servers each pulls, and
the writes are idempotent (an unchanged import writes nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from meshproto import peering as pure
from registry import db
from registry import topics as topic
from registry.changes import hub
from registry.domain import peering

log = logging.getLogger(__name__)

WAIT = "30s"
BACKOFF_MAX = 5.0


async def _follow(
    client: httpx.AsyncClient, peering_id: str, name: str, addresses: list[str], secret: str
) -> None:
    known = ""
    backoff = 0.2
    turn = 0
    while True:
        address = addresses[turn % len(addresses)]
        try:
            r = await client.get(
                pure.server_url(address) + "/v1/peering/exported",
                params={"hash": known, "wait": WAIT},
                headers={pure.SECRET_HEADER: secret},
            )
        except httpx.HTTPError as exc:
            turn += 1
            await db.run_write(peering.note_failure, peering_id, f"cannot reach {address}: {exc}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        if r.status_code == 403:
            await db.run_write(
                peering.note_failure, peering_id, "the peer deleted the peering", revoked=True
            )
            return
        if r.status_code != 200:
            await db.run_write(
                peering.note_failure, peering_id, f"peer answered {r.status_code}: {r.text[:200]}"
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        try:
            payload = r.json()
            await db.run_write(peering.apply_import, peering_id, payload)
            known = str(payload.get("Hash") or "")
            backoff = 0.2
        except (ValueError, TypeError) as exc:
            await db.run_write(peering.note_failure, peering_id, f"bad export from peer: {exc}")
            await asyncio.sleep(BACKOFF_MAX)


async def run() -> None:
    """Keep one `_follow` task per peering we pull from, for the process's life."""
    tasks: dict[tuple, asyncio.Task] = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0)) as client:
        try:
            while True:
                waiter = hub.watch([topic.PEERINGS])
                try:
                    try:
                        targets = await db.run(peering.pull_targets)
                    except Exception:
                        log.exception("listing peerings failed")
                        targets = []
                    wanted = {(t[0], t[1], tuple(t[2]), t[3]): t for t in targets}
                    for key in list(tasks):
                        if key not in wanted or tasks[key].done():
                            tasks.pop(key).cancel()
                    for key, (pid, name, addresses, secret) in wanted.items():
                        if key not in tasks:
                            tasks[key] = asyncio.create_task(
                                _follow(client, pid, name, addresses, secret),
                                name=f"peering-{name}",
                            )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(waiter.future, 5.0)
                finally:
                    hub.unwatch(waiter)
        finally:
            for t in tasks.values():
                t.cancel()
            for t in tasks.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
