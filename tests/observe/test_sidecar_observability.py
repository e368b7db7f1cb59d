"""Observability end to end through real `mesh-sidecar` processes:

    client -> web's sidecar (outbound) => api's sidecar (inbound) -> api app
           api app -> api's sidecar (outbound) => db's sidecar (inbound) -> db app

One call is one trace across both hops, its four spans received by a real
OTLP/HTTP receiver; `istio_requests_total` grows by exactly the requests sent,
per response code, on both sides; each request is one access-log line."""

from __future__ import annotations

import http.client
import os
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from meshproto.golden import istio_counts, parse_exposition
from tests.proxy.http_support import Client, HttpApp, cluster, config, http_upstream
from tests.proxy.support import (
    App,
    SidecarProcess,
    TestCA,
    allow,
    free_port,
    proxy_config,
    roundtrip,
    upstream,
    wait_until,
)
from tests.support.files import json_lines
from tests.support.otlp import OtlpReceiver

pytestmark = pytest.mark.slow
SERVER, CLIENT = 2, 3  # OTLP span kinds
PROPAGATED = ("traceparent", "tracestate", "x-request-id")


class ApiApp:
    """api: `/chain` calls db through its sidecar, passing the trace headers on
    (as an application in a mesh does); `/status/<code>` answers that code."""

    def __init__(self, db_port: int) -> None:
        app = self
        self.db_port = db_port

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if self.path.startswith("/chain"):
                    headers = {k: v for k, v in self.headers.items() if k.lower() in PROPAGATED}
                    conn = http.client.HTTPConnection("127.0.0.1", app.db_port, timeout=10)
                    conn.request("GET", "/from-api", headers=headers)
                    resp = conn.getresponse()
                    body, status = resp.read(), resp.status
                    conn.close()
                elif self.path.startswith("/status/"):
                    status, body = int(self.path.split("?")[0].rsplit("/", 1)[1]), b"as asked\n"
                else:
                    status, body = 200, b"ok\n"
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observe")
    ca = TestCA()
    saved = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # the sidecars batch spans for 0.2 s
    receiver = OtlpReceiver().__enter__()
    ports = {
        name: free_port()
        for name in ("web_up", "api_in", "api_up", "db_in", "cache_up", "cache_in")
    }
    db_app = HttpApp("db")
    cache_app = App("echo")
    api_app = ApiApp(ports["api_up"])
    procs = {}
    try:
        for name in ("web", "api", "db", "cache"):
            procs[name] = SidecarProcess(
                tmp,
                f"{name}-sidecar-proxy",
                "--otlp-endpoint",
                receiver.url,
                "--trace-sample-ratio",
                "1",
                "--access-log",
                str(tmp / f"{name}.access.log"),
            )

        def push(name: str, **kw) -> dict:
            cert, key = ca.leaf(name)
            cfg = config(name, version=1, **kw)
            return procs[name].push(
                {"config": cfg, "cert": cert, "key": key, "roots": [ca.root_pem]}
            )

        assert "ack" in push(
            "db", inbound_port=ports["db_in"], app_port=db_app.port, intentions=(allow("api"),)
        )
        assert "ack" in push(
            "api",
            inbound_port=ports["api_in"],
            app_port=api_app.port,
            intentions=(allow("web"),),
            upstreams=(http_upstream("db", ports["api_up"], (cluster("db", [ports["db_in"]]),)),),
        )
        assert "ack" in push(
            "web",
            inbound_port=free_port(),
            app_port=1,
            upstreams=(
                http_upstream("api", ports["web_up"], (cluster("api", [ports["api_in"]]),)),
                upstream("cache", ports["cache_up"], [ports["cache_in"]]),  # L4
            ),
        )
        cert, key = ca.leaf("cache")
        tcp = proxy_config(
            "cache",
            version=1,
            inbound_port=ports["cache_in"],
            app_port=cache_app.port,
            intentions=(allow("web"),),
        )
        assert "ack" in procs["cache"].push(
            {"config": tcp, "cert": cert, "key": key, "roots": [ca.root_pem]}
        )
        yield {
            "procs": procs,
            "receiver": receiver,
            "client": Client(ports["web_up"]),
            "db_app": db_app,
            "logs": {name: tmp / f"{name}.access.log" for name in procs},
            "cache_up": ports["cache_up"],
        }
    finally:
        for p in procs.values():
            p.stop()
        db_app.close()
        api_app.close()
        cache_app.close()
        receiver.__exit__(None, None, None)
        if saved is None:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = saved
    for name, p in procs.items():
        errors = [e for e in p.logs() if e.get("level") == "error"]
        assert not errors, (name, errors)


def _scrape(proc: SidecarProcess) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", proc.metrics_port, timeout=5)
    try:
        conn.request("GET", "/metrics")  # a real Prometheus scrape over HTTP
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read().decode()
    finally:
        conn.close()


def requests_by_code(proc: SidecarProcess, reporter: str, source: str, destination: str) -> dict:
    out: dict[str, int] = {}
    for name, labels, value in parse_exposition(_scrape(proc), ("istio_requests_total",)):
        if (
            name == "istio_requests_total"
            and labels["reporter"] == reporter
            and labels["source_canonical_service"] == source
            and labels["destination_service_name"] == destination
        ):
            out[labels["response_code"]] = out.get(labels["response_code"], 0) + int(value)
    return out


def grown(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def test_one_call_from_web_through_api_to_db_is_one_trace(chain):
    receiver = chain["receiver"]
    already = len(receiver.spans)
    status, _, _ = chain["client"].get("/chain")
    assert status == 200
    spans = wait_until(
        lambda: len(receiver.spans) >= already + 4 and receiver.spans[already:], what="4 spans"
    )
    assert len({s.trace_id for s in spans}) == 1
    by = {(s.service, s.kind): s for s in spans}
    web_client, api_server = by[("web", CLIENT)], by[("api", SERVER)]
    api_client, db_server = by[("api", CLIENT)], by[("db", SERVER)]
    assert web_client.parent_span_id == ""  # the trace started at web's sidecar
    assert api_server.parent_span_id == web_client.span_id
    assert api_client.parent_span_id == api_server.span_id  # the app passed the header on
    assert db_server.parent_span_id == api_client.span_id
    for s in spans:
        assert s.attributes["http.request.method"] == "GET"
        assert s.attributes["http.response.status_code"] == 200
    assert api_server.attributes["url.path"] == "/chain"
    assert db_server.attributes["url.path"] == "/from-api"
    # What the db app saw names db's server span as its parent.
    seen = chain["db_app"].requests[-1][2]["traceparent"]
    assert seen.split("-")[1:3] == [db_server.trace_id, db_server.span_id]


def test_a_callers_trace_is_continued(chain):
    receiver = chain["receiver"]
    already = len(receiver.spans)
    trace = "0af7651916cd43dd8448eb211c80319c"
    status, _, _ = chain["client"].get(
        "/status/200", headers={"traceparent": f"00-{trace}-b7ad6b7169203331-01"}
    )
    assert status == 200
    spans = wait_until(
        lambda: len(receiver.spans) >= already + 2 and receiver.spans[already:], what="2 spans"
    )
    assert {s.trace_id for s in spans} == {trace}
    assert {s.parent_span_id for s in spans if s.kind == CLIENT} == {"b7ad6b7169203331"}


def test_istio_requests_total_grows_by_exactly_the_requests_sent_per_code(chain):
    web, api = chain["procs"]["web"], chain["procs"]["api"]
    before_web = requests_by_code(web, "source", "web", "api")
    before_api = requests_by_code(api, "destination", "web", "api")
    sent = {"200": 37, "503": 5, "404": 3}
    for code, n in sent.items():
        for _ in range(n):
            assert chain["client"].get(f"/status/{code}")[0] == int(code)
    assert grown(requests_by_code(web, "source", "web", "api"), before_web) == sent
    assert grown(requests_by_code(api, "destination", "web", "api"), before_api) == sent
    # The histogram counts the same requests; the agent's fold of it agrees.
    counts = istio_counts(_scrape(api))[("destination", "web", "api")]
    assert sum(counts.buckets) == counts.requests
    text = _scrape(api)
    assert "istio_request_duration_milliseconds_bucket{" in text
    assert "istio_response_bytes_sum{" in text


def test_each_request_is_one_access_log_line_with_its_trace(chain):
    tag = uuid.uuid4().hex[:12]

    def entries(name: str) -> list[dict]:
        return [e for e in json_lines(chain["logs"][name]) if e["request_id"].startswith(tag)]

    for i in range(10):
        chain["client"].get(
            f"/status/{200 if i % 2 else 503}", headers={"x-request-id": f"{tag}-{i}"}
        )
    api = wait_until(lambda: len(entries("api")) >= 10 and entries("api"), what="api's lines")
    web = wait_until(lambda: len(entries("web")) >= 10 and entries("web"), what="web's lines")
    assert len(api) == len(web) == 10
    assert [e["status"] for e in api] == [503, 200] * 5
    assert [e["request_id"] for e in api] == [f"{tag}-{i}" for i in range(10)]
    for e in api:
        assert e["reporter"] == "destination"
        assert (e["source"], e["destination"]) == ("web", "api")
        assert len(e["trace_id"]) == 32
        assert e["method"] == "GET" and e["path"].startswith("/status/")
        assert e["upstream"] and e["duration_ms"] >= 0 and e["bytes_sent"] > 0
    by_request = {e["request_id"]: e for e in web}
    for e in api:  # the caller's side logged the same request, in the same trace
        assert by_request[e["request_id"]]["reporter"] == "source"
        assert by_request[e["request_id"]]["trace_id"] == e["trace_id"]


def tcp_totals(proc: SidecarProcess, reporter: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, labels, value in parse_exposition(_scrape(proc), ("istio_tcp_",)):
        if labels["reporter"] == reporter and labels["destination_service_name"] == "cache":
            assert labels["source_canonical_service"] == "web"
            out[name] = out.get(name, 0) + int(value)
    return out


def test_l4_connections_and_bytes_are_counted_exactly_as_istio_tcp_metrics(chain):
    web, cache = chain["procs"]["web"], chain["procs"]["cache"]
    before = {"source": tcp_totals(web, "source"), "destination": tcp_totals(cache, "destination")}
    payload = b"x" * 1000
    for _ in range(6):
        assert roundtrip(chain["cache_up"], payload) == payload
    for proc, reporter in ((web, "source"), (cache, "destination")):

        def grown_by(proc=proc, reporter=reporter) -> dict[str, int]:
            now = tcp_totals(proc, reporter)
            return {k: v - before[reporter].get(k, 0) for k, v in now.items()}

        g = wait_until(
            lambda grown_by=grown_by: (
                grown_by()["istio_tcp_connections_closed_total"] == 6 and grown_by()
            ),
            what=f"{reporter}'s closed connections",
        )
        assert g == {
            "istio_tcp_connections_opened_total": 6,
            "istio_tcp_connections_closed_total": 6,
            "istio_tcp_received_bytes_total": 6000,
            "istio_tcp_sent_bytes_total": 6000,
        }
