"""What protects a service from its callers and from itself: rate limits,
circuit breakers, the retry budget and outlier detection. Pure: time comes in
from `time.monotonic()` and randomness from `random`, nothing else."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from meshproto.proxycfg import Limits, OutlierDetection, RetryPolicy

EndpointKey = tuple[str, int]


class TokenBucket:
    """`rate` tokens a second, at most `burst` (at least 1) banked."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int = 0) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1) if burst else max(1.0, rate / 10))
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0.0 when a token was taken; else the seconds until the next one."""
        now = time.monotonic()
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate


class RetryBudget:
    """Linkerd's retry budget: retries may be at most `percent` of the requests
    seen in the last `window` seconds, plus `min_per_s` a second — so a failing
    upstream gets at most (1 + percent/100) × the callers' requests, plus the
    floor, however many retries each route allows."""

    __slots__ = ("ratio", "floor", "window", "_requests", "_retries", "_second")

    def __init__(self, policy: RetryPolicy) -> None:
        self.ratio = policy.budget_percent / 100.0
        self.window = max(1, int(policy.budget_window_s))
        self.floor = policy.budget_min_per_s * self.window
        self._requests = [0] * self.window
        self._retries = [0] * self.window
        self._second = int(time.monotonic())

    def _tick(self) -> int:
        now = int(time.monotonic())
        if now != self._second:
            gap = min(now - self._second, self.window)
            for k in range(1, gap + 1):
                i = (self._second + k) % self.window
                self._requests[i] = 0
                self._retries[i] = 0
            self._second = now
        return now % self.window

    def request(self) -> None:
        self._requests[self._tick()] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget (False: exhausted, do not retry)."""
        i = self._tick()
        if sum(self._retries) + 1 > sum(self._requests) * self.ratio + self.floor:
            return False
        self._retries[i] += 1
        return True


class Circuit:
    """One cluster's circuit breakers (Envoy's): open connections, requests
    waiting for one, requests in flight. 0 means unlimited."""

    __slots__ = ("limits", "connections", "pending", "active")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.connections = 0
        self.pending = 0
        self.active = 0

    def request_overflow(self) -> str:
        """ "" when a new request may go; else which breaker is open."""
        lim = self.limits.max_concurrent_requests
        if lim and self.active >= lim:
            return "max_concurrent_requests"
        return ""

    def may_connect(self) -> bool:
        lim = self.limits.max_connections
        return not lim or self.connections < lim

    def may_wait(self) -> bool:
        lim = self.limits.max_pending_requests
        return not lim or self.pending < lim


@dataclass
class _Host:
    failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0


class Outliers:
    """Passive health checking of one cluster's endpoints: `max_failures`
    consecutive errors (5xx, connect failures, resets) eject an endpoint for
    `base_ejection_s` × the times it was ejected before; at most
    `max_ejection_percent` of the endpoints (and at least one) are out at once.
    An ejected endpoint comes back by itself when its time is over."""

    __slots__ = ("policy", "hosts", "size", "ejected_total")

    def __init__(self, policy: OutlierDetection, size: int) -> None:
        self.policy = policy
        self.hosts: dict[EndpointKey, _Host] = {}
        self.size = size
        self.ejected_total = 0

    def ejected(self, now: float | None = None) -> set[EndpointKey]:
        now = time.monotonic() if now is None else now
        return {k for k, h in self.hosts.items() if h.ejected_until > now}

    def success(self, key: EndpointKey) -> None:
        h = self.hosts.get(key)
        if h is not None:
            h.failures = 0
            # Healthy through a whole interval after coming back: forget the past.
            if h.ejections and time.monotonic() > h.ejected_until + self.policy.interval_s:
                h.ejections = 0

    def failure(self, key: EndpointKey) -> bool:
        """Count a failure; True when it ejected the endpoint."""
        h = self.hosts.get(key)
        if h is None:
            h = self.hosts[key] = _Host()
        h.failures += 1
        now = time.monotonic()
        if h.failures < self.policy.max_failures or h.ejected_until > now:
            return False
        h.failures = 0
        out = len(self.ejected(now))
        cap = max(1, self.size * self.policy.max_ejection_percent // 100)
        if out >= cap:
            return False
        if random.random() * 100 >= self.policy.enforcing_consecutive_5xx:
            return False
        h.ejections += 1
        h.ejected_until = now + self.policy.base_ejection_s * h.ejections
        self.ejected_total += 1
        return True
