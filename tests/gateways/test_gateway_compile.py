"""The control plane compiles a mesh gateway's routing table (`compile_gateway`)
from the catalog, and the config stream serves it like a sidecar's config."""

from __future__ import annotations

import pytest

from meshproto.gatewaycfg import GatewayConfig
from meshproto.proxycfg import ProxyConfig
from registry import topics as topic
from registry.domain import config_entries, connect_ca, intentions, node_sync, proxycfg
from tests.registry.test_proxycfg import reg, register_app, set_app_status


def register_gateway(node: str, address: str, dc: str, wan: str, port: int = 8443) -> None:
    reg(
        {
            "Node": node,
            "Address": address,
            "Datacenter": dc,
            "Service": {
                "ID": "mesh-gateway",
                "Service": "mesh-gateway",
                "Kind": "mesh-gateway",
                "Port": port,
                "Address": address,
                "TaggedAddresses": {"wan": {"Address": wan, "Port": port}},
            },
        }
    )


@pytest.fixture
def mesh(db, settings):
    settings.MESH_ACL_ENABLED = False
    intentions.reset_caches()
    proxycfg.forget_shared_reads()
    register_app("web", "host-a", "10.0.0.10", port=8080)
    register_app("api", "host-b", "10.0.0.11", port=9091)
    register_gateway("gw-1", "10.0.0.2", "dc1", "192.0.2.1")
    register_gateway("gw-2", "10.1.0.2", "dc2", "198.51.100.2")
    yield
    intentions.reset_caches()
    proxycfg.forget_shared_reads()


def _routes(config: GatewayConfig) -> dict[str, list[str]]:
    return {r.sni: [f"{e.address}:{e.port}" for e in r.endpoints] for r in config.routes}


def test_a_gateway_routes_local_services_to_their_sidecars_and_other_dcs_to_their_gateways(mesh):
    config, topics = proxycfg.compile_gateway("gw-1", "mesh-gateway")
    td = connect_ca.trust_domain()
    assert isinstance(config, GatewayConfig)
    assert (config.datacenter, config.port, config.trust_domain) == ("dc1", 8443, td)
    # It listens on its LAN and its WAN address.
    assert config.listen_addresses() == [("10.0.0.2", 8443), ("192.0.2.1", 8443)]
    assert _routes(config) == {
        f"api.default.dc1.internal.{td}": ["10.0.0.11:21000"],
        f"web.default.dc1.internal.{td}": ["10.0.0.10:21000"],
    }
    assert [(d.datacenter, d.sni_suffix) for d in config.datacenters] == [
        ("dc2", f".dc2.internal.{td}")
    ]
    # The remote gateway by its WAN address.
    assert [(e.address, e.port) for e in config.datacenters[0].gateways] == [("198.51.100.2", 8443)]
    assert {topic.SERVICES, topic.CHECKS, topic.node("gw-1")} <= topics
    assert config.version > 0


def test_an_unhealthy_service_keeps_its_route_without_endpoints(mesh):
    set_app_status("host-b", "api", "critical")
    config, _ = proxycfg.compile_gateway("gw-1", "mesh-gateway")
    td = connect_ca.trust_domain()
    assert _routes(config)[f"api.default.dc1.internal.{td}"] == []


def test_resolver_subsets_get_their_own_sni(mesh):
    register_app("api", "host-c", "10.0.0.12", port=9091)
    from registry.models import ServiceInstance

    ServiceInstance.objects.filter(node__name="host-c", service_id="api-sidecar-proxy").update(
        meta={"version": "2"}
    )
    config_entries.write(
        config_entries.decode(
            {
                "Kind": "service-resolver",
                "Name": "api",
                "Subsets": {"v2": {"Filter": 'Service.Meta.version == "2"'}},
            }
        )
    )
    config, topics = proxycfg.compile_gateway("gw-1", "mesh-gateway")
    td = connect_ca.trust_domain()
    routes = _routes(config)
    assert routes[f"v2.api.default.dc1.internal.{td}"] == ["10.0.0.12:21000"]
    assert sorted(routes[f"api.default.dc1.internal.{td}"]) == [
        "10.0.0.11:21000",
        "10.0.0.12:21000",
    ]
    assert topic.config_kind("service-resolver") in topics


def test_the_config_stream_compiles_gateways_and_sidecars_alike(mesh):
    assert node_sync.node_proxies("gw-1") == ["mesh-gateway"]
    config, _ = proxycfg.compile_proxy("gw-1", "mesh-gateway")
    assert isinstance(config, GatewayConfig)
    both = proxycfg.compile_proxies([("gw-2", "mesh-gateway"), ("host-a", "web-sidecar-proxy")])
    assert isinstance(both[0][0], GatewayConfig) and both[0][0].datacenter == "dc2"
    assert isinstance(both[1][0], ProxyConfig)
    # dc2's table: no local service yet, dc1 reachable through its gateway.
    assert both[0][0].routes == ()
    assert [d.datacenter for d in both[0][0].datacenters] == ["dc1"]
    # The JSON the stream sends round-trips.
    assert GatewayConfig.loads(both[0][0].dumps()) == both[0][0]


def test_a_remote_gateway_registered_later_bumps_the_version(mesh):
    before, topics = proxycfg.compile_gateway("gw-1", "mesh-gateway")
    register_gateway("gw-3", "10.2.0.2", "dc3", "203.0.113.3")
    after, _ = proxycfg.compile_gateway("gw-1", "mesh-gateway")
    assert after.version > before.version
    assert [d.datacenter for d in after.datacenters] == ["dc2", "dc3"]


# --------------------------------------------------------------------------- modes


def _web_calls_api_in_dc2(upstream_mode: str = "") -> None:
    """web's sidecar (dc1) with an upstream to api in dc2, and api's sidecar in dc2."""
    upstream = {"DestinationName": "api", "Datacenter": "dc2", "LocalBindPort": 9191}
    if upstream_mode:
        upstream["MeshGateway"] = {"Mode": upstream_mode}
    register_app("web", "host-a", "10.0.0.10", port=8080, upstreams=[upstream])
    reg(
        {
            "Node": "dc2-host",
            "Address": "10.1.0.11",
            "Datacenter": "dc2",
            "Service": {
                "ID": "api-sidecar-proxy",
                "Service": "api-sidecar-proxy",
                "Kind": "connect-proxy",
                "Port": 21000,
                "Proxy": {"DestinationServiceName": "api"},
            },
        }
    )


def _path() -> tuple[str, list[str]]:
    config, _ = proxycfg.compile_proxy("host-a", "web-sidecar-proxy")
    cluster = config.upstreams[0].clusters[0]
    assert cluster.sni == f"api.default.dc2.internal.{config.trust_domain}"
    via = f"{cluster.gateway.address}:{cluster.gateway.port}" if cluster.gateway else "direct"
    return via, [f"{e.address}:{e.port}" for e in cluster.endpoints]


def _entry(raw: dict) -> None:
    config_entries.write(config_entries.decode(raw))


def test_mesh_gateway_modes_are_compiled_into_the_sidecars_clusters(mesh):
    _web_calls_api_in_dc2()
    # No mode: the remote datacenter's gateway (WAN address).
    assert _path() == ("198.51.100.2:8443", ["198.51.100.2:8443"])
    _entry({"Kind": "proxy-defaults", "Name": "global", "MeshGateway": {"Mode": "local"}})
    # local: our own datacenter's gateway (LAN address), which forwards to dc2's.
    assert _path() == ("10.0.0.2:8443", ["10.0.0.2:8443"])
    _entry({"Kind": "service-defaults", "Name": "api", "MeshGateway": {"Mode": "none"}})
    # none (service-defaults beat proxy-defaults): straight to api's sidecar.
    assert _path() == ("direct", ["10.1.0.11:21000"])
    _entry({"Kind": "service-defaults", "Name": "api", "MeshGateway": {"Mode": "remote"}})
    assert _path() == ("198.51.100.2:8443", ["198.51.100.2:8443"])


def test_an_upstreams_own_mode_wins(mesh):
    _web_calls_api_in_dc2(upstream_mode="local")
    _entry({"Kind": "proxy-defaults", "Name": "global", "MeshGateway": {"Mode": "remote"}})
    assert _path() == ("10.0.0.2:8443", ["10.0.0.2:8443"])


def test_an_unknown_gateway_or_a_sidecar_is_not_a_gateway(mesh):
    from registry.errors import NotFound

    with pytest.raises(NotFound, match='No mesh-gateway "mesh-gateway" on node "nowhere"'):
        proxycfg.compile_gateway("nowhere", "mesh-gateway")
    with pytest.raises(NotFound, match='No mesh-gateway "web-sidecar-proxy"'):
        proxycfg.compile_gateway("host-a", "web-sidecar-proxy")
