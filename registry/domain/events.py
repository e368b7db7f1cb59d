"""User events: fire, list, and which nodes an event is for.

An event is a row in a bounded per-datacenter buffer (`MESH_EVENT_BUFFER`,
Consul's agents keep the last 256): firing one is a write that stores it,
drops the oldest beyond the bound, and touches the `events` topic, which
wakes `GET /v1/event/list` blocking queries and every agent's event stream
(`registry.grpc.events`). Its `LTime` is the index of that write, so events
order by it and a stream resumes after the last one it delivered.

Filters are RE2 regular expressions, as Consul's (Go's `regexp`): `node`
against the node name, `service` against the names of the services on the
node, `tag` against the tags of those matching services. An empty filter
matches everything.
"""

from __future__ import annotations

import base64
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import re2
from django.conf import settings

from registry import topics as topic
from registry.errors import BadRequest, TooLarge
from registry.models import Node, ServiceInstance, UserEvent
from registry.txn import Change, topic_index

log = logging.getLogger("meshweb.events")

MAX_NAME = 256
MAX_FILTER = 512
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False


def _regexp(raw: str, what: str):
    if len(raw) > MAX_FILTER:
        raise BadRequest(f"Invalid {what} filter: longer than {MAX_FILTER} characters")
    try:
        return re2.compile(raw, _OPTIONS)
    except re2.error as exc:
        raise BadRequest(f"Invalid {what} filter {raw!r}: {exc}") from None


def validate_name(name: str) -> str:
    """Consul's rules: a name is required and must not start with `_` (reserved)."""
    if not name:
        raise BadRequest("Missing name")
    if name.startswith("_"):
        raise BadRequest(f"Invalid event name {name!r}: names starting with '_' are reserved")
    if len(name) > MAX_NAME or "\x00" in name:
        raise BadRequest(f"Invalid event name: at most {MAX_NAME} characters, no NUL")
    return name


def event_json(event: UserEvent) -> dict[str, Any]:
    """An event as Consul shows it (`Payload` base64, null when empty)."""
    payload = bytes(event.payload) if event.payload is not None else b""
    return {
        "ID": event.id,
        "Name": event.name,
        "Payload": base64.b64encode(payload).decode("ascii") if payload else None,
        "NodeFilter": event.node_filter,
        "ServiceFilter": event.service_filter,
        "TagFilter": event.tag_filter,
        "Version": 1,
        "LTime": event.ltime,
    }


def fire(
    name: str,
    payload: bytes,
    *,
    dc: str | None = None,
    node_filter: str = "",
    service_filter: str = "",
    tag_filter: str = "",
) -> UserEvent:
    """Store an event in its datacenter's buffer and wake whoever waits for events."""
    validate_name(name)
    limit = settings.MESH_EVENT_MAX_PAYLOAD
    if len(payload) > limit:
        raise TooLarge(f"User event payload exceeds limit of {limit} bytes ({len(payload)} bytes)")
    for raw, what in ((node_filter, "node"), (service_filter, "service"), (tag_filter, "tag")):
        _regexp(raw, what)
    if tag_filter and not service_filter:
        raise BadRequest("Cannot provide tag filter without service filter")
    dc = dc or settings.MESH_DC
    with Change() as change:
        event = UserEvent(
            id=str(uuid.uuid4()),
            datacenter=dc,
            name=name,
            payload=payload or None,
            node_filter=node_filter,
            service_filter=service_filter,
            tag_filter=tag_filter,
            ltime=change.index,
        )
        event.save(force_insert=True)
        keep = settings.MESH_EVENT_BUFFER
        stale = list(
            UserEvent.objects.filter(datacenter=dc)
            .order_by("-ltime")
            .values_list("id", flat=True)[keep:]
        )
        if stale:
            UserEvent.objects.filter(id__in=stale).delete()
        change.touch(topic.EVENTS)
        state = {**event_json(event), "Payload": f"<{len(payload)} bytes>"}
        change.audit("event.fire", "event", name, None, state)
    log.info("user event %r fired (%s, %d bytes)", name, event.id, len(payload))
    return event


@dataclass(frozen=True)
class Target:
    """What an event's filters are matched against: a node and its services' tags."""

    node: str
    services: dict[str, set[str]]  # service name -> tags of its instances on the node


def target(node_name: str) -> Target:
    services: dict[str, set[str]] = {}
    for name, tags in ServiceInstance.objects.filter(node__name=node_name).values_list(
        "name", "tags"
    ):
        services.setdefault(name, set()).update(tags or ())
    return Target(node_name, services)


def matches(event: UserEvent, where: Target) -> bool:
    """Consul's agent-side rule (`shouldProcessUserEvent`): is `event` for this node?"""
    if event.node_filter and not _regexp(event.node_filter, "node").search(where.node):
        return False
    if event.service_filter:
        service_re = _regexp(event.service_filter, "service")
        tag_re = _regexp(event.tag_filter, "tag") if event.tag_filter else None
        for name, tags in where.services.items():
            if service_re.search(name) and (tag_re is None or any(tag_re.search(t) for t in tags)):
                return True
        return False
    return True


def list_events(
    authz,
    *,
    dc: str | None = None,
    name: str = "",
    node: str = "",
    service: str = "",
    tag: str = "",
) -> tuple[int, list[dict[str, Any]], bool]:
    """`GET /v1/event/list`: the buffer, oldest first, as the caller may see it.

    `node` / `service` / `tag` narrow the list to the events that would be
    delivered to that node (its registered services and tags), or to a node
    running that service with that tag.
    """
    index = max(topic_index(topic.EVENTS), 1)
    events = UserEvent.objects.filter(datacenter=dc or settings.MESH_DC).order_by("ltime")
    if name:
        events = events.filter(name=name)
    where: Target | None = None
    if node or service:
        services = {service: {tag} if tag else set()} if service else {}
        if node and Node.objects.filter(name=node).exists() and not service:
            where = target(node)
        else:
            where = Target(node, services)
    out, filtered = [], False
    for event in events:
        if not authz.event_read(event.name):
            filtered = True
            continue
        if where is not None and not matches(event, where):
            continue
        out.append(event_json(event))
    return index, out, filtered


def events_after(dc: str, node: str, after: int) -> tuple[int, list[UserEvent]]:
    """The events for `node` fired after `after`, and the last `LTime` looked at.

    A stream resumes after the last event it looked at, matched or not, so an
    event the node was not for when fired is not delivered later on.
    """
    rows = list(UserEvent.objects.filter(datacenter=dc, ltime__gt=after).order_by("ltime"))
    if not rows:
        return after, []
    where = target(node)
    return rows[-1].ltime, [e for e in rows if matches(e, where)]


def start_after(dc: str, node: str) -> int:
    """Where a new agent's stream starts: after the index its node entered the catalog
    (it syncs before it subscribes), so no event fired since it joined is missed; for
    a node the catalog does not know, after the newest event."""
    created = Node.objects.filter(name=node).values_list("create_index", flat=True).first()
    if created:
        return created
    return (
        UserEvent.objects.filter(datacenter=dc).order_by("-ltime").values_list("ltime", flat=True)
    ).first() or 0
