"""gRPC calls through a pair of real sidecars are counted exactly by gRPC
status (`grpc_response_status`), on both sides, and gRPC errors count as
failures in what the agent folds for golden metrics."""

from __future__ import annotations

import http.client

import grpc
import pytest

from meshproto.golden import istio_counts, parse_exposition
from tests.proxy.http_support import cluster, config, http_upstream
from tests.proxy.support import SidecarProcess, TestCA, allow, free_port, wait_until
from tests.proxy.test_grpc_process import Echo

pytestmark = pytest.mark.slow


def _scrape(proc: SidecarProcess) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", proc.metrics_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def by_grpc_status(proc: SidecarProcess, reporter: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, labels, value in parse_exposition(_scrape(proc), ("istio_requests_total",)):
        if labels["reporter"] == reporter and labels["destination_service_name"] == "api":
            assert labels["request_protocol"] == "grpc"
            assert labels["response_code"] == "200"
            key = labels["grpc_response_status"]
            out[key] = out.get(key, 0) + int(value)
    return out


def test_grpc_calls_are_counted_by_grpc_status_on_both_sides(tmp_path):
    ca = TestCA()
    app = Echo("a")
    api = SidecarProcess(tmp_path, "api-sidecar-proxy")
    web = SidecarProcess(tmp_path, "web-sidecar-proxy")
    api_in, up = free_port(), free_port()
    try:
        cert, key = ca.leaf("api")
        cfg = config("api", version=1, inbound_port=api_in, app_port=app.port,
                     intentions=(allow("web"),), inbound={"protocol": "grpc"})  # fmt: skip
        assert "ack" in api.push({"config": cfg, "cert": cert, "key": key, "roots": [ca.root_pem]})
        u = http_upstream("api", up, (cluster("api", [api_in]),))
        u = type(u)(**{**u.__dict__, "protocol": "grpc"})
        cert, key = ca.leaf("web")
        cfg = config("web", version=1, inbound_port=free_port(), app_port=1, upstreams=(u,))
        assert "ack" in web.push({"config": cfg, "cert": cert, "key": key, "roots": [ca.root_pem]})
        with grpc.insecure_channel(f"127.0.0.1:{up}") as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            grpc.channel_ready_future(channel).result(timeout=10)
            for _ in range(5):
                assert unary(b"hi", timeout=10) == b"a:hi"
            app.unavailable = True
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as err:
                    unary(b"hi", timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        want = {"0": 5, "14": 3}
        wait_until(lambda: by_grpc_status(api, "destination") == want, what="api's counts")
        wait_until(lambda: by_grpc_status(web, "source") == want, what="web's counts")
        c = istio_counts(_scrape(api))[("destination", "web", "api")]
        assert (c.requests, c.failures) == (8, 3)
    finally:
        web.stop()
        api.stop()
        app.stop()
