"""Live updates for UI pages: a server-sent event stream fed by the change hub.

`GET /ui/events?topics=checks,service:web` holds one connection per open page
and sends `event: change` each time a write touches one of those topics —
the hub that wakes `/v1` blocking queries wakes this stream too, so a check
turning critical reaches the page as soon as its write commits. The event
carries only the new index: the page then re-reads its live regions through
the normal (ACL-checked) views. The browser never polls.

Served on the ASGI loop (not on the UI's thread pool, where a held connection
would cost a thread): `meshweb.asgi` routes the path here. The session is
checked when the stream opens and again every `RECHECK_SECONDS`; a stream
lives at most `MAX_SECONDS` (EventSource reconnects by itself) and sends a
comment every `KEEPALIVE_SECONDS` so that idle proxies keep it open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from django.conf import settings
from django.db import close_old_connections, connection

from frontend.middleware import CONTENT_SECURITY_POLICY
from registry import topics
from registry.changes import hub

PATH = "/ui/events"
KEEPALIVE_SECONDS = 15.0
RECHECK_SECONDS = 60.0
MAX_SECONDS = 600.0
MAX_TOPICS = 32

GLOBAL_TOPICS = frozenset(
    {
        topics.NODES,
        topics.SERVICES,
        topics.CHECKS,
        topics.DATACENTERS,
        topics.ACL,
        topics.JOIN_TOKENS,
        topics.INTENTIONS,
        topics.CA_ROOTS,
        topics.CA_CONFIG,
        topics.DISCOVERY_CHAIN,
    }
)
# Per-object topics a page may follow, by the prefix their spelling starts with.
OBJECT_TOPICS = {
    "service": topics.service,
    "node": topics.node,
    "config": lambda rest: "config:" + rest,
}


def parse_topics(raw: str) -> tuple[list[str], list[str]]:
    """(exact topics, prefix topics) from `checks,service:web,kv:app/`; unknown names dropped."""
    exact: list[str] = []
    prefixes: list[str] = []
    for item in raw.split(",")[:MAX_TOPICS]:
        item = item.strip()
        if item in GLOBAL_TOPICS:
            exact.append(item)
            continue
        kind, _, rest = item.partition(":")
        if kind == "kv":
            prefixes.append(topics.kv(rest))
        elif kind in OBJECT_TOPICS and rest:
            exact.append(OBJECT_TOPICS[kind](rest))
    return exact, prefixes


def _session_valid(session_key: str | None) -> bool:
    """Is this a signed-in session whose token still resolves? (Runs in a thread.)"""
    from django.contrib.sessions.backends.db import SessionStore

    from frontend.auth import SESSION_KEY
    from registry.domain.acl import resolve_token
    from registry.errors import MeshError

    close_old_connections()
    try:
        if not settings.MESH_ACL_ENABLED:
            return True
        if not session_key:
            return False
        secret = SessionStore(session_key=session_key).get(SESSION_KEY)
        if not secret:
            return False
        try:
            resolve_token(secret)
        except MeshError:
            return False
        return True
    finally:
        connection.close()


def _cookie(scope, name: str) -> str | None:
    for key, value in scope["headers"]:
        if key == b"cookie":
            jar = SimpleCookie()
            with contextlib.suppress(Exception):
                jar.load(value.decode("latin-1"))
            if name in jar:
                return jar[name].value
    return None


async def _respond(send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _disconnected(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def handle(scope, receive, send) -> None:
    """The ASGI handler for `GET /ui/events`."""
    if scope.get("method") != "GET":
        await _respond(send, 405, b"method not allowed")
        return
    session_key = _cookie(scope, settings.SESSION_COOKIE_NAME)
    if not await asyncio.to_thread(_session_valid, session_key):
        await _respond(send, 401, b"sign in first")
        return
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    exact, prefixes = parse_topics(",".join(query.get("topics", [])))
    if not exact and not prefixes:
        await _respond(send, 400, b"no known topics: ?topics=checks,service:<name>,...")
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),
                (b"x-content-type-options", b"nosniff"),
                (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
            ],
        }
    )
    waiter = hub.watch(exact, prefixes)
    gone = asyncio.ensure_future(_disconnected(receive))
    started = last_check = time.monotonic()
    try:
        await _event(send, "hello", {"topics": exact + prefixes})
        while not gone.done():
            now = time.monotonic()
            if now - started > MAX_SECONDS:
                break
            if now - last_check > RECHECK_SECONDS:
                last_check = now
                if not await asyncio.to_thread(_session_valid, session_key):
                    await _event(send, "signout", {})
                    break
            done, _ = await asyncio.wait(
                {waiter.future, gone}, timeout=KEEPALIVE_SECONDS, return_when="FIRST_COMPLETED"
            )
            if gone in done:
                break
            if waiter.future in done:
                index = waiter.future.result()
                hub.rearm(waiter)
                await _event(send, "change", {"index": index})
            else:
                await send(
                    {"type": "http.response.body", "body": b": keepalive\n\n", "more_body": True}
                )
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        pass  # the client went away mid-write
    finally:
        hub.unwatch(waiter)
        gone.cancel()


async def _event(send, name: str, data: dict) -> None:
    payload = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    await send({"type": "http.response.body", "body": payload, "more_body": True})
