"""A token bucket per source address for failed `Join`s.

A join token is a secret an attacker may try to guess: each failed `Join`
from an address takes a token from its bucket (`MESH_JOIN_FAILURE_BURST`,
refilled one every `MESH_JOIN_FAILURE_REFILL_SECONDS`); with the bucket
empty, every `Join` from that address is answered RESOURCE_EXHAUSTED before
the token is looked at. Successful joins cost nothing. Per server process,
in memory: with N processes an address gets N buckets, which still bounds
guessing to a handful a minute.
"""

from __future__ import annotations

import threading
import time

MAX_ADDRESSES = 10_000  # full buckets are dropped past this many (memory bound)


class JoinThrottle:
    """`retry_after(host)`: seconds to wait (0: go ahead); `failed(host)`: take a token."""

    def __init__(self, burst: int, refill_seconds: float, clock=time.monotonic) -> None:
        self.burst, self.refill, self.clock = float(burst), float(refill_seconds), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # host -> (tokens, at)
        self._lock = threading.Lock()

    def _level(self, host: str, now: float) -> float:
        tokens, at = self._buckets.get(host, (self.burst, now))
        return min(self.burst, tokens + (now - at) / self.refill)

    def retry_after(self, host: str) -> float:
        with self._lock:
            level = self._level(host, self.clock())
        return 0.0 if level >= 1.0 else (1.0 - level) * self.refill

    def failed(self, host: str) -> None:
        with self._lock:
            now = self.clock()
            self._buckets[host] = (max(0.0, self._level(host, now) - 1.0), now)
            if len(self._buckets) > MAX_ADDRESSES:
                for h in [h for h in self._buckets if self._level(h, now) >= self.burst]:
                    del self._buckets[h]
