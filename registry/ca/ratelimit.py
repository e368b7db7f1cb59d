"""The CSR signing rate limit: a token bucket with a bounded waiting queue.

Signing is the CA's one CPU-heavy operation (RSA above all), and a fleet of
agents whose leaves all expire together (or a root rotation) can ask for
thousands at once. Each server process signs at most `rate` CSRs per
second (Consul's CSRMaxPerSecond, default 50), bursting up to one second's
worth. A request that finds the bucket empty waits its turn, but at most
`queue` requests may wait (CSRMaxConcurrent here: the queue bound); beyond
that it is refused at once with 429 `rate limit reached, try again later`,
so a caller retries with backoff instead of piling up threads and sockets.

The limit is per process: N servers sign up to N x rate per second.
A rate of 0 disables the limit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from registry.errors import TooManyRequests

RATE_LIMITED = "rate limit reached, try again later"


class CSRRateLimiter:
    """Thread-safe token bucket with reservations.

    Tokens may go negative down to `-queue`: a negative balance is the
    queue of callers that have reserved a future token and sleep until it
    is due, so waiting costs no lock and the order is first come, first served.
    """

    def __init__(
        self,
        rate: float,
        queue: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self.rate = 0.0
        self.queue = 0
        self._tokens = 0.0
        self._stamp = clock()
        self.configure(rate, queue)

    def configure(self, rate: float, queue: int) -> None:
        """Change the limits (a CA configuration update); a full bucket to start."""
        with self._lock:
            if rate == self.rate and queue == self.queue:
                return
            self.rate = max(0.0, float(rate))
            self.queue = max(0, int(queue))
            self._tokens = self._burst
            self._stamp = self._clock()

    @property
    def _burst(self) -> float:
        return max(1.0, self.rate)

    def reserve(self) -> float:
        """Take a token: 0.0 if one is free now, else the seconds to wait for
        the reserved one. Raises TooManyRequests when the queue is full."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            # Each caller still waiting holds one token of debt: a balance in
            # [-1, 0) means one waiter, [-2, -1) two, and so on.
            waiting = math.ceil(-self._tokens - 1e-9) if self._tokens < 0 else 0
            if waiting >= self.queue:
                raise TooManyRequests(RATE_LIMITED)
            delay = (1.0 - self._tokens) / self.rate
            self._tokens -= 1.0
            return delay

    def acquire(self) -> None:
        """Block until this caller may sign (bounded by queue / rate), or raise 429."""
        delay = self.reserve()
        if delay > 0:
            self._sleep(delay)
