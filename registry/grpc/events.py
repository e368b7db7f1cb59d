"""The event stream (`StreamEvents`): one per connected agent that asked for events.

It sends the events fired for the caller's node after the `LTime` the agent
names (0: since its node entered the catalog), oldest first, then waits on the change hub for the
`events` topic and sends what is new. A missed wake (a lost Redis message)
costs at most `RECHECK_SECONDS`. Events are few and small (a bounded buffer
per datacenter), so a send is never held back for a newer one: each event is
delivered once per stream, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from meshproto.proto import mesh_pb2
from registry import db
from registry import topics as topic
from registry.changes import hub
from registry.domain import events
from registry.grpc.auth import Caller

RECHECK_SECONDS = 30.0


def to_message(event) -> mesh_pb2.UserEvent:
    return mesh_pb2.UserEvent(
        id=event.id,
        name=event.name,
        payload=bytes(event.payload or b""),
        node_filter=event.node_filter,
        service_filter=event.service_filter,
        tag_filter=event.tag_filter,
        ltime=event.ltime,
    )


async def event_stream(caller: Caller, after: int) -> AsyncIterator[mesh_pb2.UserEvent]:
    """Every event for `caller`'s node fired after `after`, as it comes."""
    waiter = hub.watch((topic.EVENTS,))
    try:
        if after == 0:
            after = await db.run(events.start_after, caller.datacenter, caller.node)
        while True:
            after, batch = await db.run(events.events_after, caller.datacenter, caller.node, after)
            for event in batch:
                yield to_message(event)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter.future), RECHECK_SECONDS)
            hub.rearm(waiter)
    finally:
        hub.unwatch(waiter)
