"""The pure translation of `DestinationPeer` upstreams (no database): which
path a peered cluster is reached by, what identity is expected, and what a
sidecar trusts."""

from __future__ import annotations

import dataclasses

from registry.domain import proxycfg
from tests.registry.test_proxycfg import gateway, snapshot

TD_A = "aaaaaaaa-0000-4000-8000-00000000000a.mesh"
PEER_UP = {"DestinationName": "api", "DestinationPeer": "cluster-a", "LocalBindPort": 9191}
IMPORTED = {
    "SpiffeID": f"spiffe://{TD_A}/ns/default/dc/dc1/svc/api",
    "SNI": f"api.default.dc1.internal.{TD_A}",
    "Datacenter": "dc1",
    "Gateways": [{"Address": "198.51.100.7", "Port": 8443}],
    "Endpoints": [{"Address": "10.9.0.2", "Port": 21001}],
}
LOCAL_GW = gateway("gw-1", "10.0.0.3", "203.0.113.3", 8443, "dc1")
ROOT_A = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n"


def peered(upstream=PEER_UP, imported=IMPORTED, config=None, gateways=None):
    snap = snapshot([], config=config or {}, gateways=gateways or {})
    proxy = dict(snap.proxy)
    proxy["Proxy"] = {**proxy["Proxy"], "Upstreams": [upstream]}
    return dataclasses.replace(
        snap,
        proxy=proxy,
        peered={("cluster-a", "api"): imported} if imported else {},
        peer_trust=(("cluster-a", TD_A, (ROOT_A,)),),
    )


def only_cluster(snap):
    config = proxycfg.build_proxy_config(snap)
    (up,) = config.upstreams
    assert up.peer == "cluster-a" and up.local_bind_port == 9191
    return config, up.clusters[0] if up.clusters else None


def test_by_default_the_peers_gateways_are_dialled_with_its_sni_and_identity():
    config, cluster = only_cluster(peered())
    assert cluster.spiffe_id == IMPORTED["SpiffeID"] and cluster.sni == IMPORTED["SNI"]
    assert [(e.address, e.port) for e in cluster.endpoints] == [("198.51.100.7", 8443)]
    assert cluster.peer == "cluster-a"
    assert [(t.peer, t.trust_domain, t.roots) for t in config.peer_trust] == [
        ("cluster-a", TD_A, (ROOT_A,))
    ]


def test_mode_local_from_proxy_defaults_leaves_through_the_local_gateway():
    config = {"proxy-defaults": {"global": {"MeshGateway": {"Mode": "local"}}}}
    _, cluster = only_cluster(peered(config=config, gateways={"dc1": (LOCAL_GW,)}))
    assert [(e.address, e.port) for e in cluster.endpoints] == [("10.0.0.3", 8443)]
    assert cluster.gateway is not None and cluster.gateway.address == "10.0.0.3"
    # The upstream's own mode wins over proxy-defaults.
    up = {**PEER_UP, "MeshGateway": {"Mode": "remote"}}
    _, cluster = only_cluster(peered(up, config=config, gateways={"dc1": (LOCAL_GW,)}))
    assert [(e.address, e.port) for e in cluster.endpoints] == [("198.51.100.7", 8443)]


def test_mode_local_without_a_local_gateway_goes_to_the_peers_gateways():
    config = {"proxy-defaults": {"global": {"MeshGateway": {"Mode": "local"}}}}
    _, cluster = only_cluster(peered(config=config))
    assert [(e.address, e.port) for e in cluster.endpoints] == [("198.51.100.7", 8443)]


def test_a_peer_without_gateways_is_dialled_at_its_sidecars():
    _, cluster = only_cluster(peered(imported={**IMPORTED, "Gateways": []}))
    assert [(e.address, e.port) for e in cluster.endpoints] == [("10.9.0.2", 21001)]
    assert cluster.gateway is None


def test_a_service_not_imported_keeps_its_listener_with_no_cluster():
    _, cluster = only_cluster(peered(imported=None))
    assert cluster is None


def test_the_peering_topics_name_the_imported_service():
    topics = proxycfg.peering_topics(peered())
    assert "peered-service:cluster-a/api" in topics and "peering:cluster-a" in topics
