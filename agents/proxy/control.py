"""The sidecar's side of the agent's Unix socket.

Protocol (JSON lines both ways):
- the sidecar sends `{"proxy_id": "<id>"}` once connected;
- the agent sends `{"config": <ProxyConfig JSON>, "cert": PEM, "key": PEM,
  "roots": [PEM, ...], "cert_not_after": <unix seconds, optional>}` — the first
  message normally carries all of them, later ones only what changed;
- the sidecar answers every message with `{"ack": <config version>}` once it is
  applied, or `{"nack": <version or null>, "error": "..."}` when it is not (the
  last good state then stays in force).

The socket going away changes nothing for traffic (static stability): the
sidecar keeps its state and reconnects forever, with exponential backoff and
jitter so that the sidecars of a restarting agent don't all knock at once.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

from agents.proxy.logs import log
from agents.proxy.metrics import Metrics

BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
MAX_MESSAGE = 32 * 1024 * 1024  # a line longer than this is refused and the stream reset
IO_TIMEOUT = 10.0


class ControlClient:
    """Connects to the agent's socket, feeds each line to `handle`, writes the replies."""

    def __init__(
        self,
        path: str,
        proxy_id: str,
        handle: Callable[[bytes], Awaitable[dict[str, Any]]],
        metrics: Metrics,
    ) -> None:
        self.path = path
        self.proxy_id = proxy_id
        self.handle = handle
        self.metrics = metrics
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Forever: connect, serve the stream until it ends, back off, reconnect."""
        delay = BACKOFF_MIN
        failures = 0
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.path, limit=MAX_MESSAGE), IO_TIMEOUT
                )
            except (TimeoutError, OSError) as exc:
                failures += 1
                if failures == 1 or failures % 50 == 0:
                    log.warning(
                        "agent socket unreachable; serving with the last state, retrying",
                        socket=self.path,
                        error=str(exc),
                        attempts=failures,
                    )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            failures = 0
            delay = BACKOFF_MIN
            self.metrics.control_connected = 1
            self.connected.set()
            log.info("connected to the agent", socket=self.path)
            try:
                await self._serve(reader, writer)
            except (TimeoutError, OSError) as exc:
                log.warning("agent stream failed", error=str(exc))
            finally:
                self.metrics.control_connected = 0
                self.connected.clear()
                writer.close()
            log.warning("agent socket closed; serving with the last state, reconnecting")
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._send(writer, {"proxy_id": self.proxy_id})
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                # A line past MAX_MESSAGE: answer, then start over on a fresh stream.
                self.metrics.config_rejected += 1
                await self._send(writer, {"nack": None, "error": "message too large"})
                return
            if not line:
                return
            if not line.strip():
                continue
            reply = await self.handle(line)
            await self._send(writer, reply)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
