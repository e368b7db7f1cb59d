"""Real `mesh-sidecar` processes of two peered clusters, each with its own CA
and trust domain: B's `web` calls A's `api` only when A's sidecar trusts B's
roots and an intention names the peer; B's CA can never vouch for one of A's
own identities."""

from __future__ import annotations

import socket
import ssl

import pytest

from meshproto.proxycfg import (
    Cluster,
    Endpoint,
    Inbound,
    PeerTrust,
    ProxyConfig,
    Route,
    RouteMatch,
    Upstream,
    WeightedCluster,
)
from tests.proxy.support import (
    App,
    SidecarProcess,
    TestCA,
    free_port,
    refused,
    roundtrip,
    wait_until,
)

pytestmark = pytest.mark.slow

TD_A = "aaaaaaaa-0000-4000-8000-00000000000a.mesh"
TD_B = "bbbbbbbb-0000-4000-8000-00000000000b.mesh"


def sid(service: str, td: str) -> str:
    return f"spiffe://{td}/ns/default/dc/dc1/svc/{service}"


def config(service, td, *, version, inbound, app_port, upstreams=(), intentions=(), trust=()):
    return ProxyConfig(
        version=version,
        proxy_id=f"{service}-sidecar-proxy",
        service=service,
        service_id=service,
        node="n1",
        datacenter="dc1",
        trust_domain=td,
        spiffe_id=sid(service, td),
        inbound=Inbound("127.0.0.1", inbound, "127.0.0.1", app_port),
        upstreams=upstreams,
        intentions=intentions,
        peer_trust=trust,
    ).to_json()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peer-sidecars")
    ca_a, ca_b = TestCA("Cluster A CA", TD_A), TestCA("Cluster B CA", TD_B)
    app = App("name", name="api-in-a")
    api = SidecarProcess(tmp, "api-sidecar-proxy")
    web = SidecarProcess(tmp, "web-sidecar-proxy")
    ports = {"api_in": free_port(), "web_in": free_port(), "up": free_port()}
    state = {"api": 0, "web": 0}

    def push_api(intentions, trust):
        state["api"] += 1
        cert, key = ca_a.leaf("api")
        msg = {
            "config": config(
                "api",
                TD_A,
                version=state["api"],
                inbound=ports["api_in"],
                app_port=app.port,
                intentions=intentions,
                trust=trust,
            ),
            "cert": cert,
            "key": key,
            "roots": [ca_a.root_pem],
        }
        return api.push(msg)

    def push_web():
        state["web"] += 1
        name = "api.default.cluster-a.peer"
        cluster = Cluster(
            name=name,
            service="api",
            datacenter="dc1",
            spiffe_id=sid("api", TD_A),
            sni=f"api.default.dc1.internal.{TD_A}",
            endpoints=(Endpoint("127.0.0.1", ports["api_in"]),),
            connect_timeout_s=2.0,
            peer="cluster-a",
        )
        up = Upstream(
            "api",
            "127.0.0.1",
            ports["up"],
            "tcp",
            peer="cluster-a",
            routes=(Route(RouteMatch(), (WeightedCluster(name, 100.0),)),),
            clusters=(cluster,),
        )
        cert, key = ca_b.leaf("web")
        msg = {
            "config": config(
                "web",
                TD_B,
                version=state["web"],
                inbound=ports["web_in"],
                app_port=1,
                upstreams=(up,),
                trust=(PeerTrust("cluster-a", TD_A, (ca_a.root_pem,)),),
            ),
            "cert": cert,
            "key": key,
            "roots": [ca_b.root_pem],
        }
        return web.push(msg)

    try:
        yield {
            "ca_a": ca_a,
            "ca_b": ca_b,
            "api": api,
            "web": web,
            "ports": ports,
            "push_api": push_api,
            "push_web": push_web,
            "tmp": tmp,
        }
    finally:
        web.stop()
        api.stop()
        app.close()


PEER_B = lambda w: (PeerTrust("cluster-b", TD_B, (w["ca_b"].root_pem,)),)  # noqa: E731
ALLOW_PEER_WEB = {
    "SourceName": "web",
    "SourcePeer": "cluster-b",
    "DestinationName": "api",
    "Action": "allow",
}
ALLOW_LOCAL_WEB = {"SourceName": "web", "DestinationName": "api", "Action": "allow"}


def test_a_peer_intention_lets_the_peers_web_call_api(world):
    assert world["push_api"]((ALLOW_PEER_WEB,), PEER_B(world))["ack"] >= 1
    assert world["push_web"]()["ack"] >= 1
    assert roundtrip(world["ports"]["up"]) == b"api-in-a"


def test_without_an_intention_naming_the_peer_the_call_is_refused(world):
    # A local intention for a service called `web` does not cover the peer's `web`.
    world["push_api"]((ALLOW_LOCAL_WEB,), PEER_B(world))
    assert refused(world["ports"]["up"])
    wait_until(
        lambda: any(
            "peer:cluster-b/web" in str(line.get("reason", "")) for line in world["api"].logs()
        ),
        what="api's sidecar logs the refusal naming the peer's source",
    )
    world["push_api"]((ALLOW_PEER_WEB,), PEER_B(world))
    assert roundtrip(world["ports"]["up"]) == b"api-in-a"


def test_without_the_peers_trust_the_handshake_fails(world):
    world["push_api"]((ALLOW_PEER_WEB,), ())  # the peering was deleted: no trust
    assert refused(world["ports"]["up"])
    world["push_api"]((ALLOW_PEER_WEB,), PEER_B(world))
    assert roundtrip(world["ports"]["up"]) == b"api-in-a"


def _tls_call(world, cert_key: tuple[str, str]) -> bytes:
    tmp = world["tmp"]
    cert_path, key_path = tmp / "c.pem", tmp / "k.pem"
    cert_path.write_text(cert_key[0])
    key_path.write_text(cert_key[1])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=world["ca_a"].root_pem)
    ctx.load_cert_chain(str(cert_path), str(key_path))
    raw = socket.create_connection(("127.0.0.1", world["ports"]["api_in"]), timeout=5)
    with ctx.wrap_socket(raw) as s:
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (ssl.SSLError, ConnectionResetError):
            pass
        return data


def test_the_peers_ca_cannot_vouch_for_one_of_our_identities(world):
    world["push_api"]((ALLOW_PEER_WEB, ALLOW_LOCAL_WEB), PEER_B(world))
    # A genuine B identity, presented directly: allowed (the peer intention).
    assert _tls_call(world, world["ca_b"].leaf("web")) == b"api-in-a"
    # B's CA minting an identity of A's own trust domain: refused, although
    # the chain verifies (B's root is loaded) and a local intention allows `web`.
    forged = world["ca_b"].leaf(uris=(sid("web", TD_A),))
    assert _tls_call(world, forged) == b""
    wait_until(
        lambda: (
            world["api"].metric(
                'mesh_sidecar_tls_handshake_failures_total{direction="inbound",reason="wrong_issuer_for_trust_domain"}'
            )
            >= 1
        ),
        what="the forged identity counted as a wrong issuer",
    )
    # A's own CA for the same identity: allowed.
    assert _tls_call(world, world["ca_a"].leaf("web")) == b"api-in-a"
