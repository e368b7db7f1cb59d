"""Change notification for blocking queries.

A write commits, then announces `(index, topics)`. Waiting readers register
the topics they read with the process's `ChangeHub` *before* they read, so a
change that lands between the read and the wait cannot be missed.

Across processes the announcement travels over Redis pub/sub (a channel
per database); in the embedded default there is one process and the hub
is notified directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable

log = logging.getLogger(__name__)

ORIGIN = uuid.uuid4().hex  # this process, so it can skip its own echoes


class Waiter:
    """One waiting reader: a future resolved with the index of a change."""

    __slots__ = ("future", "topics", "prefixes")

    def __init__(self, future: asyncio.Future, topics: tuple[str, ...], prefixes: tuple[str, ...]):
        self.future = future
        self.topics = topics
        self.prefixes = prefixes


class ChangeHub:
    """Wakes waiting readers whose topics a change touched.

    Exact topics are a dict lookup; prefix watchers (KV `recurse`) are found by
    walking the changed topic's own prefixes, so a change costs O(len(topic)),
    not O(watchers).
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._exact: dict[str, set[Waiter]] = {}
        self._prefix: dict[str, set[Waiter]] = {}
        # Counts delivered changes; readers use it to tell a result computed
        # after their wake-up from one computed before it.
        self.seq = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def watch(self, topics: Iterable[str] = (), prefixes: Iterable[str] = ()) -> Waiter:
        loop = asyncio.get_running_loop()
        if self.loop is None:
            self.loop = loop
        waiter = Waiter(loop.create_future(), tuple(topics), tuple(prefixes))
        for t in waiter.topics:
            self._exact.setdefault(t, set()).add(waiter)
        for p in waiter.prefixes:
            self._prefix.setdefault(p, set()).add(waiter)
        return waiter

    def rearm(self, waiter: Waiter) -> None:
        """Give a woken waiter a fresh future, keeping its topics registered
        (cheaper than unwatch + watch for a reader that waits on the same
        topics again). A change from now on resolves the new future."""
        if waiter.future.done():
            waiter.future = asyncio.get_running_loop().create_future()

    def unwatch(self, waiter: Waiter) -> None:
        for table, keys in ((self._exact, waiter.topics), (self._prefix, waiter.prefixes)):
            for k in keys:
                bucket = table.get(k)
                if bucket is not None:
                    bucket.discard(waiter)
                    if not bucket:
                        del table[k]

    def notify(self, index: int, topics: Iterable[str]) -> None:
        """Wake the waiters of `topics`. Must run on the hub's loop."""
        self.seq += 1
        woken: set[Waiter] = set()
        for topic in topics:
            woken.update(self._exact.get(topic, ()))
            if self._prefix:
                for end in range(len(topic) + 1):
                    bucket = self._prefix.get(topic[:end])
                    if bucket:
                        woken.update(bucket)
        for w in woken:
            if not w.future.done():
                w.future.set_result(index)

    def notify_threadsafe(self, index: int, topics: list[str]) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            if _on_loop_thread(loop):
                self.notify(index, topics)
            else:
                loop.call_soon_threadsafe(self.notify, index, topics)
        except RuntimeError:  # loop closed between the check and the call
            pass

    def waiting(self) -> int:
        return len(
            {w for b in self._exact.values() for w in b}
            | {w for b in self._prefix.values() for w in b}
        )


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


hub = ChangeHub()

_redis_lock = threading.Lock()
_redis_client = None


def _redis():
    global _redis_client
    from django.conf import settings

    if not settings.REDIS_URL:
        return None
    with _redis_lock:
        if _redis_client is None or _redis_client_pid != os.getpid():
            import redis

            globals()["_redis_client_pid"] = os.getpid()
            _redis_client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
        return _redis_client


_redis_client_pid = -1


def channel() -> str:
    """Changes are only meaningful between servers sharing one database."""
    import hashlib

    from django.conf import settings

    db = settings.DATABASES["default"]
    ident = f"{db.get('HOST')}:{db.get('PORT')}/{db.get('NAME')}"
    return "meshweb:changes:" + hashlib.sha1(ident.encode()).hexdigest()[:12]


def publish(index: int, topics: list[str]) -> None:
    """Announce a committed change to this process and, with Redis, to all others."""
    hub.notify_threadsafe(index, topics)
    client = _redis()
    if client is None:
        return
    message = json.dumps({"o": ORIGIN, "i": index, "t": topics})
    try:
        client.publish(channel(), message)
    except Exception:  # the write is committed; other servers catch up at their wait timeout
        log.exception("could not announce change %s on Redis", index)


async def listen_redis(url: str) -> None:
    """Relay other processes' changes to this process's hub, reconnecting forever."""
    import redis.asyncio as aioredis

    delay = 0.1
    while True:
        try:
            client = aioredis.Redis.from_url(url)
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(channel())
                delay = 0.1
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    try:
                        data = json.loads(msg["data"])
                    except (ValueError, TypeError):
                        log.warning("ignoring a malformed change message")
                        continue
                    if data.get("o") == ORIGIN:
                        continue
                    hub.notify(int(data["i"]), list(data["t"]))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("change listener lost Redis (%s); retrying in %.1fs", exc, delay)
            # A missed change would leave readers waiting until their timeout:
            # wake everyone once the connection is back so they re-read.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            hub.notify(0, list(hub._exact) + list(hub._prefix))
