"""Real `mesh-gateway` processes between real sidecars: web's sidecar (dc1) ->
dc1's gateway -> dc2's gateway -> api's sidecar (dc2) -> the app, with mTLS end
to end between the sidecars; and every kind of bad stream refused and counted."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from meshproto.proxycfg import Cluster, Endpoint, Gateway, Upstream
from tests.gateways.hellos import client_hello, split_records
from tests.gateways.support import (
    GatewayProcess,
    gateway_config,
    key_needles,
    memory_holds,
    sni,
)
from tests.proxy.support import (
    App,
    SidecarProcess,
    TestCA,
    allow,
    free_port,
    proxy_config,
    spiffe,
    wait_until,
)

pytestmark = pytest.mark.slow


class World:
    """Two gateways and two sidecars on loopback (one datacenter each side)."""

    def __init__(self, tmp) -> None:
        self.ca = TestCA()
        self.app = App("name", name="api-in-dc2")
        self.api = SidecarProcess(tmp, "api-sidecar-proxy")
        self.web = SidecarProcess(tmp, "web-sidecar-proxy")
        self.gw1 = GatewayProcess(tmp, "gw-dc1", "--hello-timeout", "1")
        self.gw2 = GatewayProcess(tmp, "gw-dc2", "--hello-timeout", "1")
        self.api_in, self.web_in, self.up = free_port(), free_port(), free_port()
        self.gw1_version = 0

    def start(self) -> World:
        cert, key = self.ca.leaf("api")
        self.api_key = key
        api = proxy_config(
            "api", version=1, inbound_port=self.api_in, app_port=self.app.port,
            intentions=(allow("web"),),
        )  # fmt: skip
        assert self.api.push(
            {"config": api, "cert": cert, "key": key, "roots": [self.ca.root_pem]}
        ) == {"ack": 1}
        assert self.gw2.push(
            gateway_config(
                "dc2", self.gw2.port, local={"api": [self.api_in]}, remote={"dc1": [self.gw1.port]}
            )
        ) == {"ack": 1}
        self.push_gw1()
        remote = Cluster(
            name="api.default.dc2",
            service="api",
            datacenter="dc2",
            spiffe_id=spiffe("api"),
            sni=sni("api", "dc2"),
            endpoints=(Endpoint("127.0.0.1", self.gw1.port),),
            gateway=Gateway("127.0.0.1", self.gw1.port),
        )
        self.remote = remote
        self.web_version = 0
        assert self.push_web((remote,)) == {"ack": 1}
        return self

    def push_web(self, clusters: tuple[Cluster, ...]) -> dict:
        self.web_version += 1
        up = Upstream("api", "127.0.0.1", self.up, "tcp", clusters=clusters)
        web = proxy_config(
            "web", version=self.web_version, inbound_port=self.web_in, app_port=1, upstreams=(up,)
        )
        cert, key = self.ca.leaf("web")
        return self.web.push({"config": web, "cert": cert, "key": key, "roots": [self.ca.root_pem]})

    def push_gw1(self, **kw) -> dict:
        self.gw1_version += 1
        kw.setdefault("remote", {"dc2": [self.gw2.port]})
        return self.gw1.push(gateway_config("dc1", self.gw1.port, version=self.gw1_version, **kw))

    def stop(self) -> None:
        for p in (self.web, self.api, self.gw1, self.gw2):
            p.stop()
        self.app.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("gateways"))
    try:
        yield w.start()
    finally:
        w.stop()


def ask(port: int, payload: bytes = b"hello", timeout: float = 10.0) -> bytes:
    """One call through web's upstream listener: send, then read api's answer to EOF
    (without half-closing first: the answer, not the close, ends the call)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def _raw(port: int, data: bytes, *, close: bool = True, timeout: float = 5.0) -> bytes:
    """Send raw bytes to a gateway; what comes back before it closes (b"" if nothing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if close:
            s.shutdown(socket.SHUT_WR)
        try:
            return s.recv(65536)
        except ConnectionResetError:
            return b""


def _grew(gw: GatewayProcess, reason: str, before: float) -> bool:
    return wait_until(lambda: gw.refused(reason) > before, timeout=15, what=reason)


def test_web_calls_api_in_another_datacenter_through_both_gateways(world):
    assert ask(world.up, b"hello") == b"api-in-dc2"
    m1, m2 = world.gw1.metrics(), world.gw2.metrics()
    key = '{source_dc="dc1",destination_dc="dc2",service="*"}'
    assert m1[f"mesh_gateway_connections_total{key}"] >= 1
    key2 = '{source_dc="dc1",destination_dc="dc2",service="api"}'
    # dc2's gateway knows the stream came from dc1's gateway (its address).
    assert wait_until(
        lambda: world.gw2.metrics().get(f"mesh_gateway_sent_bytes_total{key2}", 0) > 0
    )
    assert m2[f"mesh_gateway_connections_total{key2}"] >= 1


def test_the_gateways_pass_tls_through_untouched_and_hold_no_key(world):
    # A client speaking TLS to api's sidecar through the gateways sees api's
    # certificate (signed by the mesh CA): the gateways did not terminate TLS.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=world.ca.root_pem)
    with socket.create_connection(("127.0.0.1", world.gw1.port), timeout=5) as raw:
        try:
            s = ctx.wrap_socket(raw, server_hostname=sni("api", "dc2"))
        except ssl.SSLError:
            s = None  # api's sidecar wants a client certificate: it may close after the hello
        if s is not None:
            peer = s.getpeercert()
            uris = [v for k, v in peer.get("subjectAltName", ()) if k == "URI"]
            assert uris == [spiffe("api")]
    # Neither gateway's memory holds api's key; api's sidecar's does (the
    # scan can tell).
    needles = key_needles(world.api_key)
    assert memory_holds(world.api.proc.pid, needles)
    for gw in (world.gw1, world.gw2):
        assert not memory_holds(gw.proc.pid, needles)


def test_unknown_sni_is_refused_and_counted(world):
    before = world.gw1.refused("unknown_sni")
    assert _raw(world.gw1.port, client_hello("nothing.example.com")) == b""
    assert _raw(world.gw1.port, client_hello(None)) == b""
    assert _grew(world.gw1, "unknown_sni", before + 1)


def test_a_non_tls_stream_is_refused(world):
    before = world.gw1.refused("not_tls")
    assert _raw(world.gw1.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    assert _grew(world.gw1, "not_tls", before)


def test_a_hello_over_16_kib_is_refused_without_buffering_it_all(world):
    before = world.gw1.refused("too_large")
    header = b"\x16\x03\x01\x40\x00\x01\x00\x50\x00"  # a record and a hello of 20 KiB
    assert _raw(world.gw1.port, header + b"\0" * 200) == b""
    assert _grew(world.gw1, "too_large", before)


def test_a_truncated_record_is_refused(world):
    before = world.gw1.refused("malformed")
    hello = client_hello(sni("api", "dc2"))
    assert _raw(world.gw1.port, hello[: len(hello) // 2]) == b""
    assert _grew(world.gw1, "malformed", before)


def test_a_slow_client_that_never_finishes_its_hello_is_cut(world):
    before = world.gw1.refused("hello_timeout")
    hello = client_hello(sni("api", "dc2"))
    started = time.monotonic()
    assert _raw(world.gw1.port, hello[:40], close=False, timeout=30) == b""
    assert time.monotonic() - started < 25  # cut by the gateway, not by our timeout
    assert _grew(world.gw1, "hello_timeout", before)


def test_a_hello_split_across_tcp_segments_and_records_is_routed(world):
    hello = split_records(client_hello(sni("api", "dc2")), 100)
    with socket.create_connection(("127.0.0.1", world.gw1.port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(hello), 37):
            s.sendall(hello[i : i + 37])
            time.sleep(0.002)
        # api's sidecar answers the hello (ServerHello, a TLS handshake record).
        assert s.recv(5)[:1] == b"\x16"


def test_no_healthy_endpoint_and_an_unreachable_one_are_refused(world):
    dead = free_port()
    assert world.push_gw1(local={"web": [], "db": [dead]}, remote={"dc2": [world.gw2.port]}) == {
        "ack": world.gw1_version
    }
    before = world.gw1.refused("no_healthy_endpoint")
    assert _raw(world.gw1.port, client_hello(sni("web", "dc1"))) == b""
    assert _grew(world.gw1, "no_healthy_endpoint", before)
    before = world.gw1.refused("unreachable")
    assert _raw(world.gw1.port, client_hello(sni("db", "dc1"))) == b""
    assert _grew(world.gw1, "unreachable", before)
    assert ask(world.up, b"still") == b"api-in-dc2"  # the other routes are unchanged


def test_a_bad_config_is_nacked_and_the_last_good_one_stays(world):
    reply = world.gw1.push({"version": 99, "routes": [{"sni": "x"}]})
    assert "nack" in reply and "config" in reply["error"]
    assert ask(world.up, b"after a nack") == b"api-in-dc2"


def test_losing_the_agent_keeps_the_last_routing_table(world):
    world.gw1.agent.stop()
    world.gw2.agent.stop()
    try:
        wait_until(
            lambda: world.gw1.metrics().get("mesh_gateway_control_connected") == 0, timeout=15
        )
        for _ in range(5):
            assert ask(world.up, b"static") == b"api-in-dc2"
    finally:
        world.gw1.agent.start()
        world.gw2.agent.start()
    # It reconnects by itself and takes new configs again.
    assert world.push_gw1() == {"ack": world.gw1_version}


def test_a_local_instance_that_stopped_fails_over_through_the_gateways_at_once(world):
    # The local cluster still lists an endpoint whose sidecar is gone (health
    # checks have not said so yet): the connection goes to the failover
    # cluster, in the other datacenter through both gateways, without failing.
    local = Cluster(
        name="api.default.dc1",
        service="api",
        datacenter="dc1",
        spiffe_id=spiffe("api"),
        sni=sni("api", "dc1"),
        endpoints=(Endpoint("127.0.0.1", free_port()),),
        failover=(world.remote.name,),
    )
    try:
        assert world.push_web((local, world.remote)) == {"ack": world.web_version}
        for _ in range(5):
            assert ask(world.up, b"failover") == b"api-in-dc2"
    finally:
        assert world.push_web((world.remote,)) == {"ack": world.web_version}
