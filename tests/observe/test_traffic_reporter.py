"""The agent's half of golden metrics (`agents.traffic`): scrapes folded into
deltas, reports built from them, nothing lost or counted twice; and the agent's
observability flags refused with a message when wrong."""

from __future__ import annotations

import time

import pytest

from agents import config as agent_config
from agents.proxy.observe import RequestRecord
from agents.proxy.observe.metrics import RequestMetrics
from agents.sidecars import Sidecars
from agents.traffic import TrafficReporter


def scrape_of(metrics: RequestMetrics) -> str:
    return "\n".join(metrics.render()) + "\n"


def served(
    metrics: RequestMetrics, n: int, status: int = 200, reporter: str = "destination"
) -> None:
    for _ in range(n):
        metrics.record(
            RequestRecord(
                reporter=reporter,
                source_service="web",
                destination_service="api",
                method="GET",
                path="/",
                authority="api",
                protocol="http",
                status=status,
                started=time.time(),
                duration_s=0.004,
            )
        )


def entries(report) -> dict:
    return {(c.reporter, c.source, c.destination): (c.requests, c.failures) for c in report.counts}


def test_each_report_carries_what_changed_since_the_last_one():
    sidecar, reporter = RequestMetrics(), TrafficReporter()
    served(sidecar, 10)
    reporter.collect({"api-sidecar-proxy": scrape_of(sidecar)}, now=100.0)
    first = reporter.report(now=105.0)
    assert entries(first) == {("destination", "web", "api"): (10, 0)}
    assert (first.start_unix, first.end_unix) == (100.0, 105.0)
    assert sum(first.counts[0].latency_buckets) == 10
    reporter.sent(first, 1)
    served(sidecar, 4)
    served(sidecar, 2, status=503)
    reporter.collect({"api-sidecar-proxy": scrape_of(sidecar)}, now=110.0)
    second = reporter.report(now=110.0)
    assert entries(second) == {("destination", "web", "api"): (6, 2)}
    assert second.start_unix == 105.0
    reporter.sent(second, 1)
    reporter.collect({"api-sidecar-proxy": scrape_of(sidecar)}, now=115.0)
    assert reporter.report(now=115.0) is None  # nothing new


def test_counts_that_could_not_be_sent_go_with_the_next_report():
    sidecar, reporter = RequestMetrics(), TrafficReporter()
    served(sidecar, 3)
    reporter.collect({"p": scrape_of(sidecar)}, now=10.0)
    reporter.report(now=15.0)  # built, never acknowledged (the control plane was away)
    served(sidecar, 5)
    reporter.collect({"p": scrape_of(sidecar)}, now=20.0)
    report = reporter.report(now=20.0)
    assert entries(report) == {("destination", "web", "api"): (8, 0)}
    assert report.start_unix == 10.0


def test_a_restarted_sidecar_counts_from_zero_and_sidecars_add_up():
    a, b, reporter = RequestMetrics(), RequestMetrics(), TrafficReporter()
    served(a, 7)
    served(b, 1, reporter="source")
    reporter.collect({"a": scrape_of(a), "b": scrape_of(b)}, now=1.0)
    reporter.sent(reporter.report(now=2.0), 2)
    restarted = RequestMetrics()
    served(restarted, 2)
    reporter.collect({"a": scrape_of(restarted), "b": scrape_of(b)}, now=3.0)
    assert entries(reporter.report(now=3.0)) == {("destination", "web", "api"): (2, 0)}


def test_an_adopted_sidecars_first_scrape_is_only_a_baseline():
    sidecar, reporter = RequestMetrics(), TrafficReporter()
    served(sidecar, 50)  # reported by the agent that started it
    reporter.collect({"p": scrape_of(sidecar)}, now=1.0, adopted=frozenset({"p"}))
    assert reporter.report(now=2.0) is None
    served(sidecar, 3)
    reporter.collect({"p": scrape_of(sidecar)}, now=3.0, adopted=frozenset({"p"}))
    assert entries(reporter.report(now=3.0)) == {("destination", "web", "api"): (3, 0)}


def test_a_garbled_scrape_is_skipped():
    reporter = TrafficReporter()
    reporter.collect({"p": 'istio_requests_total{reporter="destination" 3\n'}, now=1.0)
    assert reporter.report(now=2.0) is None


def build(tmp_path, **kw):
    return agent_config.build(
        data_dir=str(tmp_path / "data"),
        config_dirs=None,
        join="127.0.0.1:8502",
        join_token=None,
        ca_pin=None,
        node="n1",
        bind="127.0.0.1",
        http_addr=None,
        metrics_addr=None,
        dc=None,
        **kw,
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"trace_sample_ratio": "2"}, "-trace-sample-ratio"),
        ({"trace_sample_ratio": "most"}, "-trace-sample-ratio"),
        ({"otlp_endpoint": "collector:4318"}, "-otlp-endpoint"),
        ({"traffic_report_interval": "100ms"}, "-traffic-report-interval"),
        ({"traffic_report_interval": "soon"}, "-traffic-report-interval"),
    ],
)
def test_bad_observability_flags_stop_the_agent_with_a_message(tmp_path, flags, message):
    with pytest.raises(agent_config.ConfigError, match=message):
        build(tmp_path, **flags)


def test_the_sidecars_get_the_agents_observability_flags(tmp_path):
    cfg = build(
        tmp_path,
        otlp_endpoint="http://127.0.0.1:4318",
        trace_sample_ratio="0.25",
        traffic_report_interval="0s",
    )
    assert cfg.traffic_report_interval == 0
    assert cfg.access_log_dir == tmp_path.resolve() / "data" / "access-logs"
    sidecars = Sidecars(
        tmp_path,
        None,
        lambda *a: None,
        otlp_endpoint=cfg.otlp_endpoint,
        trace_sample_ratio=cfg.trace_sample_ratio,
        access_log_dir=cfg.access_log_dir,
    )
    assert sidecars.args_for("web-sidecar-proxy") == [
        "--otlp-endpoint",
        "http://127.0.0.1:4318",
        "--trace-sample-ratio",
        "0.25",
        "--access-log",
        str(cfg.access_log_dir / "web-sidecar-proxy.log"),
    ]
    assert build(tmp_path, access_log_dir="none").access_log_dir is None
