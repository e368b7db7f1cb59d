"""Static files under ASGI: WhiteNoise, made async-capable.

WhiteNoise's Django middleware is sync-only. Django adapts a sync middleware
in an async stack by running it, and everything below it, on a thread that
waits for the inner async handler: every `/v1` blocking query would then hold
a thread for its whole wait. This subclass keeps WhiteNoise's file index and
headers but is async-capable, so a request that is not for a static file goes
straight to the (async) handler below, and a static file streams from an
async iterator (no "must consume synchronous iterators" fallback).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from whitenoise.middleware import WhiteNoiseMiddleware

CHUNK = 64 * 1024


class AsyncWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    """WhiteNoiseMiddleware that serves both sync and async stacks."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response=None, **kwargs) -> None:
        # WhiteNoise warns when STATIC_ROOT is missing; before any collectstatic
        # it is simply empty.
        if settings.STATIC_ROOT:
            Path(settings.STATIC_ROOT).mkdir(parents=True, exist_ok=True)
        super().__init__(get_response, **kwargs)
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self._async:
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request):
        if self.autorefresh:  # development: looks on disk, off the event loop
            static_file = await asyncio.to_thread(self.find_file, request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is None:
            return await self.get_response(request)
        response = self.serve(static_file, request)
        body = getattr(response, "file_to_stream", None)
        if body is not None:
            response.streaming_content = _read_async(body)
        return response


async def _read_async(file) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(file.read, CHUNK):
            yield chunk
    finally:
        await asyncio.to_thread(file.close)
