"""A lean ASGI handler for the Consul-compatible `/v1` API.

`/v1` views are Django async views resolved through Django's URLconf, but
Django's own ASGI handler wraps every request in a thread-sensitive context
(one new thread per request) and runs the HTML-oriented middleware stack.
For an API whose clients hold a thousand long-polls and send heartbeats
every few seconds, that costs more than the work itself. This handler keeps
the parts `/v1` needs: body reading with a size limit, URL resolution, the
view, cancellation when the client goes away, and a plain-text 500 with a
logged traceback when a view fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponse
from django.urls import Resolver404, get_resolver

log = logging.getLogger("meshweb.v1")


async def read_body(receive, limit: int) -> tuple[io.BytesIO | None, bool]:
    """The request body, or None if the client left; the flag says it was too large."""
    body = io.BytesIO()
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            body.write(chunk)
        if not message.get("more_body", False):
            break
    body.seek(0)
    return body, size > limit


async def _send(send, response: HttpResponse) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.items()]
    if getattr(response, "streaming", False):
        # A stream (`/v1/agent/monitor`): chunks as they come, until the view's
        # iterator ends or the client goes away (which cancels this task).
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        async for chunk in response.streaming_content:
            await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = response.content
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _text(status: int, message: str) -> HttpResponse:
    return HttpResponse(message.encode(), status=status, content_type="text/plain; charset=utf-8")


async def handle_v1(scope, receive, send) -> None:
    # A snapshot restore is the one body allowed past MESH_MAX_BODY_SIZE.
    limit = (
        settings.MESH_SNAPSHOT_MAX_SIZE
        if scope["path"] == "/v1/snapshot"
        else settings.MESH_MAX_BODY_SIZE
    )
    body, too_large = await read_body(receive, limit)
    if body is None:
        return
    if too_large:
        await _send(send, _text(413, f"Request body too large, max size: {limit} bytes"))
        return
    request = ASGIRequest(scope, body)
    try:
        match = get_resolver().resolve(request.path_info)
    except Resolver404:
        await _send(
            send,
            _text(404, f"Invalid URL path: not a recognized HTTP API endpoint: {request.path}"),
        )
        return

    async def respond() -> None:
        try:
            response = await match.func(request, *match.args, **match.kwargs)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = _text(500, "Internal server error")
        await _send(send, response)

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    work = asyncio.create_task(respond())
    watch = asyncio.create_task(disconnected())
    # A long-poll whose client went away is cancelled at once, freeing its waiter.
    await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    for task in (watch, work):
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if work.done() and not work.cancelled():
        work.result()
