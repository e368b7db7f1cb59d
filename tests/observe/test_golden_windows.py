"""The control plane's rolling windows (`registry.domain.golden`) on stored
reports: exact sums per window, rates, success rates, quantiles; bad reports
refused without storing anything; a node reports only for its own services."""

from __future__ import annotations

import pytest

from meshproto.golden import DURATION_BOUNDS_MS, Counts, bucket_index, delta, quantile
from registry.domain import golden
from registry.errors import BadRequest, NotFound, PermissionDenied
from registry.models import Datacenter, Node, ServiceInstance, TrafficSample

pytestmark = pytest.mark.django_db
NOW = 1_800_000_000.0
WIDTH = len(DURATION_BOUNDS_MS) + 1


def buckets(**at_ms: int) -> tuple[int, ...]:
    """{"ms_5": 3} -> 3 requests in the bucket holding 5 ms."""
    row = [0] * WIDTH
    for name, n in at_ms.items():
        row[bucket_index(float(name[3:].replace("_", ".")))] += n
    return tuple(row)


@pytest.fixture
def hosts():
    dc = Datacenter.objects.get_or_create(name="dc1")[0]
    a = Node.objects.create(name="host-a", address="10.0.0.1", datacenter=dc)
    b = Node.objects.create(name="host-b", address="10.0.0.2", datacenter=dc)
    ServiceInstance.objects.create(node=a, service_id="api-1", name="api", port=1)
    ServiceInstance.objects.create(node=b, service_id="web-1", name="web", port=2)
    return a, b


def report(node, ago_end: float, length: float, *entries):
    return golden.record_report(node, NOW - ago_end - length, NOW - ago_end, entries, now=NOW)


def inbound(requests: int, failures: int = 0, source: str = "web", **b) -> golden.Reported:
    return golden.Reported(
        "destination",
        source,
        "api",
        requests,
        failures,
        buckets(**b) if b else buckets(ms_3=requests),
    )


def test_each_window_sums_exactly_the_samples_that_ended_in_it(hosts):
    report("host-a", 10, 10, inbound(100, 1))  # in every window
    report("host-a", 200, 10, inbound(50, 5))  # 5, 15, 60 minutes
    report("host-a", 600, 10, inbound(30))  # 15, 60
    report("host-a", 3000, 10, inbound(7, 7))  # 60
    report("host-a", 4000, 10, inbound(1000))  # too old for any window
    w = golden.service_metrics("api", now=NOW)["windows"]
    assert [w[k]["requests"] for k in ("1m", "5m", "15m", "1h")] == [100, 150, 180, 187]
    assert [w[k]["failures"] for k in ("1m", "5m", "15m", "1h")] == [1, 6, 6, 13]
    assert w["1m"]["success_rate"] == pytest.approx(0.99)
    assert w["1h"]["success_rate"] == pytest.approx(174 / 187, abs=1e-6)
    # The rate covers the time the samples span: 100 requests over 20 s.
    assert w["1m"]["rps"] == pytest.approx(5.0)
    assert w["5m"]["rps"] == pytest.approx(150 / 210, abs=1e-3)


def test_quantiles_come_from_the_merged_histograms(hosts):
    report("host-a", 5, 10, inbound(90, ms_2=90))
    report("host-a", 5, 10, inbound(10, source="cli", ms_250=10))
    got = golden.service_metrics("api", now=NOW)
    lat = got["windows"]["1m"]["latency_ms"]
    assert 1.0 < lat["p50"] <= 2.0
    assert 200.0 < lat["p95"] <= 300.0
    assert 200.0 < lat["p99"] <= 300.0
    assert [s["source"] for s in got["sources"]] == ["cli", "web"]
    assert got["sources"][0]["windows"]["1m"]["requests"] == 10


def test_a_service_without_traffic_has_empty_windows_and_an_unknown_one_is_404(hosts):
    w = golden.service_metrics("api", now=NOW)["windows"]["5m"]
    assert w["requests"] == 0 and w["rps"] == 0 and w["success_rate"] is None
    assert w["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    with pytest.raises(NotFound):
        golden.service_metrics("nothing", now=NOW)


def test_edges_come_from_the_callers_side(hosts):
    report(
        "host-b",
        5,
        10,
        golden.Reported("source", "web", "api", 40, 2, buckets(ms_10=40)),
        golden.Reported("source", "web", "db", 4, 0, buckets(ms_1=4)),
    )
    edges = golden.edges_metrics(lambda name: True, now=NOW)
    assert [(e["source"], e["destination"], e["windows"]["1m"]["requests"]) for e in edges] == [
        ("web", "api", 40),
        ("web", "db", 4),
    ]
    assert golden.edges_metrics(lambda name: name != "db", now=NOW)[0]["destination"] == "api"
    assert len(golden.edges_metrics(lambda n: True, destination="db", now=NOW)) == 1


def test_a_node_may_not_report_for_services_it_does_not_run(hosts):
    with pytest.raises(PermissionDenied, match="api"):
        report("host-b", 5, 10, inbound(1))  # host-b runs web, not api
    with pytest.raises(PermissionDenied, match="api"):
        report("host-b", 5, 10, golden.Reported("source", "api", "x", 1, 0, buckets(ms_1=1)))
    assert TrafficSample.objects.count() == 0
    # Its own: api's callers as seen by api's sidecar, api's calls as seen by it.
    report(
        "host-a", 5, 10, inbound(1), golden.Reported("source", "api", "x", 1, 0, buckets(ms_1=1))
    )
    assert TrafficSample.objects.count() == 2


@pytest.mark.parametrize(
    "entry, start, end, message",
    [
        (inbound(1), NOW, NOW - 1, "start must be before end"),
        (inbound(1), NOW - 7200, NOW, "one hour"),
        (inbound(1), NOW + 100, NOW + 120, "future"),
        (
            golden.Reported("sideways", "web", "api", 1, 0, buckets(ms_1=1)),
            NOW - 1,
            NOW,
            "reporter",
        ),
        (golden.Reported("destination", "", "api", 1, 0, buckets(ms_1=1)), NOW - 1, NOW, "source"),
        (
            golden.Reported("destination", "web", "api", 1, 2, buckets(ms_1=1)),
            NOW - 1,
            NOW,
            "failures",
        ),
        (golden.Reported("destination", "web", "api", 1, 0, (1, 2)), NOW - 1, NOW, "buckets"),
    ],
)
def test_bad_reports_are_refused_and_store_nothing(hosts, entry, start, end, message):
    with pytest.raises(BadRequest, match=message):
        golden.record_report("host-a", start, end, [entry], now=NOW)
    assert TrafficSample.objects.count() == 0


def test_old_samples_are_rolled_up_and_dropped_after_a_day_as_reports_arrive(hosts):
    report("host-a", 90_000, 10, inbound(5))  # older than a day: gone
    report("host-a", 5000, 10, inbound(3))  # older than the fine windows: rolled up
    report("host-a", 5, 10, inbound(1))
    rows = TrafficSample.objects.order_by("end").values_list("step", "requests")
    assert list(rows) == [(300, 3), (0, 1)]


def test_the_rollup_keeps_every_count_of_the_24h_window_exact(hosts):
    ages = [80_000, 50_000, 7200, 4010, 4000, 3000, 600, 10]
    for i, age in enumerate(ages):
        # Each sample its own counts: requests 10*(i+1), failures i, half slow.
        n = 10 * (i + 1)
        report("host-a", age, 5, inbound(n, i, ms_3=n - n // 2, ms_250=n // 2))
    total = sum(10 * (i + 1) for i in range(len(ages)))
    failures = sum(range(len(ages)))
    # The samples older than the fine windows are now 5-minute rows; the two
    # that ended in the same 5 minutes (4010 s and 4000 s ago) share one.
    coarse = TrafficSample.objects.filter(step=300)
    assert coarse.count() == 4
    assert sorted(coarse.values_list("requests", flat=True)) == [10, 20, 30, 90]
    assert TrafficSample.objects.filter(step=0).count() == 3
    w = golden.service_metrics("api", now=NOW)["windows"]
    assert (w["24h"]["requests"], w["24h"]["failures"]) == (total, failures)
    assert (w["1h"]["requests"], w["1h"]["failures"]) == (60 + 70 + 80, 5 + 6 + 7)
    # The merged histogram: half the requests at 3 ms, half at 250 ms.
    assert 2 < w["24h"]["latency_ms"]["p50"] <= 250 < w["24h"]["latency_ms"]["p95"] <= 300
    # Time passes: the next report rolls up what left the fine windows, and the
    # 24-hour window still counts every request exactly once.
    later = NOW + 4000
    golden.record_report("host-a", later - 5, later, [inbound(1)], now=later)
    assert TrafficSample.objects.filter(step=0).count() == 1
    w = golden.service_metrics("api", window="24h", now=later)["windows"]
    assert list(w) == ["24h"]
    assert (w["24h"]["requests"], w["24h"]["failures"]) == (total + 1, failures)
    assert golden.service_metrics("api", window="1h", now=later)["windows"]["1h"]["requests"] == 1
    # Rolling up again finds nothing new: nothing is counted twice.
    assert golden.roll_up(later) == 0
    w = golden.service_metrics("api", window="24h", now=later)["windows"]
    assert w["24h"]["requests"] == total + 1


def test_the_series_steps_are_fine_for_short_windows_and_coarse_for_a_day(hosts):
    report("host-a", 50_000, 5, inbound(40))  # rolled up
    report("host-a", 4000, 5, inbound(30))  # rolled up
    report("host-a", 400, 5, inbound(20, 2))
    report("host-a", 10, 5, inbound(10))
    report("host-a", 15, 5, inbound(5))
    day = golden.service_series("api", window="24h", now=NOW)
    assert day["step_s"] == 300
    assert [p["requests"] for p in day["points"]] == [40, 30, 20, 15]
    assert all(p["t"] % 300 == 0 for p in day["points"])
    assert sum(p["failures"] for p in day["points"]) == 2
    assert day["points"][-1]["rps"] == pytest.approx(15 / 300, abs=1e-3)
    quarter = golden.service_series("api", window="15m", now=NOW)
    assert quarter["step_s"] == 30
    assert [p["requests"] for p in quarter["points"]] == [20, 15]
    assert golden.service_series("api", window="1h", now=NOW)["step_s"] == 60
    with pytest.raises(BadRequest, match="window must be one of 15m, 1h, 24h"):
        golden.service_series("api", window="1m", now=NOW)
    with pytest.raises(BadRequest, match="window must be one of"):
        golden.service_metrics("api", window="2d", now=NOW)
    with pytest.raises(NotFound):
        golden.service_series("nobody", window="1h", now=NOW)


def test_lists_and_edges_answer_one_window_when_asked(hosts):
    report("host-a", 5000, 10, inbound(3))
    golden.record_report(
        "host-b",
        NOW - 5010,
        NOW - 5000,
        [golden.Reported("source", "web", "api", 4, 1, buckets(ms_1=4))],
        now=NOW,
    )
    listed = golden.services_metrics(lambda _name: True, window="24h", now=NOW)
    assert [
        (s["service"], list(s["windows"]), s["windows"]["24h"]["requests"]) for s in listed
    ] == [("api", ["24h"], 3)]
    assert golden.services_metrics(lambda _name: True, window="1h", now=NOW) == []
    edges = golden.edges_metrics(lambda _name: True, window="24h", now=NOW)
    assert [(e["source"], e["windows"]["24h"]["failures"]) for e in edges] == [("web", 1)]


def test_quantile_interpolates_inside_the_bucket():
    row = [0] * WIDTH
    row[bucket_index(7.0)] = 4  # (5, 10]
    assert quantile(0.5, row) == pytest.approx(7.5)
    assert quantile(1.0, row) == pytest.approx(10.0)
    assert quantile(0.5, [0] * WIDTH) is None


def test_a_counter_that_went_down_counts_from_zero():
    before = {("destination", "web", "api"): Counts(10, 1, list(buckets(ms_1=10)))}
    after = {("destination", "web", "api"): Counts(3, 0, list(buckets(ms_1=3)))}
    grown = {("destination", "web", "api"): Counts(15, 2, list(buckets(ms_1=15)))}
    assert delta(after, before)[("destination", "web", "api")].requests == 3
    d = delta(grown, before)[("destination", "web", "api")]
    assert (d.requests, d.failures, sum(d.buckets)) == (5, 1, 5)
    assert delta(before, before) == {}
