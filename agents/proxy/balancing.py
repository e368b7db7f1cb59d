"""Choosing where an outbound connection goes: a cluster, then an endpoint.

Pure (no sockets): `UpstreamPlan` is built once per applied config and asked
once per connection. The load-balancing policy is a small interface
(`Balancer.pick`) looked up by the cluster's `lb_policy` name.

Open-connection counts (for least_request and random-of-two) live in one
dict owned by the sidecar, keyed by endpoint address, so they stay right
across config swaps while connections opened under an older config close.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Collection
from hashlib import blake2b

from meshproto.proxycfg import Cluster, Endpoint, Upstream

EndpointKey = tuple[str, int]


def key_of(endpoint: Endpoint) -> EndpointKey:
    return (endpoint.address, endpoint.port)


class Balancer:
    """Contract: `pick(exclude)` returns one of the cluster's endpoints not in
    `exclude` (keys already tried for this connection), or None when none is left."""

    def __init__(self, endpoints: tuple[Endpoint, ...], open_counts: dict[EndpointKey, int]):
        self.endpoints = endpoints
        self.open_counts = open_counts

    def pick(self, exclude: Collection[EndpointKey] = ()) -> Endpoint | None:
        raise NotImplementedError

    def _candidates(self, exclude: Collection[EndpointKey]) -> tuple[Endpoint, ...]:
        if not exclude:
            return self.endpoints
        return tuple(e for e in self.endpoints if key_of(e) not in exclude)


class RoundRobin(Balancer):
    """Each endpoint in turn (the default)."""

    def __init__(self, endpoints: tuple[Endpoint, ...], open_counts: dict[EndpointKey, int]):
        super().__init__(endpoints, open_counts)
        # Start at a random place so that a fleet of sidecars doesn't all hit the first one.
        self._next = random.randrange(len(endpoints)) if endpoints else 0

    def pick(self, exclude: Collection[EndpointKey] = ()) -> Endpoint | None:
        n = len(self.endpoints)
        for _ in range(n):
            endpoint = self.endpoints[self._next % n]
            self._next = (self._next + 1) % n
            if not exclude or key_of(endpoint) not in exclude:
                return endpoint
        return None


class LeastRequest(Balancer):
    """The endpoint with the fewest open connections from this sidecar; ties in turn."""

    def __init__(self, endpoints: tuple[Endpoint, ...], open_counts: dict[EndpointKey, int]):
        super().__init__(endpoints, open_counts)
        self._next = 0

    def pick(self, exclude: Collection[EndpointKey] = ()) -> Endpoint | None:
        n = len(self.endpoints)
        best: Endpoint | None = None
        best_open = 0
        start = self._next
        self._next = (self._next + 1) % max(n, 1)
        for i in range(n):
            endpoint = self.endpoints[(start + i) % n]
            k = key_of(endpoint)
            if exclude and k in exclude:
                continue
            count = self.open_counts.get(k, 0)
            if best is None or count < best_open:
                best, best_open = endpoint, count
        return best


class RandomOfTwo(Balancer):
    """Two endpoints at random, the one with fewer open connections (power of two choices)."""

    def pick(self, exclude: Collection[EndpointKey] = ()) -> Endpoint | None:
        candidates = self._candidates(exclude)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        a, b = random.sample(candidates, 2)
        counts = self.open_counts
        return a if counts.get(key_of(a), 0) <= counts.get(key_of(b), 0) else b


def hash_bytes(data: bytes) -> int:
    """A 64-bit hash, the same in every process (Python's hash() is salted)."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


class RingHash(Balancer):
    """Consistent hashing on a ring (Ketama-like): each endpoint owns many
    points; a request's hash goes to the next point clockwise, skipping
    excluded endpoints. Adding or removing one endpoint moves only its share.
    Without a hash key (no hash policy yielded a value) it picks at random."""

    POINTS = 1024  # ring size, shared by the endpoints (weighted)

    def __init__(self, endpoints: tuple[Endpoint, ...], open_counts: dict[EndpointKey, int]):
        super().__init__(endpoints, open_counts)
        total = sum(max(e.weight, 1) for e in endpoints) or 1
        ring: list[tuple[int, int]] = []
        for i, e in enumerate(endpoints):
            n = max(1, self.POINTS * max(e.weight, 1) // total)
            base = f"{e.address}:{e.port}_".encode()
            ring.extend((hash_bytes(base + str(k).encode()), i) for k in range(n))
        ring.sort()
        self._points = [p for p, _ in ring]
        self._owners = [i for _, i in ring]

    def pick(
        self, exclude: Collection[EndpointKey] = (), key: int | None = None
    ) -> Endpoint | None:
        if not self.endpoints:
            return None
        if key is None:
            candidates = self._candidates(exclude)
            return random.choice(candidates) if candidates else None
        n = len(self._points)
        start = bisect_right(self._points, key & 0xFFFFFFFFFFFFFFFF) % n
        for j in range(n):
            endpoint = self.endpoints[self._owners[(start + j) % n]]
            if not exclude or key_of(endpoint) not in exclude:
                return endpoint
        return None


class Maglev(Balancer):
    """Google's Maglev hashing: a lookup table (a prime size) filled from each
    endpoint's permutation, so that endpoints own near-equal shares and a
    change of endpoints moves few entries. Excluded endpoints: the next
    entries of the table. Without a hash key: at random."""

    TABLE = 5003  # prime; Envoy's default is 65537 — smaller builds faster here

    def __init__(self, endpoints: tuple[Endpoint, ...], open_counts: dict[EndpointKey, int]):
        super().__init__(endpoints, open_counts)
        m = self.TABLE
        n = len(endpoints)
        table = [-1] * m
        if n:
            offsets, skips = [], []
            for e in endpoints:
                name = f"{e.address}:{e.port}".encode()
                offsets.append(hash_bytes(b"o" + name) % m)
                skips.append(hash_bytes(b"s" + name) % (m - 1) + 1)
            nexts = [0] * n
            filled = 0
            while True:
                for i in range(n):
                    c = (offsets[i] + nexts[i] * skips[i]) % m
                    while table[c] >= 0:
                        nexts[i] += 1
                        c = (offsets[i] + nexts[i] * skips[i]) % m
                    table[c] = i
                    nexts[i] += 1
                    filled += 1
                    if filled == m:
                        break
                if filled == m:
                    break
        self._table = table

    def pick(
        self, exclude: Collection[EndpointKey] = (), key: int | None = None
    ) -> Endpoint | None:
        if not self.endpoints:
            return None
        if key is None:
            candidates = self._candidates(exclude)
            return random.choice(candidates) if candidates else None
        m = self.TABLE
        start = key % m
        for j in range(m):
            endpoint = self.endpoints[self._table[(start + j) % m]]
            if not exclude or key_of(endpoint) not in exclude:
                return endpoint
        return None


# The policy table (name → class). ring_hash and maglev hash a request
# attribute (HTTP listeners); an L4 connection has none: round robin there.
POLICIES: dict[str, type[Balancer]] = {
    "round_robin": RoundRobin,
    "least_request": LeastRequest,
    "random": RandomOfTwo,
    "ring_hash": RoundRobin,
    "maglev": RoundRobin,
}
# HTTP listeners: the hashing policies for real.
HTTP_POLICIES: dict[str, type[Balancer]] = {**POLICIES, "ring_hash": RingHash, "maglev": Maglev}


def _usable(cluster: Cluster) -> bool:
    """A cluster can take a connection: it has endpoints, or a mesh gateway
    reaches them (a remote datacenter's endpoints are the gateway's business)."""
    return bool(cluster.endpoints) or cluster.gateway is not None


class UpstreamPlan:
    """Where one upstream's new connections go, under one config.

    L4 (tcp, and for now http/http2/grpc treated as L4): the cluster is the
    upstream's only cluster, or — when the discovery chain produced routes —
    drawn by weight from the splits of the last route (the catch-all: the one
    that would carry a request no more specific route matches). A cluster with
    no endpoints (and no mesh gateway) hands over to its `failover` clusters, in
    order.
    """

    def __init__(self, upstream: Upstream, open_counts: dict[EndpointKey, int]) -> None:
        self.upstream = upstream
        self.clusters = {c.name: c for c in upstream.clusters}
        self.balancers = {
            c.name: POLICIES.get(c.lb_policy, RoundRobin)(c.endpoints, open_counts)
            for c in upstream.clusters
        }
        self._names: list[str] = []
        self._cumulative: list[float] = []
        if upstream.routes:
            total = 0.0
            for split in upstream.routes[-1].splits:
                if split.weight > 0 and split.cluster in self.clusters:
                    total += split.weight
                    self._names.append(split.cluster)
                    self._cumulative.append(total)
        if not self._names and upstream.clusters:
            self._names = [upstream.clusters[0].name]
            self._cumulative = [1.0]

    def choose_cluster(self) -> Cluster | None:
        """The cluster for a new connection (after failover), or None if none has endpoints."""
        if not self._names:
            return None
        if len(self._names) == 1:
            name = self._names[0]
        else:
            r = random.random() * self._cumulative[-1]
            name = self._names[min(bisect_right(self._cumulative, r), len(self._names) - 1)]
        cluster = self.clusters[name]
        if _usable(cluster):
            return cluster
        for alt in cluster.failover:
            other = self.clusters.get(alt)
            if other is not None and _usable(other):
                return other
        return None

    def fallbacks(self, cluster: Cluster) -> list[Cluster]:
        """`cluster`'s usable failover clusters, in order: where a connection goes
        when no endpoint of `cluster` could be reached."""
        out = []
        for alt in cluster.failover:
            other = self.clusters.get(alt)
            if other is not None and other is not cluster and _usable(other):
                out.append(other)
        return out

    def balancer(self, cluster: Cluster) -> Balancer:
        return self.balancers[cluster.name]
