"""Real `mesh-sidecar` processes: a caller → web's sidecar (outbound) → mTLS →
api's sidecar (inbound) → a loopback app, fed by the agent's side of the socket."""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import threading
import time

import pytest

from meshproto.proxycfg import Cluster, Endpoint, Gateway, Upstream
from tests.proxy.support import (
    DC,
    TRUST_DOMAIN,
    App,
    SidecarProcess,
    TestCA,
    allow,
    free_port,
    proxy_config,
    refused,
    roundtrip,
    spiffe,
    upstream,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


class Pair:
    """web's sidecar with an upstream to api's sidecar, in front of `app`."""

    def __init__(self, tmp, ca: TestCA, app: App, *, api_extra=(), web_extra=()) -> None:
        self.ca = ca
        self.app = app
        self.api = SidecarProcess(tmp, "api-sidecar-proxy", *api_extra)
        self.web = SidecarProcess(tmp, "web-sidecar-proxy", *web_extra)
        self.api_in, self.web_in, self.up = free_port(), free_port(), free_port()
        self.api_version = 0
        self.web_version = 0

    def push_api(self, intentions=None, with_cert=True, **kw) -> dict:
        if intentions is None:
            intentions = (allow("web"),)
        self.api_version += 1
        msg: dict = {
            "config": proxy_config(
                "api",
                version=self.api_version,
                inbound_port=self.api_in,
                app_port=self.app.port,
                intentions=intentions,
                **kw,
            )
        }
        if with_cert:
            cert, key = self.ca.leaf("api")
            msg.update(cert=cert, key=key, roots=[self.ca.root_pem])
        return self.api.push(msg)

    def push_web(self, upstreams=None, with_cert=True) -> dict:
        self.web_version += 1
        if upstreams is None:
            upstreams = (upstream("api", self.up, [self.api_in]),)
        msg: dict = {
            "config": proxy_config(
                "web",
                version=self.web_version,
                inbound_port=self.web_in,
                app_port=1,
                upstreams=upstreams,
            )
        }
        if with_cert:
            cert, key = self.ca.leaf("web")
            msg.update(cert=cert, key=key, roots=[self.ca.root_pem])
        return self.web.push(msg)

    def start(self) -> Pair:
        assert self.push_api() == {"ack": 1}
        assert self.push_web() == {"ack": 1}
        return self

    def stop(self) -> None:
        self.web.stop()
        self.api.stop()


@pytest.fixture
def pair_factory(tmp_path, ca):
    made: list[Pair] = []
    apps: list[App] = []

    def make(mode: str = "digest", **kw) -> Pair:
        app = App(mode)
        apps.append(app)
        p = Pair(tmp_path, ca, app, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()
    for a in apps:
        a.close()
    # Everything a sidecar wrote on stderr is a JSON log line, and none is an error.
    for p in made:
        for proc in (p.web, p.api):
            lines = proc.log_path.read_text().splitlines()
            assert all(line.startswith("{") for line in lines), proc.log_path.read_text()[-2000:]
            assert not [e for e in proc.logs() if e["level"] == "error"]


def tls_to(port: int, ca: TestCA, tmp_path, service: str | None = "web", *, uris=None,
           issuer: TestCA | None = None, payload: bytes = b"ping") -> bytes:  # fmt: skip
    """A TLS client straight to an inbound listener; what comes back ("" if refused)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # it is the server's refusal under test
    if service is not None or uris is not None:
        cert, key = (issuer or ca).write_leaf(tmp_path, f"client-{time.monotonic_ns()}", service,
                                              uris=uris)  # fmt: skip
        ctx.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw) as s,
        ):
            s.sendall(payload)
            data = b""
            # Against the echo app: the payload comes back (then we stop), or the
            # sidecar closes the connection (refused).
            while len(data) < len(payload) and (chunk := s.recv(65536)):
                data += chunk
            return data
    except (ssl.SSLError, OSError):
        return b""


def failures(proc: SidecarProcess, direction: str) -> dict[str, float]:
    prefix = f'mesh_sidecar_tls_handshake_failures_total{{direction="{direction}",reason="'
    return {k[len(prefix) : -2]: v for k, v in proc.metrics().items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- bytes


def test_bytes_cross_the_pair_intact_including_10_mb_with_a_half_close(pair_factory):
    import hashlib
    import os

    p = pair_factory("digest").start()
    small = b"hello through the mesh"
    assert roundtrip(p.up, small) == f"{len(small)} {hashlib.sha256(small).hexdigest()}".encode()
    big = os.urandom(10 * 1024 * 1024)
    # The caller half-closes after sending; the app answers after that EOF.
    answer = roundtrip(p.up, big, timeout=60)
    assert answer == f"{len(big)} {hashlib.sha256(big).hexdigest()}".encode()
    m = p.web.metrics()
    assert m['mesh_sidecar_rx_bytes_total{direction="outbound"}'] == len(small) + len(big)
    assert m['mesh_sidecar_connections_opened_total{direction="outbound"}'] == 2
    assert p.api.metric('mesh_sidecar_rx_bytes_total{direction="inbound"}') == len(small) + len(big)
    assert p.api.metric("mesh_sidecar_authz_allowed_total") == 2


def test_an_open_connection_streams_both_ways(pair_factory):
    p = pair_factory("echo").start()
    with socket.create_connection(("127.0.0.1", p.up), timeout=5) as s:
        for i in range(20):
            msg = f"message {i} ".encode() * (i + 1)
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += s.recv(65536)
            assert got == msg
        assert p.web.metric('mesh_sidecar_connections_active{direction="outbound"}') == 1
    wait_until(
        lambda: p.web.metric('mesh_sidecar_connections_active{direction="outbound"}') == 0,
        what="the connection to be counted closed",
    )


# ----------------------------------------------------------------------------- intentions


def test_with_no_intention_the_default_denies_and_the_denial_is_counted_and_logged(pair_factory):
    p = pair_factory("digest")
    assert p.push_api(intentions=()) == {"ack": 1}
    assert p.push_web() == {"ack": 1}
    assert refused(p.up)
    assert p.app.accepted == 0
    wait_until(lambda: p.api.metric('mesh_sidecar_authz_denials_total{source="web"}') == 1)
    denial = wait_until(
        lambda: [e for e in p.api.logs() if e["msg"] == "inbound connection denied by intentions"]
    )[0]
    assert denial["source"] == spiffe("web")
    assert denial["destination"] == "api"
    assert "Default behavior: deny" in denial["reason"]


@pytest.mark.parametrize(
    ("intentions", "default_allow", "allowed"),
    [
        ((allow("web"),), False, True),
        ((allow("web", action="deny"),), True, False),
        ((allow("*"),), False, True),
        ((allow("*"), allow("web", action="deny")), False, False),  # exact beats wildcard
        ((allow("*", action="deny"), allow("web")), False, True),
        ((allow("lb"),), False, False),
        ((), True, True),
    ],
)
def test_intentions_decide_who_may_connect(pair_factory, intentions, default_allow, allowed):
    p = pair_factory("digest")
    assert p.push_api(intentions=intentions, default_allow=default_allow) == {"ack": 1}
    assert p.push_web() == {"ack": 1}
    if allowed:
        assert roundtrip(p.up, b"x").startswith(b"1 ")
    else:
        assert refused(p.up)
        assert p.app.accepted == 0


def test_a_pushed_deny_refuses_new_connections_while_an_open_one_keeps_working(pair_factory):
    p = pair_factory("echo").start()
    with socket.create_connection(("127.0.0.1", p.up), timeout=5) as s:
        s.sendall(b"before")
        assert s.recv(100) == b"before"
        assert p.push_api(intentions=(allow("web", action="deny"),)) == {"ack": 2}
        assert refused(p.up)  # right after the push: the cached allow is gone
        s.sendall(b"after the push")
        assert s.recv(100) == b"after the push"
        assert p.push_api(intentions=(allow("web"),)) == {"ack": 3}
        assert roundtrip(p.up, b"again") == b"again"
    assert p.api.metric("mesh_sidecar_config_version") == 3


# ----------------------------------------------------------------------------- bad callers


def test_the_inbound_listener_refuses_bad_callers_and_forwards_nothing(pair_factory, tmp_path, ca):
    p = pair_factory("echo").start()
    foreign = TestCA("Another CA")
    other_domain = TestCA("Other mesh", trust_domain="other.mesh")

    # A plaintext client.
    with socket.create_connection(("127.0.0.1", p.api_in), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            answer = s.recv(100)
            assert b"GET" not in answer  # a TLS alert at most, never the app's echo
    # TLS without a client certificate; a certificate from another CA; a leaf of
    # our CA without a SPIFFE ID, with an agent's ID, with another trust domain's.
    assert tls_to(p.api_in, ca, tmp_path, None) == b""
    assert tls_to(p.api_in, ca, tmp_path, "web", issuer=foreign) == b""
    assert tls_to(p.api_in, ca, tmp_path, None, uris=()) == b""
    assert tls_to(p.api_in, ca, tmp_path, None,
                  uris=(f"spiffe://{TRUST_DOMAIN}/agent/client/dc/{DC}/id/node-a",)) == b""  # fmt: skip
    assert tls_to(p.api_in, ca, tmp_path, None, uris=(spiffe("web", "other.mesh"),)) == b""
    assert tls_to(p.api_in, ca, tmp_path, "web", issuer=other_domain) == b""
    assert p.app.accepted == 0

    def counted():
        f = failures(p.api, "inbound")
        return sum(f.values()) >= 7 and f

    f = wait_until(counted, what="seven refusals counted")
    assert f.get("http_request", 0) + f.get("wrong_version_number", 0) >= 1
    assert f.get("peer_did_not_return_a_certificate", 0) >= 1
    assert f.get("certificate_verify_failed", 0) >= 2
    assert f.get("no_spiffe_id", 0) == 1
    assert f.get("bad_spiffe_id", 0) == 1
    assert f.get("foreign_trust_domain", 0) == 1
    logged = [e for e in p.api.logs() if e["msg"].startswith("inbound connection refused")]
    assert len(logged) >= 7 and all(e.get("reason") for e in logged)
    # A well-behaved caller still gets through.
    assert tls_to(p.api_in, ca, tmp_path, "web") == b"ping"


def test_an_upstream_presenting_the_wrong_spiffe_id_is_refused(pair_factory):
    p = pair_factory("echo")
    assert p.push_api() == {"ack": 1}
    wrong = upstream("api", p.up, [p.api_in], spiffe_id=spiffe("payments"))
    assert p.push_web(upstreams=(wrong,)) == {"ack": 1}
    assert refused(p.up, b"secret")
    # Nothing is sent before the server's identity is checked. (api's sidecar may
    # still finish its side of the handshake and open a connection to its app,
    # closed at once: TLS 1.3 completes the server side at the client's Finished.)
    assert p.app.received == 0
    assert wait_until(lambda: failures(p.web, "outbound").get("spiffe_id_mismatch"))
    event = [e for e in p.web.logs() if e["msg"] == "upstream refused: unexpected server identity"]
    assert event[0]["presented"] == spiffe("api")
    assert event[0]["expected"] == spiffe("payments")


# ----------------------------------------------------------------------------- balancing


def test_round_robin_spreads_connections_across_two_endpoints(tmp_path, ca):
    apps = [App("name", "one"), App("name", "two")]
    sidecars = [SidecarProcess(tmp_path, f"api-sidecar-proxy-{i}") for i in range(2)]
    web = SidecarProcess(tmp_path, "web-sidecar-proxy")
    try:
        ports = []
        for i, (app, sc) in enumerate(zip(apps, sidecars, strict=True)):
            port = free_port()
            ports.append(port)
            cert, key = ca.leaf("api")
            cfg = proxy_config("api", version=1, inbound_port=port, app_port=app.port,
                               intentions=(allow("web"),))  # fmt: skip
            cfg["proxy_id"] = f"api-sidecar-proxy-{i}"
            assert (
                sc.push({"config": cfg, "cert": cert, "key": key, "roots": [ca.root_pem]})["ack"]
                == 1
            )
        up = free_port()
        cert, key = ca.leaf("web")
        cfg = proxy_config("web", version=1, inbound_port=free_port(), app_port=1,
                           upstreams=(upstream("api", up, ports),))  # fmt: skip
        assert web.push({"config": cfg, "cert": cert, "key": key, "roots": [ca.root_pem]}) == {
            "ack": 1
        }
        answers = [roundtrip(up, b"") for _ in range(10)]
        assert sorted(answers) == [b"one"] * 5 + [b"two"] * 5
        assert all(a != b for a, b in zip(answers, answers[1:], strict=False))
    finally:
        for sc in (*sidecars, web):
            sc.stop()
        for app in apps:
            app.close()


def test_a_failover_cluster_serves_when_the_primary_has_no_endpoints(pair_factory):
    p = pair_factory("echo")
    assert p.push_api() == {"ack": 1}
    backup = Cluster(
        name=f"api.default.dc2.internal.{TRUST_DOMAIN}",
        service="api",
        datacenter="dc2",
        spiffe_id=spiffe("api"),
        sni=f"api.default.dc2.internal.{TRUST_DOMAIN}",
        endpoints=(Endpoint("127.0.0.1", p.api_in),),
    )
    primary = upstream("api", p.up, [], failover=(backup.name,), extra_clusters=(backup,))
    assert p.push_web(upstreams=(primary,)) == {"ack": 1}
    assert roundtrip(p.up, b"via the failover") == b"via the failover"
    # Without the failover target there is nowhere to go: refused and counted.
    assert p.push_web(upstreams=(upstream("api", p.up, []),)) == {"ack": 2}
    assert refused(p.up)
    assert wait_until(
        lambda: p.web.metric(
            'mesh_sidecar_connect_failures_total{target="api",reason="no_endpoints"}'
        )
    )


def test_a_cluster_behind_a_mesh_gateway_is_dialled_at_the_gateway_with_its_sni(
    pair_factory, tmp_path, ca
):
    p = pair_factory("echo")
    assert p.push_api() == {"ack": 1}
    # A stand-in for a gateway: a TLS endpoint that records the SNI it is sent
    # and presents api's leaf (a real gateway passes the TLS stream through to
    # api's sidecar, so the identity check is end to end either way).
    cert, key = ca.write_leaf(tmp_path, "gw-api", "api")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cadata=ca.root_pem)
    seen: list[str | None] = []
    server_ctx.sni_callback = lambda sslobj, name, ctx: seen.append(name)
    listener = socket.create_server(("127.0.0.1", 0))
    gw_port = listener.getsockname()[1]

    def serve_one():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as s:
            s.sendall(s.recv(100))

    threading.Thread(target=serve_one, daemon=True).start()
    sni = f"api.default.dc2.internal.{TRUST_DOMAIN}"
    remote = Cluster(name="api.default.dc2", service="api", datacenter="dc2",
                     spiffe_id=spiffe("api"), sni=sni, gateway=Gateway("127.0.0.1", gw_port))  # fmt: skip
    up = Upstream("api", "127.0.0.1", p.up, "tcp", clusters=(remote,))
    try:
        assert p.push_web(upstreams=(up,)) == {"ack": 1}
        with socket.create_connection(("127.0.0.1", p.up), timeout=5) as s:
            s.sendall(b"via the gateway")
            assert s.recv(100) == b"via the gateway"
        assert seen == [sni]
    finally:
        listener.close()


# ----------------------------------------------------------------------------- pushes


def test_certificate_and_root_rotation_apply_to_new_connections_with_no_failed_call(
    pair_factory, tmp_path, ca
):
    p = pair_factory("echo").start()
    results: list[bool] = []
    stop = threading.Event()

    def calls():
        while not stop.is_set():
            try:
                results.append(roundtrip(p.up, b"call", timeout=5) == b"call")
            except OSError:
                results.append(False)

    def some_calls_made() -> None:
        # A few more calls in every phase, however slow the machine is.
        since = len(results)
        wait_until(lambda: len(results) >= since + 5, timeout=30, what="calls in this phase")

    worker = threading.Thread(target=calls)
    worker.start()
    try:
        some_calls_made()
        # New leaves from the same CA; then a new CA: both roots trusted first,
        # then leaves from the new CA, then the old root dropped.
        for proc, service in ((p.api, "api"), (p.web, "web")):
            cert, key = ca.leaf(service)
            assert "ack" in proc.push({"cert": cert, "key": key})
        some_calls_made()
        new_ca = TestCA("Rotated CA")
        both = [new_ca.root_pem, ca.root_pem]
        for proc in (p.api, p.web):
            assert "ack" in proc.push({"roots": both})
        for proc, service in ((p.api, "api"), (p.web, "web")):
            cert, key = new_ca.leaf(service)
            assert "ack" in proc.push({"cert": cert, "key": key})
        some_calls_made()
        for proc in (p.api, p.web):
            assert "ack" in proc.push({"roots": [new_ca.root_pem]})
        some_calls_made()
    finally:
        stop.set()
        worker.join(10)
    assert len(results) >= 20
    assert all(results), f"{results.count(False)} of {len(results)} calls failed"
    # New handshakes present the new leaf: a client of the old CA is now refused.
    assert tls_to(p.api_in, ca, tmp_path, "web") == b""
    assert tls_to(p.api_in, new_ca, tmp_path, "web") == b"ping"


def test_garbage_and_invalid_messages_are_nacked_and_the_last_good_state_keeps_serving(
    pair_factory, ca
):
    p = pair_factory("echo").start()
    good = proxy_config("api", version=7, inbound_port=p.api_in, app_port=p.app.port)
    other_cert, other_key = ca.leaf("api")
    bad = [
        (b"this is not json\n", None),
        (b"[1, 2]\n", None),
        ({"hello": "agent"}, None),
        ({"config": {"version": 5, "proxy_id": "api-sidecar-proxy"}}, 5),
        ({"config": {**good, "inbound": {"bind_address": "127.0.0.1", "port": "x"}}}, 7),
        ({"config": {**good, "proxy_id": "someone-else"}}, 7),
        ({"config": {**good, "intentions": [{"SourceName": "a*", "Action": "allow"}]}}, 7),
        ({"cert": "not a certificate"}, None),
        ({"cert": other_cert}, None),  # does not match the key in force
        ({"key": other_key}, None),  # nor this key the certificate
        ({"roots": []}, None),
        ({"cert": ca.leaf("web")[0], "key": ca.leaf("web")[1]}, None),  # someone else's leaf
    ]
    for msg, version in bad:
        reply = p.api.push(msg)
        assert reply.get("nack", "missing") == version, (msg, reply)
        assert reply["error"]
    assert p.api.metric("mesh_sidecar_config_rejected_total") == len(bad)
    assert p.api.metric("mesh_sidecar_config_version") == 1
    assert roundtrip(p.up, b"still serving") == b"still serving"
    nacks = [e for e in p.api.logs() if e["msg"].startswith("rejected a message")]
    assert len(nacks) == len(bad)
    # A good message after all that is applied.
    assert p.api.push({"config": good}) == {"ack": 7}


def test_listeners_follow_upstream_changes_without_cutting_open_connections(pair_factory):
    p = pair_factory("echo").start()
    second = free_port()
    two = (upstream("api", p.up, [p.api_in]), upstream("api2", second, [p.api_in],
                                                        spiffe_id=spiffe("api")))  # fmt: skip
    with socket.create_connection(("127.0.0.1", p.up), timeout=5) as kept:
        kept.sendall(b"one")
        assert kept.recv(10) == b"one"
        assert p.push_web(upstreams=two, with_cert=False) == {"ack": 2}
        assert roundtrip(second, b"two") == b"two"
        assert roundtrip(p.up, b"same listener") == b"same listener"
        with socket.create_connection(("127.0.0.1", second), timeout=5) as on_removed:
            on_removed.sendall(b"x")
            assert on_removed.recv(10) == b"x"
            # Only the second upstream remains: the first listener closes...
            only_second = (two[1],)
            assert p.push_web(upstreams=only_second, with_cert=False) == {"ack": 3}
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", p.up), timeout=2)
            # ...while its open connection drains normally.
            kept.sendall(b"still here")
            assert kept.recv(20) == b"still here"
            on_removed.sendall(b"y")
            assert on_removed.recv(10) == b"y"


# ----------------------------------------------------------------------------- faults


def test_without_the_agent_traffic_flows_and_the_sidecar_reconnects_when_it_returns(
    pair_factory,
):
    p = pair_factory("echo").start()
    p.web.agent.stop()
    wait_until(lambda: p.web.metric("mesh_sidecar_control_connected") == 0)
    for _ in range(5):
        assert roundtrip(p.up, b"static stability") == b"static stability"
    time.sleep(1.0)  # a few reconnection attempts fail meanwhile
    hellos = len(p.web.agent.hellos)
    p.web.agent.start()
    p.web.agent.wait_connected(timeout=15)
    assert len(p.web.agent.hellos) == hellos + 1
    assert p.web.agent.hellos[-1] == {"proxy_id": "web-sidecar-proxy"}
    assert p.push_web(with_cert=False) == {"ack": 2}
    assert roundtrip(p.up, b"after") == b"after"
    assert p.web.metric("mesh_sidecar_control_connected") == 1


def test_sigterm_stops_accepting_and_drains_open_connections(pair_factory):
    p = pair_factory("echo", api_extra=("--drain-timeout", "20")).start()
    with socket.create_connection(("127.0.0.1", p.up), timeout=5) as s:
        s.sendall(b"open")
        assert s.recv(10) == b"open"
        p.api.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: any(e["msg"] == "draining" for e in p.api.logs()))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.api_in), timeout=2)
        s.sendall(b"during the drain")
        assert s.recv(100) == b"during the drain"
        assert p.api.proc.poll() is None
    # The last connection closed: the sidecar exits at once, cleanly.
    assert p.api.proc.wait(5) == 0


def test_sigterm_cuts_what_is_still_open_when_the_grace_period_ends(pair_factory):
    p = pair_factory("echo", api_extra=("--drain-timeout", "0.5")).start()
    with socket.create_connection(("127.0.0.1", p.up), timeout=5) as s:
        s.sendall(b"open")
        assert s.recv(10) == b"open"
        started = time.monotonic()
        p.api.proc.send_signal(signal.SIGTERM)
        assert p.api.proc.wait(5) == 0
        assert 0.4 < time.monotonic() - started < 3
        assert any(e["msg"] == "grace period over; connections cut" for e in p.api.logs())
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(10) == b""


def test_metrics_report_the_config_version_and_the_leaf_expiry(pair_factory):
    p = pair_factory("echo").start()
    m = p.api.metrics()
    assert m["mesh_sidecar_config_version"] == 1
    assert 23 * 3600 < m["mesh_sidecar_leaf_expiry_seconds"] <= 24 * 3600
    assert m["mesh_sidecar_control_connected"] == 1
    # The agent may say when the leaf expires (it knows without parsing it).
    soon = time.time() + 600
    assert "ack" in p.api.push({"cert_not_after": soon})
    assert 590 < p.api.metric("mesh_sidecar_leaf_expiry_seconds") <= 600
