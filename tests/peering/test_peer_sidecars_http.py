"""The HTTP listener of a sidecar that trusts a peer's roots holds the same line
as the L4 one: the peer's CA may vouch for the peer's own identities only, and
the peer's callers are decided by intentions naming the peer, per request too."""

from __future__ import annotations

import http.client
import ssl

import pytest

from meshproto.proxycfg import Inbound, PeerTrust, ProxyConfig
from tests.peering.test_peer_sidecars import TD_A, TD_B, sid
from tests.proxy.http_support import HttpApp
from tests.proxy.support import SidecarProcess, TestCA, free_port, wait_until

pytestmark = pytest.mark.slow

PEER_WEB_L7 = {
    "SourceName": "web",
    "SourcePeer": "cluster-b",
    "DestinationName": "api",
    "Permissions": [
        {"Action": "allow", "HTTP": {"PathPrefix": "/public"}},
        {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
    ],
}
LOCAL_WEB = {"SourceName": "web", "DestinationName": "api", "Action": "allow"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peer-http")
    ca_a, ca_b = TestCA("Cluster A CA", TD_A), TestCA("Cluster B CA", TD_B)
    app = HttpApp("api-in-a")
    api = SidecarProcess(tmp, "api-sidecar-proxy")
    port = free_port()
    cert, key = ca_a.leaf("api")
    config = ProxyConfig(
        version=1,
        proxy_id="api-sidecar-proxy",
        service="api",
        service_id="api",
        node="n1",
        datacenter="dc1",
        trust_domain=TD_A,
        spiffe_id=sid("api", TD_A),
        inbound=Inbound("127.0.0.1", port, "127.0.0.1", app.port, protocol="http"),
        intentions=(PEER_WEB_L7, LOCAL_WEB),
        peer_trust=(PeerTrust("cluster-b", TD_B, (ca_b.root_pem,)),),
    ).to_json()
    assert api.push({"config": config, "cert": cert, "key": key, "roots": [ca_a.root_pem]})["ack"]
    try:
        yield {"ca_a": ca_a, "ca_b": ca_b, "api": api, "port": port, "tmp": tmp}
    finally:
        api.stop()
        app.close()


def _get(world, cert_key: tuple[str, str], path: str) -> int | None:
    """The status of `GET path` sent over mTLS with `cert_key`; None if refused."""
    tmp = world["tmp"]
    (tmp / "c.pem").write_text(cert_key[0])
    (tmp / "k.pem").write_text(cert_key[1])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=world["ca_a"].root_pem)
    ctx.load_cert_chain(str(tmp / "c.pem"), str(tmp / "k.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", world["port"], context=ctx, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def test_the_peers_web_is_decided_per_request_by_the_intention_naming_the_peer(world):
    genuine = world["ca_b"].leaf("web")
    assert _get(world, genuine, "/public/x") == 200
    # The peer's intention denies /admin; the local `web` allow does not apply to it.
    assert _get(world, genuine, "/admin") == 403


def test_the_peers_ca_cannot_vouch_for_one_of_our_identities_over_http(world):
    # B's CA minting A's own `web`: the chain verifies (B's root is loaded) and
    # a local intention allows `web`, yet the connection is refused.
    forged = world["ca_b"].leaf(uris=(sid("web", TD_A),))
    assert _get(world, forged, "/admin") is None
    wait_until(
        lambda: (
            world["api"].metric(
                'mesh_sidecar_tls_handshake_failures_total{direction="inbound",reason="wrong_issuer_for_trust_domain"}'
            )
            >= 1
        ),
        what="the forged identity counted as a wrong issuer",
    )
    # A's own CA for the same identity: the local intention lets it in.
    assert _get(world, world["ca_a"].leaf("web"), "/admin") == 200
