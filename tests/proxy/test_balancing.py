"""Cluster and endpoint choice for outbound connections (pure)."""

from __future__ import annotations

import collections

from agents.proxy.balancing import LeastRequest, RandomOfTwo, RoundRobin, UpstreamPlan, key_of
from meshproto.proxycfg import (
    Cluster,
    Endpoint,
    Gateway,
    Route,
    RouteMatch,
    Upstream,
    WeightedCluster,
)


def endpoints(*ports: int) -> tuple[Endpoint, ...]:
    return tuple(Endpoint("10.0.0.1", p) for p in ports)


def cluster(name: str, *ports: int, **kw) -> Cluster:
    return Cluster(name=name, service="api", datacenter="dc1", spiffe_id=f"spiffe://t.mesh/{name}",
                   sni=name, endpoints=endpoints(*ports), **kw)  # fmt: skip


def test_round_robin_takes_each_endpoint_in_turn():
    rr = RoundRobin(endpoints(1, 2, 3), {})
    picks = [rr.pick().port for _ in range(9)]
    assert sorted(picks) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(a != b for a, b in zip(picks, picks[1:], strict=False))


def test_round_robin_skips_endpoints_already_tried_and_gives_up_when_none_is_left():
    rr = RoundRobin(endpoints(1, 2), {})
    first = rr.pick()
    second = rr.pick({key_of(first)})
    assert second != first
    assert rr.pick({key_of(first), key_of(second)}) is None


def test_least_request_takes_the_endpoint_with_the_fewest_open_connections():
    counts = {("10.0.0.1", 1): 3, ("10.0.0.1", 2): 1, ("10.0.0.1", 3): 2}
    lr = LeastRequest(endpoints(1, 2, 3), counts)
    assert lr.pick().port == 2
    counts[("10.0.0.1", 2)] = 5
    assert lr.pick().port == 3
    assert lr.pick({("10.0.0.1", 3)}).port == 1


def test_least_request_spreads_ties():
    lr = LeastRequest(endpoints(1, 2), {})
    assert {lr.pick().port for _ in range(4)} == {1, 2}


def test_random_of_two_never_picks_the_busier_of_two():
    counts = {("10.0.0.1", 1): 100}
    r2 = RandomOfTwo(endpoints(1, 2), counts)
    assert {r2.pick().port for _ in range(50)} == {2}
    spread = collections.Counter(
        RandomOfTwo(endpoints(1, 2, 3), {}).pick().port for _ in range(300)
    )
    assert set(spread) == {1, 2, 3}


def test_the_plan_uses_the_cluster_policy_and_fails_over_to_a_cluster_with_endpoints():
    primary = cluster("api.dc1", failover=("api.dc2", "api.dc3"), lb_policy="least_request")
    empty = cluster("api.dc2")
    backup = cluster("api.dc3", 7)
    plan = UpstreamPlan(Upstream("api", "127.0.0.1", 9191, clusters=(primary, empty, backup)), {})
    assert isinstance(plan.balancer(primary), LeastRequest)
    assert plan.choose_cluster() is backup
    no_failover = UpstreamPlan(Upstream("api", "127.0.0.1", 9191, clusters=(empty,)), {})
    assert no_failover.choose_cluster() is None


def test_a_cluster_behind_a_mesh_gateway_is_usable_without_endpoints():
    remote = cluster("api.dc2", gateway=Gateway("192.0.2.1", 8443))
    plan = UpstreamPlan(Upstream("api", "127.0.0.1", 9191, clusters=(remote,)), {})
    assert plan.choose_cluster() is remote


def test_splits_of_the_catch_all_route_pick_clusters_by_weight():
    a, b = cluster("v1", 1), cluster("v2", 2)
    routes = (
        Route(RouteMatch(path_prefix="/admin"), (WeightedCluster("v2", 100.0),)),
        Route(
            RouteMatch(path_prefix="/"), (WeightedCluster("v1", 90.0), WeightedCluster("v2", 10.0))
        ),
    )
    plan = UpstreamPlan(
        Upstream("api", "127.0.0.1", 9191, "http", routes=routes, clusters=(a, b)), {}
    )
    picks = collections.Counter(plan.choose_cluster().name for _ in range(2000))
    assert 1650 < picks["v1"] < 1950
    assert picks["v1"] + picks["v2"] == 2000


def test_unknown_policies_balance_round_robin():
    c = cluster("api", 1, 2, lb_policy="ring_hash")
    plan = UpstreamPlan(Upstream("api", "127.0.0.1", 9191, clusters=(c,)), {})
    assert isinstance(plan.balancer(c), RoundRobin)


# --------------------------------------------------------------------------- hashing (HTTP)


def test_ring_hash_and_maglev_send_one_key_to_one_endpoint_and_spread_keys():
    from agents.proxy.balancing import Maglev, RingHash, hash_bytes

    for cls in (RingHash, Maglev):
        b = cls(endpoints(1, 2, 3, 4), {})
        keys = [hash_bytes(f"user-{i}".encode()) for i in range(2000)]
        first = [b.pick((), k).port for k in keys]
        assert [b.pick((), k).port for k in keys] == first  # sticky
        shares = collections.Counter(first)
        assert set(shares) == {1, 2, 3, 4}
        assert min(shares.values()) > 2000 / 4 * 0.6, (cls.__name__, shares)


def test_hashing_moves_few_keys_when_an_endpoint_goes_and_skips_excluded_ones():
    from agents.proxy.balancing import Maglev, RingHash, hash_bytes

    for cls in (RingHash, Maglev):
        keys = [hash_bytes(f"k{i}".encode()) for i in range(1000)]
        before = cls(endpoints(1, 2, 3, 4), {})
        after = cls(endpoints(1, 2, 3), {})
        moved = sum(
            1
            for k in keys
            if before.pick((), k).port != 4 and before.pick((), k).port != after.pick((), k).port
        )
        assert moved < 1000 * 0.15, (cls.__name__, moved)
        k = keys[0]
        chosen = before.pick((), k)
        assert before.pick({key_of(chosen)}, k) != chosen
        assert before.pick(set(map(key_of, endpoints(1, 2, 3, 4))), k) is None
