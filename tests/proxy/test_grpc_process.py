"""gRPC through a pair of real sidecars: a grpcio client → web's outbound
listener (h2c) → mTLS with ALPN h2 → api's inbound listener → a grpcio server."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from meshproto.proxycfg import RetryPolicy, Route, RouteMatch, WeightedCluster
from tests.proxy.http_support import cluster, config, http_upstream
from tests.proxy.support import SidecarProcess, TestCA, allow, free_port

pytestmark = pytest.mark.slow


class Echo:
    """A grpcio server with raw-bytes methods: Unary (echo, tagged with its
    name) and Stream (n messages); `unavailable` makes Unary fail."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.unavailable = False
        self.calls = 0
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
                "Meta": grpc.unary_unary_rpc_method_handler(self.meta),
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def unary(self, request: bytes, context) -> bytes:
        with self.lock:
            self.calls += 1
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return self.name.encode() + b":" + request

    def meta(self, request: bytes, context) -> bytes:
        """The request id and traceparent the call arrived with."""
        md = dict(context.invocation_metadata())
        return f"{md.get('x-request-id', '')} {md.get('traceparent', '')}".encode()

    def stream(self, request: bytes, context):
        for i in range(int(request)):
            yield b"%s-%d" % (self.name.encode(), i)

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture(scope="module")
def grpc_mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpc")
    ca = TestCA()
    apps = [Echo("a"), Echo("b")]
    api = [SidecarProcess(tmp, f"api-{i}-sidecar-proxy") for i in range(2)]
    web = SidecarProcess(tmp, "web-sidecar-proxy")
    ports = [free_port(), free_port()]
    up = free_port()
    try:
        for i, (app, sc) in enumerate(zip(apps, api, strict=True)):
            cert, key = ca.leaf("api")
            cfg = config("api", version=1, inbound_port=ports[i], app_port=app.port,
                         proxy_id=f"api-{i}-sidecar-proxy", intentions=(allow("web"),),
                         inbound={"protocol": "grpc"})  # fmt: skip
            assert sc.push({"config": cfg, "cert": cert, "key": key,
                            "roots": [ca.root_pem]})["ack"] == 1  # fmt: skip
        c = cluster("api", ports)
        retry = RetryPolicy(num_retries=2, retry_on=("unavailable",))
        u = http_upstream("api", up, (c,), (Route(RouteMatch(path_prefix="/"),
                                                  (WeightedCluster(c.name, 100.0),), retry=retry),))  # fmt: skip
        u = type(u)(**{**u.__dict__, "protocol": "grpc"})
        cert, key = ca.leaf("web")
        cfg = config("web", version=1, inbound_port=free_port(), app_port=1, upstreams=(u,))
        assert (
            web.push({"config": cfg, "cert": cert, "key": key, "roots": [ca.root_pem]})["ack"] == 1
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{up}")
        yield apps, channel, web, api
        channel.close()
    finally:
        for p in (web, *api):
            p.stop()
        for a in apps:
            a.stop()
    for p in (web, *api):
        assert not [e for e in p.logs() if e["level"] == "error"], p.log_path.read_text()[-3000:]


def test_a_unary_and_a_server_streaming_call_pass_through_the_pair(grpc_mesh):
    apps, channel, web, api = grpc_mesh
    unary = channel.unary_unary("/test.Echo/Unary")
    answers = {unary(b"hello", timeout=10) for _ in range(6)}
    assert answers == {b"a:hello", b"b:hello"}
    stream = channel.unary_stream("/test.Echo/Stream")
    got = list(stream(b"50", timeout=10))
    assert len(got) == 50
    assert got[0].endswith(b"-0") and got[-1].endswith(b"-49")
    # Both hops spoke HTTP/2: one connection each way, many calls.
    assert web.metric('mesh_sidecar_http_requests_total{reporter="source",status="200"}') == 7


def test_an_unavailable_instance_is_retried_on_the_other(grpc_mesh):
    apps, channel, web, api = grpc_mesh
    apps[1].unavailable = True
    try:
        unary = channel.unary_unary("/test.Echo/Unary")
        before = apps[1].calls
        answers = [unary(b"x", timeout=10) for _ in range(10)]
        assert answers == [b"a:x"] * 10
        assert apps[1].calls > before  # it was tried, and the retry went to a
        assert web.metric('mesh_sidecar_http_retries_total{cluster="api.default.dc1"}') >= 1
    finally:
        apps[1].unavailable = False


def test_per_call_headers_arrive_intact_call_after_call(grpc_mesh):
    """x-request-id and traceparent, new on every call, are sent without HPACK
    indexing on both hops: each call's values arrive whole and distinct,
    also once the header tables are warm."""
    apps, channel, web, api = grpc_mesh
    meta = channel.unary_unary("/test.Echo/Meta")
    seen = [meta(b"", timeout=10).decode().split(" ") for _ in range(40)]
    ids = [rid for rid, _ in seen]
    traces = [tp.split("-")[1] for _, tp in seen]
    assert len(set(ids)) == 40 and all(len(rid) == 36 and rid.count("-") == 4 for rid in ids)
    assert len(set(traces)) == 40 and all(len(t) == 32 for t in traces)
    assert all(tp.startswith("00-") and len(tp) == 55 for _, tp in seen)
