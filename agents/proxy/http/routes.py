"""Routing an HTTP request by the compiled discovery chain: pure, no sockets.

A `Router` is built once per applied config and upstream (regexes compiled
then: a config whose regex does not compile is refused before the swap) and
asked once per request: the first route whose match holds wins; its splits
pick the cluster by weight (0.01 % precision: weights are floats).
"""

from __future__ import annotations

import random
import re
from bisect import bisect_right
from collections.abc import Mapping
from urllib.parse import parse_qsl

from meshproto.proxycfg import (
    HeaderMatch,
    Route,
    RouteMatch,
    RouteRateLimit,
    Upstream,
    WeightedCluster,
)

_ALL = RouteMatch()


class RouteError(ValueError):
    """A route the sidecar cannot apply (a regex that does not compile, no splits)."""


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RouteError(f"{what}: regex {pattern!r} does not compile: {exc}") from None


class _Header:
    __slots__ = ("m", "name", "pattern")

    def __init__(self, m: HeaderMatch, what: str) -> None:
        self.m = m
        self.name = m.name.lower()
        self.pattern = _compile(m.regex, what) if m.regex else None

    def matches(self, headers: Mapping[str, str]) -> bool:
        m = self.m
        value = headers.get(self.name)
        if value is None:
            return m.present and m.invert  # a missing header matches only "not present"
        if m.present:
            hit = True
        elif m.exact:
            hit = value == m.exact
        elif m.prefix:
            hit = value.startswith(m.prefix)
        elif m.suffix:
            hit = value.endswith(m.suffix)
        elif self.pattern is not None:
            hit = self.pattern.fullmatch(value) is not None
        else:
            hit = True
        return hit != m.invert


class CompiledRoute:
    """One route, ready to match; `pick()` draws one of its splits by weight."""

    __slots__ = (
        "route",
        "name",
        "path_exact",
        "path_prefix",
        "path_regex",
        "methods",
        "headers",
        "query",
        "splits",
        "_cumulative",
        "_total",
    )

    def __init__(self, route: Route, index: int, what: str) -> None:
        m = route.match
        self.route = route
        self.name = route.name or str(index)
        self.path_exact = m.path_exact
        self.path_prefix = m.path_prefix
        self.path_regex = _compile(m.path_regex, f"{what} PathRegex") if m.path_regex else None
        self.methods = frozenset(x.upper() for x in m.methods)
        self.headers = tuple(_Header(h, f"{what} header {h.name!r}") for h in m.headers)
        self.query = m.query
        splits = [s for s in route.splits if s.weight > 0]
        if not splits:
            raise RouteError(f"{what}: no split with a positive weight")
        self.splits: tuple[WeightedCluster, ...] = tuple(splits)
        total = 0.0
        cumulative = []
        for s in splits:
            total += s.weight
            cumulative.append(total)
        self._cumulative = cumulative
        self._total = total

    def matches(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> bool:
        if self.path_exact and path != self.path_exact:
            return False
        if self.path_prefix and not path.startswith(self.path_prefix):
            return False
        if self.path_regex is not None and self.path_regex.fullmatch(path) is None:
            return False
        if self.methods and method not in self.methods:
            return False
        for h in self.headers:
            if not h.matches(headers):
                return False
        if self.query:
            params = dict(parse_qsl(query, keep_blank_values=True))
            for name, exact in self.query:
                if name not in params or (exact and params[name] != exact):
                    return False
        return True

    def pick(self) -> WeightedCluster:
        if len(self.splits) == 1:
            return self.splits[0]
        r = random.random() * self._total
        return self.splits[min(bisect_right(self._cumulative, r), len(self.splits) - 1)]


class Router:
    """An upstream's routes, compiled (`RouteError` when one cannot be)."""

    __slots__ = ("routes", "needs_headers")

    def __init__(self, upstream: Upstream) -> None:
        known = {c.name for c in upstream.clusters}
        routes = []
        for i, r in enumerate(upstream.routes):
            what = f"upstream {upstream.destination!r} route {r.name or i}"
            compiled = CompiledRoute(r, i, what)
            for s in compiled.splits:
                if s.cluster not in known:
                    raise RouteError(f"{what}: split to unknown cluster {s.cluster!r}")
            routes.append(compiled)
        if not routes and upstream.clusters:
            only = upstream.clusters[0].name
            routes.append(CompiledRoute(Route(_ALL, (WeightedCluster(only, 100.0),)), 0, "default"))
        self.routes: tuple[CompiledRoute, ...] = tuple(routes)
        self.needs_headers = any(r.headers for r in routes)

    def match(
        self, method: str, path: str, query: str, headers: Mapping[str, str]
    ) -> CompiledRoute | None:
        for r in self.routes:
            if r.matches(method, path, query, headers):
                return r
        return None


def rewrite_prefix(target: str, prefix: str, replacement: str) -> str:
    """`target` (path and query) with its matched `prefix` replaced."""
    if prefix and target.startswith(prefix):
        rest = target[len(prefix) :]
        if replacement.endswith("/") and rest.startswith("/"):
            rest = rest[1:]
        return (replacement + rest) or "/"
    return target


class RouteLimit:
    """An inbound per-route rate limit, ready to match a path."""

    __slots__ = ("path", "exact", "prefix", "regex", "rate", "burst")

    def __init__(self, limit: RouteRateLimit) -> None:
        self.exact = limit.path_exact
        self.prefix = limit.path_prefix
        self.regex = (
            _compile(limit.path_regex, "rate limit PathRegex") if limit.path_regex else None
        )
        self.path = limit.path_exact or limit.path_prefix or limit.path_regex
        self.rate = limit.requests_per_second
        self.burst = limit.burst
        if self.rate <= 0:
            raise RouteError(f"rate limit for {self.path!r}: RequestsPerSecond must be positive")

    def matches(self, path: str) -> bool:
        if self.exact:
            return path == self.exact
        if self.prefix:
            return path.startswith(self.prefix)
        if self.regex is not None:
            return self.regex.fullmatch(path) is not None
        return True
