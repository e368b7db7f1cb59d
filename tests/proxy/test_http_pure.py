"""The HTTP proxy's pure parts: route matching, splits, rewrites, and the
guards (token bucket, retry budget, outlier detection)."""

from __future__ import annotations

import collections
import time
import uuid

import pytest

from agents.proxy.http.engine import SplitPlan, request_id
from agents.proxy.http.guards import Outliers, RetryBudget, TokenBucket
from agents.proxy.http.routes import RouteError, Router, rewrite_prefix
from agents.proxy.http.wire import strip_hop_by_hop
from meshproto.proxycfg import (
    Cluster,
    HeaderMatch,
    OutlierDetection,
    RetryPolicy,
    Route,
    RouteMatch,
    Upstream,
    WeightedCluster,
)


def up(*routes: Route) -> Upstream:
    clusters = tuple(
        Cluster(name=n, service="api", datacenter="dc1", spiffe_id="x", sni=n) for n in ("a", "b")
    )
    return Upstream("api", "127.0.0.1", 1, "http", routes=routes, clusters=clusters)


def to(name: str) -> tuple[WeightedCluster, ...]:
    return (WeightedCluster(name, 100.0),)


def test_routes_match_on_path_headers_query_and_methods_first_match_wins():
    r = Router(up(
        Route(RouteMatch(path_exact="/x"), to("a"), name="exact"),
        Route(RouteMatch(path_regex=r"/items/\d+"), to("a"), name="regex"),
        Route(RouteMatch(headers=(HeaderMatch("x-v", suffix="-beta"),)), to("b"), name="suffix"),
        Route(RouteMatch(headers=(HeaderMatch("x-debug", present=True, invert=True),),
                         methods=("DELETE",)), to("b"), name="nodebug-delete"),
        Route(RouteMatch(query=(("canary", "1"),)), to("b"), name="query"),
        Route(RouteMatch(path_prefix="/"), to("a"), name="all"),
    ))  # fmt: skip

    def name(method="GET", path="/", query="", headers=None):
        return r.match(method, path, query, headers or {}).name

    assert name(path="/x") == "exact"
    assert name(path="/x/y") == "all"
    assert name(path="/items/42") == "regex"
    assert name(path="/items/4x") == "all"
    assert name(headers={"x-v": "2-beta"}) == "suffix"
    assert name("DELETE") == "nodebug-delete"
    assert name("DELETE", headers={"x-debug": "1"}) == "all"
    assert name(query="a=2&canary=1") == "query"
    assert name(query="canary=2") == "all"


def test_a_regex_that_does_not_compile_or_a_split_to_nowhere_is_refused():
    with pytest.raises(RouteError, match="does not compile"):
        Router(up(Route(RouteMatch(path_regex="(x"), to("a"))))
    with pytest.raises(RouteError, match="unknown cluster"):
        Router(up(Route(RouteMatch(), to("zzz"))))


def test_splits_follow_their_weights_to_a_hundredth_of_a_percent():
    r = Router(up(Route(RouteMatch(), (WeightedCluster("a", 99.99), WeightedCluster("b", 0.01)))))
    route = r.match("GET", "/", "", {})
    counts = collections.Counter(route.pick().cluster for _ in range(200_000))
    assert 5 <= counts["b"] <= 45  # expected 20


def test_prefix_rewrite_keeps_the_rest_and_the_query():
    assert rewrite_prefix("/api/v1/users?x=1", "/api/v1/", "/") == "/users?x=1"
    assert rewrite_prefix("/old/a", "/old", "/new") == "/new/a"
    assert rewrite_prefix("/old", "/old", "/") == "/"


def test_a_split_plan_edits_headers_as_the_route_then_the_split_say():
    route = Route(
        RouteMatch(path_prefix="/"),
        (
            WeightedCluster(
                "a",
                100.0,
                request_headers_set=(("X-Tier", "canary"),),
                request_headers_remove=("x-added",),
            ),
        ),  # fmt: skip
        request_headers_set=(("X-Tier", "stable"), ("x-route", "r1")),
        request_headers_remove=("Cookie",),
        request_headers_add=(("x-added", "1"),),
        retry=RetryPolicy(num_retries=3, retry_on=("5xx", "unavailable")),
    )
    plan = SplitPlan(route, route.splits[0])
    got = plan.apply([(b"host", b"api"), (b"cookie", b"c=1"), (b"x-tier", b"old")])
    # The route's step (remove, set, add), then the split's (remove, set).
    assert got == [(b"host", b"api"), (b"x-route", b"r1"), (b"x-tier", b"canary")]
    assert plan.max_retries == 3 and plan.grpc_retry
    assert plan.conditions == frozenset({"5xx", "unavailable"})
    bare = Route(RouteMatch(), to("a"))
    assert SplitPlan(bare, bare.splits[0]).apply([(b"a", b"1")]) == [(b"a", b"1")]


def test_request_ids_are_version_4_uuids():
    ids = {request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in ids:
        u = uuid.UUID(rid.decode())
        assert (u.version, u.variant, str(u).encode()) == (4, uuid.RFC_4122, rid)


def test_hop_by_hop_headers_and_those_connection_names_are_stripped():
    got = strip_hop_by_hop([(b"connection", b"close, x-a"), (b"x-a", b"1"), (b"te", b"trailers"),
                            (b"keep-alive", b"5"), (b"x-b", b"2")])  # fmt: skip
    assert got == [(b"x-b", b"2")]


def test_a_token_bucket_allows_its_rate():
    b = TokenBucket(100.0, 1)
    assert b.take() == 0.0
    assert b.take() > 0  # the one banked token is gone
    time.sleep(0.05)
    assert b.take() == 0.0


def test_the_retry_budget_allows_a_share_of_requests_plus_the_floor():
    b = RetryBudget(RetryPolicy(budget_percent=20.0, budget_min_per_s=0.0, budget_window_s=10))
    for _ in range(100):
        b.request()
    allowed = sum(b.try_retry() for _ in range(100))
    assert allowed == 20
    floor = RetryBudget(RetryPolicy(budget_percent=0.0, budget_min_per_s=1.0, budget_window_s=3))
    assert sum(floor.try_retry() for _ in range(10)) == 3


def test_outliers_eject_after_consecutive_failures_capped_by_the_percentage():
    o = Outliers(OutlierDetection(max_failures=3, base_ejection_s=0.2, max_ejection_percent=50), 4)
    a, b, c = ("h", 1), ("h", 2), ("h", 3)
    assert not o.failure(a) and not o.failure(a)
    o.success(a)  # the streak is broken
    assert not o.failure(a) and not o.failure(a)
    assert o.failure(a)
    assert o.ejected() == {a}
    for _ in range(3):
        o.failure(b)
    assert o.ejected() == {a, b}
    for _ in range(3):
        assert not o.failure(c)  # 2 of 4 out already: the cap
    time.sleep(0.25)
    assert o.ejected() == set()  # back after the ejection time
    for _ in range(3):
        o.failure(a)
    assert o.hosts[a].ejected_until - time.monotonic() > 0.3  # twice as long the second time
