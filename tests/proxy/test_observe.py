"""The sidecar's observer on RequestRecords: exact Istio metrics, W3C trace
context, access-log rotation, and spans received by a real OTLP/HTTP receiver."""

from __future__ import annotations

import json
import time

import pytest

from agents.proxy.observe import NULL_OBSERVER, RequestRecord
from agents.proxy.observe.accesslog import AccessLog
from agents.proxy.observe.observer import MeshObserver, ObserveOptions
from agents.proxy.observe.tracing import (
    clean_tracestate,
    format_traceparent,
    parse_traceparent,
    sampled_by_ratio,
)
from meshproto.golden import istio_counts, parse_exposition, quantile
from tests.proxy.support import wait_until
from tests.support.otlp import OtlpReceiver

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def record(status: int = 200, ms: float = 3.0, **kw) -> RequestRecord:
    base = dict(
        reporter="destination",
        source_service="web",
        destination_service="api",
        method="GET",
        path="/items?x=1",
        authority="api",
        protocol="http",
        status=status,
        started=time.time(),
        duration_s=ms / 1000.0,
        request_bytes=10,
        response_bytes=2000,
        request_id="req-1",
        upstream="127.0.0.1:9000",
    )
    base.update(kw)
    return RequestRecord(**base)


def samples(obs: MeshObserver, name: str) -> list[tuple[dict, float]]:
    text = "\n".join(obs.render()) + "\n"
    return [(labels, v) for n, labels, v in parse_exposition(text) if n == name]


# --- metrics -------------------------------------------------------------------------


def test_it_counts_every_request_exactly_per_response_code():
    obs = MeshObserver(ObserveOptions())
    for status, n in ((200, 37), (503, 5), (404, 2)):
        for _ in range(n):
            obs.begin("destination", []).finish(record(status))
    got = {labels["response_code"]: v for labels, v in samples(obs, "istio_requests_total")}
    assert got == {"200": 37, "503": 5, "404": 2}
    labels = samples(obs, "istio_requests_total")[0][0]
    assert labels["reporter"] == "destination"
    assert labels["source_canonical_service"] == "web"
    assert labels["destination_service_name"] == "api"
    assert labels["destination_workload"] == "api"
    assert labels["connection_security_policy"] == "mutual_tls"
    assert labels["response_flags"] == "-"
    assert labels["grpc_response_status"] == ""


def test_the_duration_histogram_is_cumulative_and_ends_with_the_count():
    obs = MeshObserver(ObserveOptions())
    for ms in (0.2, 0.7, 3.5, 45.0, 45.0, 250.0, 9_000_000.0):
        obs.begin("source", []).finish(record(200, ms, reporter="source"))
    buckets = {
        labels["le"]: v for labels, v in samples(obs, "istio_request_duration_milliseconds_bucket")
    }
    assert buckets["0.5"] == 1
    assert buckets["1"] == 2
    assert buckets["4"] == 3
    assert buckets["50"] == 5
    assert buckets["300"] == 6
    assert buckets["3600000"] == 6
    assert buckets["+Inf"] == 7
    assert samples(obs, "istio_request_duration_milliseconds_count")[0][1] == 7
    assert samples(obs, "istio_response_bytes_sum")[0][1] == 7 * 2000
    # What the agent folds from this text is what was recorded.
    counts = istio_counts("\n".join(obs.render()))
    c = counts[("source", "web", "api")]
    assert c.requests == 7 and c.failures == 0 and sum(c.buckets) == 7
    assert quantile(0.5, c.buckets) == pytest.approx(40.0 + 10.0 * 0.5 / 2)


def test_failures_are_5xx_unanswered_requests_and_grpc_errors():
    obs = MeshObserver(ObserveOptions())
    for status in (200, 500, 503, 0, 404, 302):
        obs.begin("destination", []).finish(record(status))
    obs.begin("destination", []).finish(record(200, protocol="grpc", grpc_status="0"))
    obs.begin("destination", []).finish(record(200, protocol="grpc", grpc_status="14"))
    c = istio_counts("\n".join(obs.render()))[("destination", "web", "api")]
    assert (c.requests, c.failures) == (8, 4)


def test_label_values_are_escaped():
    obs = MeshObserver(ObserveOptions())
    obs.begin("destination", []).finish(record(source_service='we"b\\x'))
    labels = samples(obs, "istio_requests_total")[0][0]
    assert labels["source_workload"] == 'we"b\\x'


# --- trace context ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, ok",
    [
        (f"00-{TRACE}-{PARENT}-01", True),
        (f"00-{TRACE}-{PARENT}-00", True),
        (f"01-{TRACE}-{PARENT}-01-future", True),  # a later version: first fields read
        (f"00-{TRACE}-{PARENT}-01-extra", False),  # version 00 is exactly 55 chars
        (f"ff-{TRACE}-{PARENT}-01", False),
        (f"00-{'0' * 32}-{PARENT}-01", False),
        (f"00-{TRACE}-{'0' * 16}-01", False),
        (f"00-{TRACE.upper()}-{PARENT}-01", False),
        (f"00-{TRACE}-{PARENT}", False),
        ("garbage", False),
        ("", False),
    ],
)
def test_traceparent_is_read_strictly(value, ok):
    assert (parse_traceparent(value) is not None) is ok


def test_a_traceparent_round_trips():
    tp = parse_traceparent(format_traceparent(int(TRACE, 16), int(PARENT, 16), True))
    assert (f"{tp.trace_id:032x}", f"{tp.span_id:016x}", tp.sampled) == (TRACE, PARENT, True)


def test_a_request_keeps_its_trace_and_gets_a_new_span():
    obs = MeshObserver(ObserveOptions(sample_ratio=0.0))
    span = obs.begin(
        "destination",
        [
            (b"traceparent", f"00-{TRACE}-{PARENT}-01".encode()),
            (b"tracestate", b"congo=t61rcWkgMzE"),
        ],
    )
    headers = dict(span.upstream_headers())
    tp = parse_traceparent(headers[b"traceparent"])
    assert f"{tp.trace_id:032x}" == TRACE
    assert f"{tp.span_id:016x}" != PARENT
    assert tp.sampled  # the parent's decision, whatever the ratio
    assert headers[b"tracestate"] == b"congo=t61rcWkgMzE"
    assert span.upstream_headers() is span.upstream_headers()  # same headers on every attempt


def test_a_request_without_trace_context_starts_a_trace_sampled_by_ratio():
    never = MeshObserver(ObserveOptions(sample_ratio=0.0))
    always = MeshObserver(ObserveOptions(sample_ratio=1.0))
    for obs, want in ((never, False), (always, True)):
        tp = parse_traceparent(dict(obs.begin("source", []).upstream_headers())[b"traceparent"])
        assert tp is not None and tp.sampled is want
    half = MeshObserver(ObserveOptions(sample_ratio=0.5))
    sampled = sum(
        parse_traceparent(dict(half.begin("source", []).upstream_headers())[b"traceparent"]).sampled
        for _ in range(2000)
    )
    assert 850 < sampled < 1150
    assert sampled_by_ratio(1 << 63, 0.5) is False and sampled_by_ratio((1 << 63) - 1, 0.5)


def test_an_unsampled_parent_is_followed_and_a_bad_one_replaced():
    obs = MeshObserver(ObserveOptions(sample_ratio=1.0))
    span = obs.begin("destination", [(b"traceparent", f"00-{TRACE}-{PARENT}-00".encode())])
    assert parse_traceparent(span.upstream_headers()[0][1]).sampled is False
    two = obs.begin(
        "destination",
        [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())] * 2,
    )
    assert f"{parse_traceparent(two.upstream_headers()[0][1]).trace_id:032x}" != TRACE


def test_a_malformed_tracestate_is_dropped():
    assert clean_tracestate([b"a=1", b"b=2"]) == b"a=1,b=2"
    assert clean_tracestate([b"a=1,,b=2 "]) == b"a=1,b=2"
    assert clean_tracestate([b"UPPER=1"]) == b""
    assert clean_tracestate([b"a=1"] * 40) == b""
    assert clean_tracestate([b"a=" + b"x" * 600]) == b""


def test_the_null_observer_adds_nothing():
    span = NULL_OBSERVER.begin("source", [])
    assert span.upstream_headers() == []
    span.finish(record())


def test_bad_options_are_refused_with_a_message():
    with pytest.raises(ValueError, match="sample ratio"):
        ObserveOptions(sample_ratio=1.5)
    with pytest.raises(ValueError, match="http"):
        ObserveOptions(otlp_endpoint="collector:4318")
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        ObserveOptions.from_env({"OTEL_TRACES_SAMPLER_ARG": "lots"})
    assert ObserveOptions.from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    ) == ObserveOptions(otlp_endpoint="http://c:4318", sample_ratio=0.25)


# --- access log ---------------------------------------------------------------------------


def test_the_access_log_writes_one_json_line_per_request(tmp_path):
    path = tmp_path / "access.log"
    obs = MeshObserver(ObserveOptions(access_log=str(path)))
    span = obs.begin("destination", [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())])
    span.finish(record(503, retries=1, response_flags="URX", route="api-v2"))
    obs.close()
    (line,) = path.read_text().splitlines()
    entry = json.loads(line)
    assert entry["trace_id"] == TRACE
    assert entry["status"] == 503
    assert entry["response_flags"] == "URX"
    assert entry["retries"] == 1
    assert entry["route"] == "api-v2"
    assert entry["source"] == "web" and entry["destination"] == "api"
    assert entry["upstream"] == "127.0.0.1:9000"
    assert entry["duration_ms"] == 3.0
    assert entry["time"].endswith("Z")


def test_the_access_log_rotates_by_size_and_keeps_what_it_was_told(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(path, max_bytes=4096, keep=2)
    for i in range(400):
        log.write({"n": i, "pad": "x" * 40})
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["access.log", "access.log.1", "access.log.2"]
    numbers = []
    for name in ("access.log.2", "access.log.1", "access.log"):
        text = (tmp_path / name).read_text()
        assert len(text.encode()) <= 4096
        numbers += [json.loads(line)["n"] for line in text.splitlines()]
    assert numbers == list(range(400 - len(numbers), 400))  # the newest lines, in order
    assert log.rotations >= 3


def test_the_access_log_refuses_silly_limits(tmp_path):
    with pytest.raises(ValueError, match="max bytes"):
        AccessLog(tmp_path / "a.log", max_bytes=10)


# --- spans over OTLP ------------------------------------------------------------------------


def test_sampled_requests_reach_an_otlp_receiver_as_sdk_spans(monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    with OtlpReceiver() as receiver:
        obs = MeshObserver(ObserveOptions(otlp_endpoint=receiver.url, sample_ratio=0.0))
        server = obs.begin("destination", [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())])
        server.finish(record(200, route="r1"))
        # The app calls on with the server span's context: the client span is its child.
        client = obs.begin("source", server.upstream_headers())
        client.finish(
            record(503, reporter="source", source_service="api", destination_service="db")
        )
        unsampled = obs.begin("source", [])  # ratio 0: a new trace is not sampled
        unsampled.finish(record(200, reporter="source"))
        obs.close()
        spans = wait_until(lambda: len(receiver.spans) >= 2 and receiver.spans, what="spans")
    by_kind = {s.kind: s for s in spans}
    assert len(spans) == 2
    srv, cli = by_kind[2], by_kind[3]
    assert srv.trace_id == cli.trace_id == TRACE
    assert srv.parent_span_id == PARENT
    assert srv.span_id == f"{server.span_id:016x}"
    assert cli.parent_span_id == srv.span_id
    assert srv.name == "GET r1" and cli.name == "GET"
    assert srv.service == "api"
    assert srv.attributes["http.request.method"] == "GET"
    assert srv.attributes["url.path"] == "/items"
    assert srv.attributes["http.response.status_code"] == 200
    assert cli.status_code == 2  # STATUS_CODE_ERROR for a 503


def test_tcp_bytes_of_open_connections_are_added_at_scrape_time():
    obs = MeshObserver(ObserveOptions())
    closed = obs.tcp_opened("destination", "web", "cache")
    obs.tcp_closed(closed, 100, 40)

    class Live:  # an open connection as the sidecar keeps it
        istio = obs.tcp_opened("destination", "web", "cache")
        rx, tx = 7, 3

    got = {n: v for n, _, v in parse_exposition("\n".join(obs.render([Live()])))}
    assert got["istio_tcp_connections_opened_total"] == 2
    assert got["istio_tcp_connections_closed_total"] == 1
    assert got["istio_tcp_received_bytes_total"] == 107
    assert got["istio_tcp_sent_bytes_total"] == 43
    assert NULL_OBSERVER.tcp_opened("source", "a", "b") is None


def test_access_lines_are_json_whatever_the_request_carried(tmp_path):
    path = tmp_path / "access.log"
    obs = MeshObserver(ObserveOptions(access_log=str(path)))
    nasty = 'a"b\\c\nd\x00e\u00e9\u2028'
    obs.begin("destination", []).finish(
        record(path=nasty, authority=nasty, request_id=nasty, route=nasty, started=1_800_000_000.5)
    )
    obs.close()
    entry = json.loads(path.read_text())
    assert entry["path"] == entry["authority"] == entry["request_id"] == entry["route"] == nasty
    assert entry["time"] == "2027-01-15T08:00:00.500Z"


def test_the_ratio_decision_is_the_sdks_trace_id_ratio_sampler():
    import random

    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    rng = random.Random(7)
    for ratio in (0.0, 0.01, 0.3, 0.5, 1.0):
        sdk = TraceIdRatioBased(ratio)
        for _ in range(2000):
            trace_id = rng.getrandbits(128)
            want = sdk.should_sample(None, trace_id, "x").decision.is_sampled()
            assert sampled_by_ratio(trace_id, ratio) is want
