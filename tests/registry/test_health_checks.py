"""Health checks of the server's node: probes, Consul's rules, and the checks a
real `mesh server` runs against real loopback HTTP, TCP and gRPC endpoints."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.utils import timezone

from registry.domain import catalog, health, shapes
from registry.models import Check, ServiceInstance

# --- loopback endpoints ------------------------------------------------------------------


class HttpEndpoint:
    """A loopback HTTP(S) server whose answer the test sets; it records requests."""

    def __init__(self, status: int = 200, body: bytes = b"ok", tls: ssl.SSLContext | None = None):
        self.status, self.body = status, body
        self.requests: list[dict[str, Any]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                endpoint.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": self.headers,
                        "body": self.rfile.read(length) if length else b"",
                    }
                )
                self.send_response(endpoint.status)
                self.send_header("Content-Length", str(len(endpoint.body)))
                self.end_headers()
                self.wfile.write(endpoint.body)

            do_GET = do_POST = do_PUT = do_HEAD = _answer  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if tls else "http"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str = "/health") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class TcpListener:
    """A loopback socket that accepts connections (and drops them)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


class GrpcHealthServer:
    """A real grpc.server with the standard health servicer."""

    def __init__(self) -> None:
        import grpc
        from grpc_health.v1 import health as grpc_health
        from grpc_health.v1 import health_pb2_grpc

        self.servicer = grpc_health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.addr = f"127.0.0.1:{self.port}"

    def set(self, service: str, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING
        if not serving:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        self.servicer.set(service, status)

    def close(self) -> None:
        self.server.stop(0)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def endpoint():
    ep = HttpEndpoint()
    yield ep
    ep.close()


@pytest.fixture
def grpc_server():
    srv = GrpcHealthServer()
    yield srv
    srv.close()


def wait_for(fn: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `fn` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def self_signed_pems(name: str = "health.test") -> tuple[bytes, bytes]:
    """A fresh self-signed certificate for `name` and its key, as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def self_signed_tls(name: str = "health.test") -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for `name`."""
    import tempfile

    cert_pem, key_pem = self_signed_pems(name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile() as c, tempfile.NamedTemporaryFile() as k:
        c.write(cert_pem)
        c.flush()
        k.write(key_pem)
        k.flush()
        ctx.load_cert_chain(c.name, k.name)
    return ctx


# --- probes (no database) -----------------------------------------------------------------


def test_an_http_probe_passes_on_2xx_with_consuls_output(endpoint):
    endpoint.body = b"all good"
    result = health.probe_http({"HTTP": endpoint.url()}, 2)
    assert result == health.Result("passing", f"HTTP GET {endpoint.url()}: 200 OK Output: all good")
    assert endpoint.requests[0]["headers"]["User-Agent"] == "Consul Health Check"


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        (204, "passing", "No Content"),
        (429, "warning", "Too Many Requests"),
        (500, "critical", "Internal Server Error"),
        (404, "critical", "Not Found"),
    ],
)
def test_an_http_probe_maps_status_codes_as_consul(endpoint, code, status, reason):
    endpoint.status, endpoint.body = code, b""
    result = health.probe_http({"HTTP": endpoint.url()}, 2)
    assert result.status == status
    assert result.output == f"HTTP GET {endpoint.url()}: {code} {reason} Output: "


def test_an_http_probe_sends_method_headers_and_body(endpoint):
    result = health.probe_http(
        {
            "HTTP": endpoint.url("/ready?deep=1"),
            "Method": "POST",
            "Header": {"X-Probe": ["a", "b"], "Authorization": ["Bearer t"]},
            "Body": '{"ping": true}',
        },
        2,
    )
    assert result.status == "passing"
    req = endpoint.requests[0]
    assert (req["method"], req["path"], req["body"]) == ("POST", "/ready?deep=1", b'{"ping": true}')
    assert req["headers"].get_all("X-Probe") == ["a", "b"]
    assert req["headers"]["Authorization"] == "Bearer t"


def test_an_http_probe_keeps_only_the_first_4_kib_of_the_body(endpoint):
    endpoint.body = b"x" * 10_000
    result = health.probe_http({"HTTP": endpoint.url()}, 2)
    assert result.output.endswith("Output: " + "x" * 4096)


def test_an_http_probe_of_a_closed_port_is_critical_with_the_reason():
    port = closed_port()
    result = health.probe_http({"HTTP": f"http://127.0.0.1:{port}/"}, 2)
    assert result == health.Result(
        "critical",
        f'Get "http://127.0.0.1:{port}/": dial tcp 127.0.0.1:{port}: connect: connection refused',
    )


def test_an_http_probe_times_out_within_its_timeout():
    silent = TcpListener()  # accepts, never answers
    try:
        started = time.monotonic()
        result = health.probe_http({"HTTP": f"http://{silent.addr}/"}, 0.3)
        assert time.monotonic() - started < 2
        assert result.status == "critical"
        assert "Client.Timeout" in result.output
    finally:
        silent.close()


def test_an_https_probe_skips_verification_only_when_asked():
    ctx = self_signed_tls()
    ep = HttpEndpoint(tls=ctx)
    try:
        verified = health.probe_http({"HTTP": ep.url()}, 2)
        assert verified.status == "critical"
        assert "CERTIFICATE_VERIFY_FAILED" in verified.output
        skipped = health.probe_http({"HTTP": ep.url(), "TLSSkipVerify": True}, 2)
        assert skipped.status == "passing"
        assert skipped.output.startswith(f"HTTP GET {ep.url()}: 200 OK")
    finally:
        ep.close()


def test_an_https_probe_sends_tls_server_name_as_sni():
    ctx = self_signed_tls()
    seen: list[str | None] = []
    ctx.sni_callback = lambda sock, name, c: seen.append(name)
    ep = HttpEndpoint(tls=ctx)
    try:
        result = health.probe_http(
            {"HTTP": ep.url(), "TLSSkipVerify": True, "TLSServerName": "health.test"}, 2
        )
        assert result.status == "passing"
        assert seen == ["health.test"]
    finally:
        ep.close()


def test_a_tcp_probe_passes_when_it_connects_and_fails_when_refused():
    listener = TcpListener()
    try:
        assert health.probe_tcp(listener.addr, 2) == health.Result(
            "passing", f"TCP connect {listener.addr}: Success"
        )
    finally:
        listener.close()
    port = closed_port()
    assert health.probe_tcp(f"127.0.0.1:{port}", 2) == health.Result(
        "critical", f"dial tcp 127.0.0.1:{port}: connect: connection refused"
    )


def test_a_grpc_probe_follows_the_standard_health_service(grpc_server):
    grpc_server.set("", True)
    grpc_server.set("billing", False)
    assert health.probe_grpc({"GRPC": grpc_server.addr}, 2) == health.Result(
        "passing", f"gRPC check {grpc_server.addr}: success"
    )
    assert health.probe_grpc({"GRPC": f"{grpc_server.addr}/billing"}, 2) == health.Result(
        "critical", f"gRPC {grpc_server.addr}/billing serving status: NOT_SERVING"
    )
    unknown = health.probe_grpc({"GRPC": f"{grpc_server.addr}/nope"}, 2)
    assert unknown.status == "critical"
    assert unknown.output.startswith("rpc error: code = NotFound")


def test_a_grpc_probe_of_a_closed_port_is_critical():
    result = health.probe_grpc({"GRPC": f"127.0.0.1:{closed_port()}"}, 1)
    assert result.status == "critical"
    assert result.output.startswith("rpc error: code = Unavailable")


def test_a_grpc_probe_with_tls_verifies_unless_told_to_skip():
    import grpc
    from grpc_health.v1 import health as grpc_health
    from grpc_health.v1 import health_pb2_grpc

    cert_pem, key_pem = self_signed_pems()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(grpc_health.HealthServicer(), srv)
    port = srv.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    srv.start()
    try:
        target = f"127.0.0.1:{port}"
        verified = health.probe_grpc({"GRPC": target, "GRPCUseTLS": True}, 2)
        assert verified.status == "critical"
        assert "CERTIFICATE_VERIFY_FAILED" in verified.output
        skipped = health.probe_grpc({"GRPC": target, "GRPCUseTLS": True, "TLSSkipVerify": True}, 2)
        assert skipped == health.Result("passing", f"gRPC check {target}: success")
    finally:
        srv.stop(0)


@pytest.mark.parametrize(
    ("timeout", "interval", "expected"),
    [(0, 30, 10.0), (0, 2, 2.0), (3, 30, 3.0), (60, 5, 5.0)],
)
def test_a_probe_timeout_defaults_to_10s_and_never_exceeds_the_interval(
    timeout, interval, expected
):
    assert health.probe_timeout(timeout, interval) == expected


# --- Consul's rules (no database) ----------------------------------------------------------


def _run(results: list[str], success_before: int, failures_before: int) -> list[bool]:
    streak, applied = None, []
    for status in results:
        apply, streak = health.threshold_step(streak, status, success_before, failures_before)
        applied.append(apply)
    return applied


def test_without_thresholds_every_result_applies():
    assert _run(["passing", "critical", "passing"], 0, 0) == [True, True, True]


def test_failures_before_critical_needs_consecutive_failures():
    # The first result applies at once (Consul starts the counters at the thresholds).
    assert _run(["passing", "critical", "critical", "critical", "critical"], 0, 3) == [
        True,
        False,
        False,
        True,
        True,
    ]
    assert _run(["passing", "critical", "critical", "passing", "critical"], 0, 3) == [
        True,
        False,
        False,
        True,
        False,
    ]


def test_success_before_passing_counts_warnings_as_successes():
    assert _run(["critical", "passing", "warning", "passing"], 3, 0) == [True, False, False, True]


def test_a_steady_check_stops_moving_its_streak():
    _, streak = health.threshold_step(3, "passing", 3, 3)
    assert streak == 3
    _, streak = health.threshold_step(-3, "critical", 3, 3)
    assert streak == -3


def test_an_alias_takes_the_worst_of_its_service_and_node_checks():
    rows = [
        ("", "Serf Health Status", "passing", "alive"),
        ("web", "http", "warning", "slow"),
        ("other", "x", "critical", "ignored: another service"),
    ]
    assert health.alias_result(rows, "web", "n1", True) == health.Result(
        "warning", 'Aliased check "http" failing: slow'
    )
    rows.append(("web", "tcp", "critical", "refused"))
    assert health.alias_result(rows, "web", "n1", True) == health.Result(
        "critical", 'Aliased check "tcp" failing: refused'
    )


def test_an_alias_of_healthy_or_checkless_services_passes_and_of_a_missing_one_fails():
    assert health.alias_result([("web", "a", "passing", "")], "web", "n1", True) == health.Result(
        "passing", "All checks passing."
    )
    assert health.alias_result([], "web", "n1", True) == health.Result(
        "passing", "No checks found."
    )
    assert health.alias_result([], "web", "n1", False) == health.Result(
        "critical", "Service web could not be found on node n1"
    )


def test_a_lapsed_ttl_keeps_its_last_output_as_consul():
    assert health.ttl_expired_output("") == "TTL expired"
    assert (
        health.ttl_expired_output("fine")
        == "TTL expired (last output before timeout follows): fine"
    )


# --- the tick on a database ----------------------------------------------------------------


def _register(name: str, checks: list[dict[str, Any]]) -> ServiceInstance:
    return catalog.register_agent_service(
        catalog.local_node(), {"Name": name, "Port": 80, "Checks": checks}
    )


def _check(check_id: str) -> Check:
    return Check.objects.get(node__name=catalog.local_node().name, check_id=check_id)


def test_a_tick_runs_a_due_http_check_and_stores_its_result(db, endpoint):
    _register("web", [{"CheckID": "web-http", "HTTP": endpoint.url(), "Interval": 10.0}])
    before = _check("web-http").modify_index
    done = health.tick(wait=True)
    assert done["checks_run"] == 1
    check = _check("web-http")
    assert (check.status, check.output) == (
        "passing",
        f"HTTP GET {endpoint.url()}: 200 OK Output: ok",
    )
    assert check.modify_index > before
    assert check.next_run_at > timezone.now() + dt.timedelta(seconds=9)
    assert health.tick(wait=True)["checks_run"] == 0  # not due again for 10s


def test_an_unchanged_result_writes_no_index(db, endpoint):
    _register("web", [{"CheckID": "web-http", "HTTP": endpoint.url(), "Interval": 10.0}])
    health.tick(wait=True)
    index = _check("web-http").modify_index
    Check.objects.filter(check_id="web-http").update(next_run_at=timezone.now())
    assert health.tick(wait=True)["checks_run"] == 1
    assert len(endpoint.requests) == 2
    assert _check("web-http").modify_index == index


def test_two_workers_holding_the_same_due_check_run_it_once(db, endpoint):
    _register("web", [{"CheckID": "web-http", "HTTP": endpoint.url(), "Interval": 10.0}])
    first, second = _check("web-http"), _check("web-http")  # what two workers read
    now = timezone.now()
    assert health.run_due_checks([first], now, wait=True) == 1
    assert health.run_due_checks([second], now, wait=True) == 0
    assert len(endpoint.requests) == 1


def test_run_check_runs_one_check_now(db, endpoint):
    _register("web", [{"CheckID": "web-http", "HTTP": endpoint.url(), "Interval": 60.0}])
    health.tick(wait=True)
    endpoint.status = 503
    result = health.run_check(_check("web-http").pk)
    assert result is not None and result.status == "critical"
    assert _check("web-http").status == "critical"
    assert health.run_check(999_999) is None


def test_a_result_for_a_re_registered_check_is_dropped(db, endpoint):
    _register("web", [{"CheckID": "web-http", "HTTP": endpoint.url(), "Interval": 10.0}])
    stale = health._probe_of(_check("web-http"))
    _register("web", [{"CheckID": "web-http", "HTTP": endpoint.url("/other"), "Interval": 10.0}])
    assert health.record_result(stale, health.Result("passing", "old")) is False
    assert _check("web-http").status == "critical"


def test_failures_before_critical_holds_a_passing_check(db, endpoint):
    _register(
        "web",
        [
            {
                "CheckID": "web-http",
                "HTTP": endpoint.url(),
                "Interval": 10.0,
                "FailuresBeforeCritical": 2,
            }
        ],
    )

    def run() -> str:
        Check.objects.filter(check_id="web-http").update(next_run_at=timezone.now())
        health.tick(wait=True)
        return _check("web-http").status

    assert run() == "passing"
    endpoint.status = 500
    assert run() == "passing"  # one failure is not enough
    assert run() == "critical"
    assert "_streak" not in shapes.check_json(_check("web-http"))["Definition"]


def test_a_lapsed_ttl_check_goes_critical_once(db):
    node = catalog.local_node()
    catalog.register_agent_check(node, {"Name": "beat", "CheckID": "beat", "TTL": 30.0})
    catalog.update_check_status(node, "beat", "passing", "alive")
    Check.objects.filter(check_id="beat").update(
        ttl_expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    assert health.tick()["ttl_expired"] == 1
    check = _check("beat")
    assert (check.status, check.output) == (
        "critical",
        "TTL expired (last output before timeout follows): alive",
    )
    assert check.ttl_expires_at is None
    index = check.modify_index
    assert health.tick()["ttl_expired"] == 0
    assert _check("beat").modify_index == index
    catalog.update_check_status(node, "beat", "passing", "")  # a heartbeat re-arms it
    assert _check("beat").ttl_expires_at > timezone.now()


def test_an_alias_check_follows_its_service(db):
    node = catalog.local_node()
    _register("api", [{"CheckID": "api-ttl", "TTL": 60.0}])
    _register("api-proxy", [{"CheckID": "api-alias", "AliasService": "api"}])
    health.tick()
    assert _check("api-alias").status == "critical"
    catalog.update_check_status(node, "api-ttl", "passing", "ok")
    health.tick()
    assert (_check("api-alias").status, _check("api-alias").output) == (
        "passing",
        "All checks passing.",
    )
    catalog.deregister_agent_service(node, "api")
    health.tick()
    assert _check("api-alias").output == f"Service api could not be found on node {node.name}"


def test_a_service_critical_past_its_deregister_after_is_removed(db):
    _register(
        "doomed",
        [{"CheckID": "doomed-ttl", "TTL": 60.0, "DeregisterCriticalServiceAfter": 30.0}],
    )
    assert health.tick()["services_deregistered"] == 0  # critical, but not for 30s yet
    Check.objects.filter(check_id="doomed-ttl").update(
        critical_since=timezone.now() - dt.timedelta(seconds=31)
    )
    assert health.tick()["services_deregistered"] == 1
    assert not ServiceInstance.objects.filter(service_id="doomed").exists()
    assert not Check.objects.filter(check_id="doomed-ttl").exists()


def test_a_catalog_registered_service_on_the_servers_node_is_reaped_too(db):
    node = catalog.local_node()
    catalog.catalog_register(
        {
            "Node": node.name,
            "SkipNodeUpdate": True,
            "Service": {"Name": "ext", "ID": "ext"},
            "Check": {
                "CheckID": "ext-check",
                "Name": "ext",
                "ServiceID": "ext",
                "Status": "critical",
                "Definition": {"DeregisterCriticalServiceAfter": 1.0},
            },
        }
    )
    Check.objects.filter(check_id="ext-check").update(
        critical_since=timezone.now() - dt.timedelta(seconds=2)
    )
    assert health.tick()["services_deregistered"] == 1
    assert not ServiceInstance.objects.filter(service_id="ext").exists()


def test_checks_of_other_nodes_are_left_to_their_agents(db, endpoint):
    catalog.catalog_register(
        {
            "Node": "elsewhere",
            "Address": "10.0.0.9",
            "Service": {"Name": "far", "ID": "far"},
            "Check": {
                "CheckID": "far-http",
                "Name": "far",
                "ServiceID": "far",
                "Definition": {"HTTP": endpoint.url(), "Interval": 1.0},
            },
        }
    )
    assert health.tick(wait=True)["checks_run"] == 0
    assert endpoint.requests == []


def test_a_tick_with_nothing_due_costs_two_queries_plus_session_expiry(
    db, django_assert_max_num_queries
):
    catalog.local_node()
    health.tick()  # the first tick of a process evaluates aliases once (and sweeps liveness)
    with django_assert_max_num_queries(3):  # due work, alias index, expire_sessions
        assert health.tick() == {
            "checks_run": 0,
            "ttl_expired": 0,
            "aliases_updated": 0,
            "services_deregistered": 0,
            "sessions_expired": 0,
            "nodes_down": 0,
        }


# --- a real server runs them (end to end) --------------------------------------------------


def _agent_check(consul, check_id: str) -> dict[str, Any] | None:
    return consul.agent.checks().get(check_id)


def _status_becomes(consul, check_id: str, status: str, timeout: float = 10) -> dict[str, Any]:
    return wait_for(
        lambda: (c := _agent_check(consul, check_id)) and c["Status"] == status and c, timeout
    )


@pytest.mark.slow
def test_an_http_check_follows_its_endpoint(server, unique, endpoint):
    import consul as consul_mod

    c = server.consul()
    name = unique("web")
    c.agent.service.register(
        name, service_id=name, port=80, check=consul_mod.Check.http(endpoint.url(), "1s", "1s")
    )
    check_id = f"service:{name}"
    started = time.monotonic()
    passing = _status_becomes(c, check_id, "passing", timeout=2.5)
    assert time.monotonic() - started < 2.0  # within interval + 1s
    assert passing["Output"] == f"HTTP GET {endpoint.url()}: 200 OK Output: ok"
    endpoint.status = 500
    assert _status_becomes(c, check_id, "critical", timeout=3)["Output"].startswith(
        f"HTTP GET {endpoint.url()}: 500 Internal Server Error"
    )
    endpoint.status = 429
    _status_becomes(c, check_id, "warning", timeout=3)
    endpoint.status = 200
    _status_becomes(c, check_id, "passing", timeout=3)
    endpoint.close()
    gone = _status_becomes(c, check_id, "critical", timeout=3)
    assert "connection refused" in gone["Output"]
    c.agent.service.deregister(name)


@pytest.mark.slow
def test_a_tcp_check_passes_while_the_port_listens(server, unique):
    import consul as consul_mod

    c = server.consul()
    name = unique("tcp")
    listener = TcpListener()
    host, port = listener.addr.split(":")
    c.agent.service.register(
        name, service_id=name, port=int(port), check=consul_mod.Check.tcp(host, int(port), "1s")
    )
    assert _status_becomes(c, f"service:{name}", "passing")["Output"] == (
        f"TCP connect {listener.addr}: Success"
    )
    listener.close()
    assert "connection refused" in _status_becomes(c, f"service:{name}", "critical")["Output"]
    c.agent.service.deregister(name)


@pytest.mark.slow
def test_a_grpc_check_follows_the_serving_status(server, unique, grpc_server):
    name = unique("grpc")
    grpc_server.set(name, True)
    with server.client() as http:
        r = http.put(
            "/v1/agent/service/register",
            json={
                "Name": name,
                "Port": grpc_server.port,
                "Check": {"GRPC": f"{grpc_server.addr}/{name}", "Interval": "1s"},
            },
        )
        assert r.status_code == 200, r.text
    c = server.consul()
    assert _status_becomes(c, f"service:{name}", "passing")["Output"] == (
        f"gRPC check {grpc_server.addr}/{name}: success"
    )
    grpc_server.set(name, False)
    assert _status_becomes(c, f"service:{name}", "critical")["Output"] == (
        f"gRPC {grpc_server.addr}/{name} serving status: NOT_SERVING"
    )
    c.agent.service.deregister(name)


@pytest.mark.slow
def test_a_ttl_check_lapses_to_critical(server, unique):
    import consul as consul_mod

    c = server.consul()
    name = unique("ttl")
    c.agent.service.register(name, service_id=name, check=consul_mod.Check.ttl("1s"))
    c.agent.check.ttl_pass(f"service:{name}", "working")
    assert _agent_check(c, f"service:{name}")["Status"] == "passing"
    lapsed = _status_becomes(c, f"service:{name}", "critical", timeout=3)
    assert lapsed["Output"] == "TTL expired (last output before timeout follows): working"
    c.agent.service.deregister(name)


@pytest.mark.slow
def test_deregister_critical_service_after_removes_the_service(server, unique):
    import consul as consul_mod

    c = server.consul()
    name = unique("doomed")
    c.agent.service.register(
        name,
        service_id=name,
        check=consul_mod.Check.tcp("127.0.0.1", closed_port(), "1s", deregister="1s"),
    )
    assert name in c.agent.services()
    wait_for(lambda: name not in c.agent.services(), timeout=5)
    assert c.catalog.service(name)[1] == []


@pytest.mark.slow
def test_an_alias_check_follows_the_service_it_aliases(server, unique):
    import consul as consul_mod

    c = server.consul()
    name = unique("aliased")
    c.agent.service.register(name, service_id=name, check=consul_mod.Check.ttl("60s"))
    with server.client() as http:
        r = http.put(
            "/v1/agent/check/register",
            json={"Name": f"{name}-alias", "CheckID": f"{name}-alias", "AliasService": name},
        )
        assert r.status_code == 200, r.text
    _status_becomes(c, f"{name}-alias", "critical")
    c.agent.check.ttl_pass(f"service:{name}")
    _status_becomes(c, f"{name}-alias", "passing")
    c.agent.check.ttl_warn(f"service:{name}", "slow")
    alias = _status_becomes(c, f"{name}-alias", "warning")
    assert alias["Output"] == f"Aliased check \"Service '{name}' check\" failing: slow"
    c.agent.service.deregister(name)
    c.agent.check.deregister(f"{name}-alias")


@pytest.mark.slow
def test_py_consul_passing_filter_follows_an_http_check(server, unique, endpoint):
    import consul as consul_mod

    c = server.consul()
    name = unique("flappy")
    c.agent.service.register(
        name, service_id=name, port=80, check=consul_mod.Check.http(endpoint.url(), "1s")
    )

    def passing_ids() -> list[str]:
        return [e["Service"]["ID"] for e in c.health.service(name, passing=True)[1]]

    wait_for(lambda: passing_ids() == [name], timeout=3)
    endpoint.status = 500
    wait_for(lambda: passing_ids() == [], timeout=3)
    endpoint.status = 200
    wait_for(lambda: passing_ids() == [name], timeout=3)
    c.agent.service.deregister(name)


@pytest.mark.slow
def test_a_blocking_health_query_wakes_when_a_check_changes(server, unique, endpoint):
    import consul as consul_mod

    c = server.consul()
    name = unique("watched")
    c.agent.service.register(
        name, service_id=name, port=80, check=consul_mod.Check.http(endpoint.url(), "1s")
    )
    _status_becomes(c, f"service:{name}", "passing")
    index, _ = c.health.service(name)
    endpoint.status = 500
    started = time.monotonic()
    new_index, entries = c.health.service(name, index=index, wait="10s")
    assert time.monotonic() - started < 3
    assert int(new_index) > int(index)
    assert [ch["Status"] for ch in entries[0]["Checks"] if ch["ServiceID"] == name] == ["critical"]
    c.agent.service.deregister(name)
