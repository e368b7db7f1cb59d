"""The compiled proxy config (registry.domain.proxycfg): what one sidecar enforces.

Three layers, as the code:

* translate (pure): snapshots built here are translated and compared with
  `tests/golden/proxycfg/<case>.json`. After a deliberate change of the
  translation, regenerate with `MESH_UPDATE_GOLDEN=1 pytest
  tests/registry/test_proxycfg.py` and review the diff;
* gather + compile on the database (`db`): every kind of change shows up with
  a higher version, and the topics name what the config depends on;
* HTTP and CLI against a real `mesh server` (marked slow).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from meshproto.config_entries import decode_entry
from meshproto.intentions import IntentionIndex, from_consul_json
from meshproto.proxycfg import ProxyConfig
from registry import decode
from registry import topics as topic
from registry.acl_rules import Authorizer
from registry.domain import catalog, connect_ca, intentions, proxycfg
from registry.domain import config_entries as config_entries_domain
from registry.domain.proxycfg import Candidate, ProxySnapshot
from registry.errors import NotFound
from tests.support.servers import ROOT

GOLDEN = Path(__file__).parent.parent / "golden" / "proxycfg"
TD = "7f3c2a10-5b7e-4c3d-9a1e-2b4c6d8e0f12.mesh"
ROOT_NEW = "-----BEGIN CERTIFICATE-----\nTkVXIFJPT1Q=\n-----END CERTIFICATE-----\n"
ROOT_OLD = "-----BEGIN CERTIFICATE-----\nT0xEIFJPT1Q=\n-----END CERTIFICATE-----\n"


# =========================================================================== snapshot builders


def entries(*raw: dict) -> dict:
    out: dict = {}
    for r in raw:
        e = decode_entry(r)
        out.setdefault(e["Kind"], {})[e["Name"]] = {
            k: v for k, v in e.items() if k not in ("Kind", "Name")
        }
    return out


def node_json(name: str, address: str, dc: str = "dc1", wan: str = "") -> dict:
    return {
        "ID": "",
        "Node": name,
        "Address": address,
        "Datacenter": dc,
        "TaggedAddresses": {"lan": address, "wan": wan or address},
        "Meta": {},
    }


def check(check_id: str, status: str) -> dict:
    return {"CheckID": check_id, "Name": check_id, "Status": status}


def sidecar(
    service: str,
    node: str,
    address: str,
    *,
    dc: str = "dc1",
    status: str = "passing",
    app_status: str = "passing",
    meta: dict | None = None,
    weights: dict | None = None,
    wan: str = "",
    port: int = 21000,
) -> Candidate:
    """One sidecar of `service` as gather reads it: its CheckServiceNode JSON
    (node check, sidecar check) and the checks of the app instance it fronts."""
    proxy_id = f"{service}-sidecar-proxy"
    entry = {
        "Node": node_json(node, address, dc, wan),
        "Service": {
            "ID": proxy_id,
            "Service": proxy_id,
            "Kind": "connect-proxy",
            "Tags": [],
            "Address": "",
            "TaggedAddresses": {},
            "Meta": meta or {},
            "Port": port,
            "Weights": weights or {"Passing": 1, "Warning": 1},
            "Datacenter": dc,
            "Namespace": "default",
            "Proxy": {"DestinationServiceName": service, "DestinationServiceID": service},
        },
        "Checks": [check("serfHealth", "passing"), check(f"service:{proxy_id}:1", status)],
    }
    return Candidate(entry=entry, destination_checks=(check(f"service:{service}", app_status),))


def gateway(node: str, address: str, wan_address: str, wan_port: int, dc: str) -> Candidate:
    entry = {
        "Node": node_json(node, address, dc),
        "Service": {
            "ID": "mesh-gateway",
            "Service": "mesh-gateway",
            "Kind": "mesh-gateway",
            "Address": address,
            "TaggedAddresses": {
                "lan": {"Address": address, "Port": 8443},
                "wan": {"Address": wan_address, "Port": wan_port},
            },
            "Meta": {},
            "Port": 8443,
            "Weights": {"Passing": 1, "Warning": 1},
        },
        "Checks": [check("serfHealth", "passing")],
    }
    return Candidate(entry=entry)


def proxy_json(service: str, upstreams: list[dict], *, port: int = 21000, app_port: int = 8080):
    return {
        "ID": f"{service}-sidecar-proxy",
        "Service": f"{service}-sidecar-proxy",
        "Kind": "connect-proxy",
        "Address": "",
        "Port": port,
        "Namespace": "default",
        "Proxy": {
            "DestinationServiceName": service,
            "DestinationServiceID": service,
            "LocalServiceAddress": "127.0.0.1",
            "LocalServicePort": app_port,
            "Upstreams": upstreams,
        },
    }


def intention(source: str, destination: str, action: str = "", **extra: Any) -> dict:
    """Consul's JSON of one intention (as `intentions.intention_json` makes it)."""
    from meshproto.intentions import precedence

    out = {
        "ID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{source}->{destination}")),
        "Description": "",
        "SourceNS": "default",
        "SourceName": source,
        "DestinationNS": "default",
        "DestinationName": destination,
        "SourceType": "consul",
        "Action": action,
        **extra,
        "Meta": {},
        "Precedence": precedence("default", source, "default", destination),
    }
    return out


def snapshot(
    upstreams: list[dict],
    instances: dict[tuple[str, str], tuple[Candidate, ...]] | None = None,
    *,
    config: dict | None = None,
    gateways: dict[str, tuple[Candidate, ...]] | None = None,
    ixns: tuple[dict, ...] = (),
    allow_by_default: bool = False,
    service: str = "web",
) -> ProxySnapshot:
    """A snapshot as `gather` would read it, from plain test data: chains are
    compiled by the same pure planner gather uses; `instances` are keyed by
    (service, datacenter)."""
    config = config or {}
    proxy = proxy_json(service, upstreams)
    planned = [proxycfg.plan_upstream(service, proxy, u, "dc1", TD, config) for u in upstreams]
    filled = []
    for us in planned:
        by_target = {
            tid: (instances or {}).get((svc, dc), ()) for tid, svc, dc in proxycfg.chain_targets(us)
        }
        filled.append(dataclasses.replace(us, instances=by_target))
    return ProxySnapshot(
        datacenter="dc1",
        trust_domain=TD,
        node=node_json("host-a", "10.0.0.10"),
        proxy=proxy,
        destination={"ID": service, "Service": service, "Port": 8080},
        roots=(ROOT_NEW, ROOT_OLD),
        intentions=ixns,
        allow_by_default=allow_by_default,
        entries=config,
        upstreams=tuple(filled),
        gateways=gateways or {},
        version=42,
    )


# =========================================================================== golden cases

HTTP_GLOBAL = {"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}}


def case_tcp_upstream() -> ProxySnapshot:
    """(a) web -> api over TCP: two healthy instances (one warning), one whose app is critical."""
    return snapshot(
        [{"DestinationName": "api", "LocalBindPort": 9191}],
        {
            ("api", "dc1"): (
                sidecar("api", "host-b", "10.0.0.11"),
                sidecar(
                    "api",
                    "host-c",
                    "10.0.0.12",
                    status="warning",
                    weights={"Passing": 3, "Warning": 1},
                ),
                sidecar("api", "host-d", "10.0.0.13", app_status="critical"),
            )
        },
    )


def case_http_router_splitter_subsets() -> ProxySnapshot:
    """(b) router (canary header -> v2) -> splitter 90/10 -> resolver subsets v1/v2 by
    Service.Meta.version; web's service-defaults limit api and set an inbound rate limit."""
    config = entries(
        HTTP_GLOBAL,
        {
            "Kind": "service-resolver",
            "Name": "api",
            "ConnectTimeout": "3s",
            "Subsets": {
                "v1": {"Filter": 'Service.Meta.version == "1"'},
                "v2": {"Filter": 'Service.Meta.version == "2"', "OnlyPassing": True},
            },
            "LoadBalancer": {"Policy": "least_request"},
        },
        {
            "Kind": "service-splitter",
            "Name": "api",
            "Splits": [
                {"Weight": 90, "ServiceSubset": "v1"},
                {"Weight": 10, "ServiceSubset": "v2"},
            ],
        },
        {
            "Kind": "service-router",
            "Name": "api",
            "Routes": [
                {
                    "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Present": True}]}},
                    "Destination": {
                        "ServiceSubset": "v2",
                        "NumRetries": 2,
                        "RetryOnConnectFailure": True,
                        "RequestHeaders": {"Set": {"x-routed": "canary"}},
                    },
                },
                {
                    "Match": {"HTTP": {"PathPrefix": "/admin", "Methods": ["GET", "post"]}},
                    "Destination": {
                        "ServiceSubset": "v1",
                        "PrefixRewrite": "/",
                        "RequestTimeout": "15s",
                    },
                },
            ],
        },
        {
            "Kind": "service-defaults",
            "Name": "web",
            "MaxInboundConnections": 512,
            "RateLimits": {"InstanceLevel": {"RequestsPerSecond": 100, "RequestsMaxBurst": 20}},
            "UpstreamConfig": {
                "Defaults": {"ConnectTimeoutMs": 4000},
                "Overrides": [
                    {
                        "Name": "api",
                        "Limits": {"MaxConnections": 100, "MaxPendingRequests": 10},
                        "PassiveHealthCheck": {"Interval": "5s", "MaxFailures": 3},
                    }
                ],
            },
        },
    )
    return snapshot(
        [{"DestinationName": "api", "LocalBindPort": 9191}],
        {
            ("api", "dc1"): (
                sidecar("api", "host-b", "10.0.0.11", meta={"version": "1"}),
                sidecar("api", "host-c", "10.0.0.12", meta={"version": "1"}),
                sidecar("api", "host-d", "10.0.0.13", meta={"version": "2"}),
                # v2 takes passing instances only: this warning one is left out.
                sidecar("api", "host-e", "10.0.0.14", meta={"version": "2"}, status="warning"),
            )
        },
        config=config,
    )


def case_failover_through_mesh_gateway() -> ProxySnapshot:
    """(c) api fails over to dc2, reached through dc2's mesh gateway; db lives in
    dc2 and is dialled directly (MeshGateway mode none) at its WAN address."""
    config = entries(
        {
            "Kind": "service-resolver",
            "Name": "api",
            "Failover": {"*": {"Datacenters": ["dc2"]}},
        },
    )
    return snapshot(
        [
            {"DestinationName": "api", "LocalBindPort": 9191},
            {
                "DestinationName": "db",
                "Datacenter": "dc2",
                "LocalBindAddress": "127.0.0.2",
                "LocalBindPort": 5432,
                "MeshGateway": {"Mode": "none"},
            },
        ],
        {
            ("api", "dc1"): (sidecar("api", "host-b", "10.0.0.11", app_status="critical"),),
            ("api", "dc2"): (sidecar("api", "dc2-host-a", "10.1.0.11", dc="dc2"),),
            ("db", "dc2"): (
                sidecar("db", "dc2-host-b", "10.1.0.12", dc="dc2", wan="203.0.113.12"),
            ),
        },
        config=config,
        gateways={
            "dc1": (),
            "dc2": (gateway("dc2-gw", "10.1.0.2", "198.51.100.2", 443, "dc2"),),
        },
    )


def _intentions_case(allow_by_default: bool) -> ProxySnapshot:
    config = entries({"Kind": "service-defaults", "Name": "web", "Protocol": "http"})
    ixns = (
        intention("api", "web", "allow", Description="api calls web"),
        intention(
            "admin",
            "web",
            Permissions=[
                {"Action": "deny", "HTTP": {"PathPrefix": "/admin/secrets"}},
                {"Action": "allow", "HTTP": {"PathPrefix": "/admin", "Methods": ["GET"]}},
            ],
        ),
        intention("*", "web", "deny"),
    )
    return snapshot([], config=config, ixns=ixns, allow_by_default=allow_by_default)


def case_intentions_default_deny() -> ProxySnapshot:
    """(d) exact allow, an L7 intention, a wildcard deny; default deny."""
    return _intentions_case(False)


def case_intentions_allow_by_default() -> ProxySnapshot:
    """(d) the same intentions with the mesh entry's AllowByDefault."""
    return _intentions_case(True)


CASES = {
    "tcp_upstream": case_tcp_upstream,
    "http_router_splitter_subsets": case_http_router_splitter_subsets,
    "failover_through_mesh_gateway": case_failover_through_mesh_gateway,
    "intentions_default_deny": case_intentions_default_deny,
    "intentions_allow_by_default": case_intentions_allow_by_default,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_translation_matches_its_golden_file(name):
    config = proxycfg.build_proxy_config(CASES[name]())
    got = config.to_json()
    path = GOLDEN / f"{name}.json"
    if os.environ.get("MESH_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=2) + "\n")
    assert got == json.loads(path.read_text())
    assert ProxyConfig.from_json(got) == config  # what the sidecar will load


def test_tcp_upstream_keeps_healthy_and_warning_instances_and_drops_a_critical_app():
    config = proxycfg.build_proxy_config(case_tcp_upstream())
    (up,) = config.upstreams
    assert (up.destination, up.local_bind_address, up.local_bind_port, up.protocol) == (
        "api",
        "127.0.0.1",
        9191,
        "tcp",
    )
    (route,) = up.routes
    assert [(s.cluster, s.weight) for s in route.splits] == [("api.default.dc1", 100.0)]
    (cluster,) = up.clusters
    assert cluster.spiffe_id == f"spiffe://{TD}/ns/default/dc/dc1/svc/api"
    assert cluster.sni == f"api.default.dc1.internal.{TD}"
    assert [(e.address, e.port, e.health, e.weight) for e in cluster.endpoints] == [
        ("10.0.0.11", 21000, "passing", 1),
        ("10.0.0.12", 21000, "warning", 1),
    ]
    assert config.inbound.bind_address == "0.0.0.0"
    assert (config.inbound.local_app_address, config.inbound.local_app_port) == ("127.0.0.1", 8080)
    assert config.roots == (ROOT_NEW, ROOT_OLD)


def test_http_routes_split_90_10_over_subsets_selected_by_meta_version():
    config = proxycfg.build_proxy_config(case_http_router_splitter_subsets())
    (up,) = config.upstreams
    assert up.protocol == "http"
    canary, admin, default = up.routes
    assert canary.match.headers[0].name == "x-canary" and canary.match.headers[0].present
    assert [(s.cluster, s.weight) for s in canary.splits] == [("v2.api.default.dc1", 100.0)]
    assert canary.retry.num_retries == 2 and canary.retry.on_connect_failure
    assert canary.request_headers_set == (("x-routed", "canary"),)
    assert (admin.match.path_prefix, admin.match.methods) == ("/admin", ("GET", "POST"))
    assert (admin.prefix_rewrite, admin.timeout_s) == ("/", 15.0)
    assert default.match.path_prefix == "/"  # the last route catches everything
    assert [(s.cluster, s.weight) for s in default.splits] == [
        ("v1.api.default.dc1", 90.0),
        ("v2.api.default.dc1", 10.0),
    ]
    clusters = {c.name: c for c in up.clusters}
    assert [e.node for e in clusters["v1.api.default.dc1"].endpoints] == ["host-b", "host-c"]
    assert [e.node for e in clusters["v2.api.default.dc1"].endpoints] == ["host-d"]
    v1 = clusters["v1.api.default.dc1"]
    # The registration's ConnectTimeoutMs default overrides the resolver's 3s, as Consul's.
    assert (v1.lb_policy, v1.connect_timeout_s, v1.subset) == ("least_request", 4.0, "v1")
    assert (v1.limits.max_connections, v1.limits.max_pending_requests) == (100, 10)
    assert (v1.outlier.interval_s, v1.outlier.max_failures) == (5.0, 3)
    assert config.inbound.protocol == "http"
    assert (config.inbound.rate_limit.requests_per_second, config.inbound.rate_limit.burst) == (
        100.0,
        20,
    )
    assert config.inbound.limits.max_connections == 512


def test_a_failover_to_another_datacenter_goes_through_its_mesh_gateway():
    config = proxycfg.build_proxy_config(case_failover_through_mesh_gateway())
    api, db = config.upstreams
    local, remote = api.clusters
    assert local.name == "api.default.dc1" and local.endpoints == ()
    assert local.failover == ("api.default.dc2",)
    assert remote.name == "api.default.dc2"
    assert remote.spiffe_id == f"spiffe://{TD}/ns/default/dc/dc2/svc/api"
    assert remote.sni == f"api.default.dc2.internal.{TD}"
    assert (remote.gateway.address, remote.gateway.port) == ("198.51.100.2", 443)
    assert [(e.address, e.port) for e in remote.endpoints] == [("198.51.100.2", 443)]
    (direct,) = db.clusters
    assert direct.gateway is None
    assert [(e.address, e.port) for e in direct.endpoints] == [("203.0.113.12", 21000)]
    assert (db.local_bind_address, db.datacenter) == ("127.0.0.2", "dc2")


@pytest.mark.parametrize(
    ("allow_by_default", "source", "allowed", "l7"),
    [
        (False, "api", True, False),  # exact allow
        (False, "admin", False, True),  # L7: decided per request
        (False, "other", False, False),  # the wildcard deny
        (True, "other", False, False),  # an explicit deny beats the default
        (True, "api", True, False),
    ],
)
def test_the_intentions_in_the_config_decide_as_the_control_plane(
    allow_by_default, source, allowed, l7
):
    config = proxycfg.build_proxy_config(_intentions_case(allow_by_default))
    assert config.default_allow is allow_by_default
    assert [i["Precedence"] for i in config.intentions] == [9, 9, 8]
    index = IntentionIndex(
        (from_consul_json(i) for i in config.intentions), default_allow=config.default_allow
    )
    decision = index.decide(source, "web")
    assert (decision.allowed, decision.has_l7) == (allowed, l7)
    if l7:
        assert index.decide_request(source, "web", "GET", "/admin/users", {}).allowed
        assert not index.decide_request(source, "web", "GET", "/admin/secrets/x", {}).allowed


def test_with_no_intentions_the_default_decides():
    for allow in (False, True):
        config = proxycfg.build_proxy_config(snapshot([], allow_by_default=allow))
        index = IntentionIndex((), default_allow=config.default_allow)
        assert config.intentions == ()
        assert index.decide("anyone", "web").allowed is allow


def test_a_subset_filter_that_cannot_compile_leaves_its_cluster_without_endpoints():
    bad = snapshot(
        [{"DestinationName": "api", "LocalBindPort": 9191}],
        {("api", "dc1"): (sidecar("api", "host-b", "10.0.0.11"),)},
        config=entries(
            {
                "Kind": "service-resolver",
                "Name": "api",
                "DefaultSubset": "v1",
                "Subsets": {"v1": {"Filter": "Service.Meta.version =="}},
            },
        ),
    )
    (cluster,) = proxycfg.build_proxy_config(bad).upstreams[0].clusters
    assert cluster.name == "v1.api.default.dc1" and cluster.endpoints == ()


def test_an_upstream_whose_chain_does_not_compile_keeps_a_listener_without_clusters():
    broken = snapshot(
        [{"DestinationName": "api", "LocalBindPort": 9191}],
        config=entries(
            # api speaks http but its redirect target grpc: inconsistent protocols.
            {"Kind": "service-defaults", "Name": "api", "Protocol": "http"},
            {"Kind": "service-defaults", "Name": "api2", "Protocol": "grpc"},
            {"Kind": "service-resolver", "Name": "api", "Redirect": {"Service": "api2"}},
        ),
    )
    (up,) = proxycfg.build_proxy_config(broken).upstreams
    assert (up.destination, up.local_bind_port, up.clusters, up.routes) == ("api", 9191, (), ())
    assert "inconsistent protocols" in broken.upstreams[0].error


def test_the_registration_config_overrides_service_defaults_for_an_upstream():
    sd = {"UpstreamConfig": {"Defaults": {"Limits": {"MaxConnections": 5}}}}
    upstream = {
        "DestinationName": "api",
        "Config": {
            "connect_timeout_ms": 1500,
            "limits": {"max_connections": 7},
            "envoy_extra": "ignored",
        },
    }
    settings = proxycfg.upstream_settings(
        "web", upstream, proxy_json("web", []), {"service-defaults": {"web": sd}}
    )
    assert settings == {"Limits": {"MaxConnections": 7}, "ConnectTimeoutMs": 1500}
    assert proxycfg.chain_overrides(settings) == {"override_connect_timeout": "1500ms"}


def test_topics_name_the_targets_the_proxy_and_gateways():
    topics = proxycfg.dependency_topics(case_failover_through_mesh_gateway())
    for expected in (
        topic.service("api"),
        topic.connect("api"),
        topic.service("db"),
        topic.connect("db"),
        topic.service("web"),
        topic.service("web-sidecar-proxy"),
        topic.node("host-a"),
        topic.intentions_for("web"),
        topic.intentions_for("*"),
        topic.CA_ROOTS,
        topic.config_entry("mesh", "mesh"),
        # plain entries (not an EntryReads): every chain kind, conservatively
        topic.config_kind("service-defaults"),
        topic.config_kind("proxy-defaults"),
        topic.config_kind("service-resolver"),
        topic.config_kind("service-router"),
        topic.config_kind("service-splitter"),
        topic.NODES,
        topic.SERVICES,
        topic.service("mesh-gateway"),
    ):
        assert expected in topics
    local_only = proxycfg.dependency_topics(case_tcp_upstream())
    assert topic.SERVICES not in local_only and topic.NODES not in local_only


# =========================================================================== gather + compile (db)


def reg(raw: dict) -> None:
    catalog.catalog_register(decode.CATALOG_REGISTER(raw))


def register_app(
    service: str, node: str, address: str, *, port: int, upstreams: list | None = None
) -> None:
    """An app instance and its sidecar, as an agent registers them."""
    reg(
        {
            "Node": node,
            "Address": address,
            "Service": {"ID": service, "Service": service, "Port": port},
            "Check": {
                "CheckID": f"service:{service}",
                "Name": "app",
                "Status": "passing",
                "ServiceID": service,
            },
        }
    )
    reg(
        {
            "Node": node,
            "Address": address,
            "Service": {
                "ID": f"{service}-sidecar-proxy",
                "Service": f"{service}-sidecar-proxy",
                "Kind": "connect-proxy",
                "Port": 21000,
                "Proxy": {
                    "DestinationServiceName": service,
                    "DestinationServiceID": service,
                    "LocalServicePort": port,
                    "Upstreams": upstreams or [],
                },
            },
        }
    )


def set_app_status(node: str, service: str, status: str) -> None:
    from registry.models import Node

    catalog.update_check_status(Node.objects.get(name=node), f"service:{service}", status)


@pytest.fixture
def mesh(db, settings):
    """web on host-a calling api (one instance on host-b)."""
    settings.MESH_ACL_ENABLED = False
    intentions.reset_caches()
    register_app(
        "web",
        "host-a",
        "10.0.0.10",
        port=8080,
        upstreams=[{"DestinationName": "api", "LocalBindPort": 9191}],
    )
    register_app("api", "host-b", "10.0.0.11", port=9091)
    yield
    intentions.reset_caches()


def compiled() -> tuple[ProxyConfig, set[str]]:
    return proxycfg.compile_proxy("host-a", "web-sidecar-proxy")


def endpoints(config: ProxyConfig) -> list[str]:
    return [f"{e.node}:{e.address}" for e in config.upstreams[0].clusters[0].endpoints]


def test_compile_proxy_reads_the_registration_and_the_catalog(mesh):
    config, topics = compiled()
    assert (config.proxy_id, config.service, config.service_id, config.node) == (
        "web-sidecar-proxy",
        "web",
        "web",
        "host-a",
    )
    assert config.trust_domain == connect_ca.trust_domain()
    assert config.spiffe_id == f"spiffe://{config.trust_domain}/ns/default/dc/dc1/svc/web"
    assert (config.inbound.port, config.inbound.local_app_port) == (21000, 8080)
    assert endpoints(config) == ["host-b:10.0.0.11"]
    _index, roots = connect_ca.roots_json()
    active = next(r for r in roots["Roots"] if r["Active"])
    assert config.roots[0] == active["RootCert"]
    assert {
        topic.service("api"),
        topic.connect("api"),
        topic.service("web"),
        topic.node("host-a"),
        topic.CA_ROOTS,
    } <= topics


def test_compile_proxy_refuses_what_is_not_a_sidecar_on_that_node(mesh):
    with pytest.raises(NotFound):
        proxycfg.compile_proxy("host-a", "web")  # the app, not its proxy
    with pytest.raises(NotFound):
        proxycfg.compile_proxy("host-b", "web-sidecar-proxy")  # wrong node
    with pytest.raises(NotFound):
        proxycfg.compile_proxy("nowhere", "web-sidecar-proxy")


def test_a_new_instance_shows_up_with_a_higher_version(mesh):
    before, _ = compiled()
    register_app("api", "host-c", "10.0.0.12", port=9091)
    after, topics = compiled()
    assert after.version > before.version
    assert endpoints(after) == ["host-b:10.0.0.11", "host-c:10.0.0.12"]
    assert topic.connect("api") in topics


def test_a_health_change_of_the_app_removes_and_restores_its_endpoint(mesh):
    register_app("api", "host-c", "10.0.0.12", port=9091)
    first, _ = compiled()
    set_app_status("host-b", "api", "critical")
    down, topics = compiled()
    assert down.version > first.version
    assert endpoints(down) == ["host-c:10.0.0.12"]
    assert topic.service("api") in topics  # what the app's check touches
    set_app_status("host-b", "api", "warning")
    warn, _ = compiled()
    assert warn.version > down.version
    assert [e.health for e in warn.upstreams[0].clusters[0].endpoints] == ["warning", "passing"]


def test_maintenance_mode_takes_an_instance_out(mesh):
    from registry.models import Node

    before, _ = compiled()
    catalog.set_service_maintenance(Node.objects.get(name="host-b"), "api-sidecar-proxy", True)
    after, _ = compiled()
    assert after.version > before.version and endpoints(after) == []


def test_an_intention_change_shows_up_with_a_higher_version(mesh):
    before, topics = compiled()
    assert before.intentions == ()
    assert {topic.intentions_for("web"), topic.intentions_for("*")} <= topics
    assert topic.INTENTIONS not in topics and topic.intentions_for("api") not in topics
    intentions.create(
        Authorizer.management(),
        {"SourceName": "*", "DestinationName": "web", "Action": "deny"},
    )
    intentions.create(
        Authorizer.management(),
        {"SourceName": "api", "DestinationName": "web", "Action": "allow"},
    )
    intentions.create(  # another destination: not this proxy's
        Authorizer.management(),
        {"SourceName": "web", "DestinationName": "api", "Action": "allow"},
    )
    after, _ = compiled()
    assert after.version > before.version
    assert [(i["SourceName"], i["Action"], i["Precedence"]) for i in after.intentions] == [
        ("api", "allow", 9),
        ("*", "deny", 8),
    ]


def test_the_mesh_entry_switches_default_allow(mesh):
    before, topics = compiled()
    assert before.default_allow is False and topic.config_entry("mesh", "mesh") in topics
    config_entries_domain.write(
        config_entries_domain.decode({"Kind": "mesh", "Name": "mesh", "AllowByDefault": True})
    )
    after, _ = compiled()
    assert after.default_allow is True and after.version > before.version


def test_a_config_entry_change_reshapes_the_upstream(mesh):
    before, topics = compiled()
    assert before.upstreams[0].protocol == "tcp"
    # The entries the compile looked up, found or not; not whole kinds.
    assert {
        topic.config_entry("service-defaults", "web"),
        topic.config_entry("service-defaults", "api"),
        topic.config_entry("proxy-defaults", "global"),
        topic.config_entry("service-router", "api"),
        topic.config_entry("service-resolver", "api"),
    } <= topics
    assert not topics & {topic.config_kind(k) for k in ("service-defaults", "service-router")}
    assert topic.DISCOVERY_CHAIN not in topics
    for raw in (
        {"Kind": "service-defaults", "Name": "api", "Protocol": "http"},
        {
            "Kind": "service-resolver",
            "Name": "api",
            "ConnectTimeout": "2s",
            "Subsets": {"v1": {"Filter": 'Service.Meta.version == "1"'}},
        },
        {
            "Kind": "service-router",
            "Name": "api",
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/v1"}},
                    "Destination": {"ServiceSubset": "v1"},
                }
            ],
        },
    ):
        config_entries_domain.write(config_entries_domain.decode(raw))
    after, topics = compiled()
    assert after.version > before.version
    up = after.upstreams[0]
    assert up.protocol == "http"
    assert [r.match.path_prefix for r in up.routes] == ["/v1", "/"]
    assert {c.name: c.connect_timeout_s for c in up.clusters} == {
        "api.default.dc1": 2.0,
        "v1.api.default.dc1": 2.0,
    }
    assert topic.config_entry("service-router", "api") in topics


def test_a_ca_rotation_adds_the_new_root_first(mesh):
    before, _ = compiled()
    connect_ca.rotate()
    after, topics = compiled()
    assert after.version > before.version and topic.CA_ROOTS in topics
    assert len(after.roots) == 2
    assert after.roots[1] == before.roots[0]  # the old root stays trusted, after the new one


def test_a_cross_datacenter_target_uses_a_gateway_registered_later(mesh):
    config_entries_domain.write(
        config_entries_domain.decode(
            {"Kind": "service-resolver", "Name": "api", "Failover": {"*": {"Datacenters": ["dc2"]}}}
        )
    )
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
    direct, topics = compiled()
    remote = direct.upstreams[0].clusters[1]
    assert remote.name == "api.default.dc2" and remote.gateway is None
    assert [e.address for e in remote.endpoints] == ["10.1.0.11"]
    assert {topic.NODES, topic.SERVICES} <= topics
    reg(
        {
            "Node": "dc2-gw",
            "Address": "10.1.0.2",
            "Datacenter": "dc2",
            "Service": {
                "ID": "gw",
                "Service": "mesh-gateway",
                "Kind": "mesh-gateway",
                "Port": 8443,
                "TaggedAddresses": {"wan": {"Address": "198.51.100.2", "Port": 443}},
            },
        }
    )
    via, topics = compiled()
    remote = via.upstreams[0].clusters[1]
    assert via.version > direct.version
    assert (remote.gateway.address, remote.gateway.port) == ("198.51.100.2", 443)
    assert topic.service("mesh-gateway") in topics


def _woken_by_last_write(deps: dict[str, set[str]]) -> set[str]:
    """The proxies whose compile topics the last write touched: the ones the
    change hub wakes (exact topic match) and that then recompile."""
    from registry.models import TopicIndex
    from registry.txn import current_index

    touched = set(TopicIndex.objects.filter(index=current_index()).values_list("topic", flat=True))
    assert touched, "the write touched no topic"
    return {service for service, topics in deps.items() if topics & touched}


def test_a_write_wakes_only_the_proxies_that_read_what_it_changed(mesh):
    # mesh: web (calls api) on host-a, api on host-b; add db, and cache calling db.
    register_app("db", "host-c", "10.0.0.12", port=5432)
    register_app("cache", "host-d", "10.0.0.13", port=6379, upstreams=[{"DestinationName": "db"}])
    nodes = {"web": "host-a", "api": "host-b", "db": "host-c", "cache": "host-d"}
    deps = {s: proxycfg.compile_proxy(n, f"{s}-sidecar-proxy")[1] for s, n in nodes.items()}
    management = Authorizer.management()

    intentions.create(
        management, {"SourceName": "web", "DestinationName": "api", "Action": "allow"}
    )
    assert _woken_by_last_write(deps) == {"api"}

    config_entries_domain.write(
        config_entries_domain.decode({"Kind": "service-defaults", "Name": "db", "Protocol": "http"})
    )
    assert _woken_by_last_write(deps) == {"db", "cache"}  # cache's upstream chain reads it

    config_entries_domain.write(
        config_entries_domain.decode({"Kind": "service-resolver", "Name": "api"})
    )
    assert _woken_by_last_write(deps) == {"web"}  # only web's chain resolves api

    intentions.create(management, {"SourceName": "*", "DestinationName": "*", "Action": "deny"})
    assert _woken_by_last_write(deps) == set(nodes)

    config_entries_domain.write(
        config_entries_domain.decode(
            {"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "tcp"}}
        )
    )
    assert _woken_by_last_write(deps) == set(nodes)  # every protocol falls back to it


def test_proxies_compiled_at_one_index_share_reads_but_keep_their_own_rows(mesh):
    # A second web sidecar elsewhere, with its upstream on another port.
    register_app(
        "web",
        "host-c",
        "10.0.0.12",
        port=8081,
        upstreams=[{"DestinationName": "api", "LocalBindPort": 9292}],
    )
    a, _ = compiled()
    c, _ = proxycfg.compile_proxy("host-c", "web-sidecar-proxy")
    assert (a.node, a.inbound.local_app_port, a.upstreams[0].local_bind_port) == (
        "host-a",
        8080,
        9191,
    )
    assert (c.node, c.inbound.local_app_port, c.upstreams[0].local_bind_port) == (
        "host-c",
        8081,
        9292,
    )
    assert a.upstreams[0].clusters == c.upstreams[0].clusters  # same chain and endpoints

    # Its own registration changes (node topic): the new rows are read.
    register_app("web", "host-a", "10.0.0.10", port=8090, upstreams=[])
    again, _ = compiled()
    assert again.inbound.local_app_port == 8090 and again.upstreams == ()
    assert again.version > a.version


def test_compiling_many_proxies_at_once_answers_what_compiling_each_answers(mesh):
    register_app(
        "web",
        "host-c",
        "10.0.0.12",
        port=8081,
        upstreams=[{"DestinationName": "api", "LocalBindPort": 9292}],
    )
    wanted = [
        ("host-a", "web-sidecar-proxy"),
        ("nowhere", "web-sidecar-proxy"),
        ("host-c", "web-sidecar-proxy"),
        ("host-b", "api-sidecar-proxy"),
    ]
    together = proxycfg.compile_proxies(wanted)
    assert isinstance(together[1], NotFound)
    for (node, proxy_id), got in zip(wanted, together, strict=True):
        if node == "nowhere":
            continue
        config, topics = got
        alone, alone_topics = proxycfg.compile_proxy(node, proxy_id)
        assert (config, topics) == (alone, alone_topics)
        assert config.version > 0 and config.node == node


def test_find_proxy_picks_a_sidecar_and_says_what_is_missing(mesh):
    register_app("web", "host-c", "10.0.0.12", port=8080)
    assert proxycfg.find_proxy("web") == ("host-a", "web-sidecar-proxy")
    assert proxycfg.find_proxy("web", node="host-c") == ("host-c", "web-sidecar-proxy")
    reg(
        {
            "Node": "host-d",
            "Address": "10.0.0.13",
            "Service": {"ID": "plain", "Service": "plain", "Port": 1},
        }
    )
    for kwargs, message in (
        ({"service": "nope"}, 'Service "nope" not found'),
        ({"service": "plain"}, 'Service "plain" has no sidecar proxy'),
        ({"service": "web", "proxy_id": "x"}, 'Service "web" has no sidecar proxy "x"'),
        ({"service": "web", "node": "host-z"}, 'has no sidecar proxy on node "host-z"'),
    ):
        with pytest.raises(NotFound) as err:
            proxycfg.find_proxy(kwargs.pop("service"), **kwargs)
        assert message in err.value.message


def test_the_api_view_answers_what_compile_proxy_answers(mesh, client):
    resp = client.get("/api/services/web/proxy-config")
    assert resp.status_code == 200
    config, _ = compiled()
    assert resp.json() == config.to_json()
    assert resp.headers["X-Consul-Index"] == str(config.version)


@pytest.fixture
def acl_on(mesh, settings):
    from registry.domain import acl

    settings.MESH_ACL_ENABLED = True
    settings.MESH_ACL_DEFAULT_POLICY = "deny"
    acl._cache.clear()
    yield acl
    acl._cache.clear()


def token_with(acl, rules: str) -> str:
    policy = acl.create_policy(name=f"p-{uuid.uuid4().hex[:8]}", rules=rules)
    _token, secret = acl.create_token(policies=[{"ID": policy.id}])
    return secret


def test_the_api_view_needs_read_on_the_service_its_upstreams_and_its_intentions(acl_on, client):
    url = "/api/services/web/proxy-config"
    resp = client.get(url)
    assert resp.status_code == 403
    assert "service:read" in resp.json()["error"]
    for rules, missing in (
        ('service "web" { policy = "read" }', 'service:read\' on "api"'),
        (
            'service "web" { policy = "read" intentions = "deny" }\nservice "api" { policy = "read" }',
            "intentions:read",
        ),
    ):
        resp = client.get(url, HTTP_X_CONSUL_TOKEN=token_with(acl_on, rules))
        assert resp.status_code == 403, resp.content
        assert missing in resp.json()["error"]
    enough = token_with(
        acl_on, 'service "web" { policy = "read" }\nservice "api" { policy = "read" }'
    )
    resp = client.get(url, HTTP_X_CONSUL_TOKEN=enough)
    assert resp.status_code == 200, resp.content
    assert ProxyConfig.from_json(resp.json()).upstreams[0].destination == "api"


# =========================================================================== real server (slow)


def v1_register(http, raw: dict) -> None:
    resp = http.put("/v1/catalog/register", json=raw)
    assert resp.status_code == 200, resp.text


def run_mesh(server, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))}
    env["MESH_HTTP_ADDR"] = server.addr
    proc = subprocess.run(
        [sys.executable, "-m", "meshweb.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture
def served(server, http, unique):
    """web -> api on the shared server, under unique names."""
    web, api = unique("web"), unique("api")
    host_a, host_b, host_c = unique("host"), unique("host"), unique("host")
    for host, addr, name, port, ups in (
        (host_a, "10.9.0.10", web, 8080, [{"DestinationName": api, "LocalBindPort": 9191}]),
        (host_b, "10.9.0.11", api, 9091, []),
        (host_c, "10.9.0.12", api, 9091, []),
    ):
        v1_register(
            http,
            {"Node": host, "Address": addr, "Service": {"ID": name, "Service": name, "Port": port}},
        )
        v1_register(
            http,
            {
                "Node": host,
                "Address": addr,
                "Service": {
                    "ID": f"{name}-sidecar-proxy",
                    "Service": f"{name}-sidecar-proxy",
                    "Kind": "connect-proxy",
                    "Port": 21000,
                    "Proxy": {
                        "DestinationServiceName": name,
                        "DestinationServiceID": name,
                        "LocalServicePort": port,
                        "Upstreams": ups,
                    },
                },
            },
        )
    # host-c's api is critical: it must not be an endpoint.
    v1_register(
        http,
        {
            "Node": host_c,
            "Address": "10.9.0.12",
            "Check": {
                "CheckID": f"{api}-down",
                "Name": "app",
                "Status": "critical",
                "ServiceID": api,
            },
        },
    )
    resp = http.put(
        "/v1/connect/intentions/exact",
        params={"source": web, "destination": api},
        json={"Action": "allow"},
    )
    assert resp.status_code == 200, resp.text
    return {"web": web, "api": api, "host_a": host_a, "host_b": host_b}


@pytest.mark.slow
def test_the_http_endpoint_serves_a_config_the_sidecar_accepts(served, http):
    resp = http.get(f"/api/services/{served['web']}/proxy-config")
    assert resp.status_code == 200, resp.text
    config = ProxyConfig.from_json(resp.json())
    assert config.version == int(resp.headers["X-Consul-Index"]) > 0
    assert (config.service, config.node) == (served["web"], served["host_a"])
    (up,) = config.upstreams
    assert up.destination == served["api"] and up.local_bind_port == 9191
    (cluster,) = up.clusters
    assert [(e.node, e.address, e.port) for e in cluster.endpoints] == [
        (served["host_b"], "10.9.0.11", 21000)
    ]
    roots = http.get("/v1/connect/ca/roots").json()
    active = next(r for r in roots["Roots"] if r["Active"])
    assert config.roots[0] == active["RootCert"]
    assert config.trust_domain == roots["TrustDomain"]
    # The api side sees web's allow intention.
    api_cfg = http.get(f"/api/services/{served['api']}/proxy-config").json()
    assert [(i["SourceName"], i["Action"]) for i in api_cfg["intentions"]] == [
        (served["web"], "allow")
    ]
    # Picking the instance explicitly gives the same document.
    again = http.get(
        f"/api/services/{served['web']}/proxy-config",
        params={"proxy_id": f"{served['web']}-sidecar-proxy", "node": served["host_a"]},
    )
    assert again.json() == resp.json()


@pytest.mark.slow
def test_the_http_endpoint_answers_404_json_for_what_is_not_there(served, http, unique):
    plain = unique("plain")
    v1_register(
        http,
        {
            "Node": served["host_b"],
            "Address": "10.9.0.11",
            "Service": {"ID": plain, "Service": plain, "Port": 1},
        },
    )
    for path, params, message in (
        (f"/api/services/{unique('nope')}/proxy-config", {}, "not found"),
        (f"/api/services/{plain}/proxy-config", {}, "has no sidecar proxy"),
        (f"/api/services/{served['web']}/proxy-config", {"proxy_id": "nope"}, '"nope"'),
        (f"/api/services/{served['web']}/proxy-config", {"node": "nope"}, 'node "nope"'),
    ):
        resp = http.get(path, params=params)
        assert resp.status_code == 404, resp.text
        assert message in resp.json()["error"]


@pytest.mark.slow
def test_mesh_proxy_config_prints_json_and_a_summary(served, server, http):
    as_json = run_mesh(server, "proxy-config", served["web"], "-format", "json")
    assert as_json.returncode == 0, as_json.stderr
    served_json = http.get(f"/api/services/{served['web']}/proxy-config").json()
    assert json.loads(as_json.stdout) == served_json
    text = run_mesh(server, "proxy-config", served["web"])
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"Proxy:     {served['web']}-sidecar-proxy on node {served['host_a']}" in out
    assert "Inbound:   0.0.0.0:21000 -> 127.0.0.1:8080 (tcp)" in out
    assert f"{served['api']} -> 127.0.0.1:9191 (tcp, dc1)" in out
    assert f"cluster {served['api']}.default.dc1" in out
    assert "10.9.0.11:21000" in out and "10.9.0.12" not in out
    assert "Intentions (default deny):" in out
    roots = http.get("/v1/connect/ca/roots").json()
    assert f"{roots['ActiveRootID']}  (active)" in out
    api_text = run_mesh(server, "proxy-config", served["api"]).stdout
    assert f"9           {served['web']}" in api_text  # precedence, source


@pytest.mark.slow
def test_mesh_proxy_config_explains_bad_input_and_fails(served, server, unique):
    for args, message in (
        ((unique("nope"),), "not found"),
        ((served["web"], "-proxy-id", "nope"), 'has no sidecar proxy "nope"'),
        ((served["web"], "-node", "nope"), 'on node "nope"'),
        ((), "Missing SERVICE"),
    ):
        proc = run_mesh(server, "proxy-config", *args)
        assert proc.returncode != 0
        assert message in proc.stderr, proc.stderr


def test_l7_extensions_compile_into_routes_splits_clusters_and_the_inbound():
    """Retry conditions, per-try timeout, retry budget and fault injection on a
    route; header changes on a split; hash policies on a cluster; per-route
    rate limits and the local request timeout on the inbound."""
    config = entries(
        HTTP_GLOBAL,
        {
            "Kind": "service-resolver",
            "Name": "api",
            "Subsets": {"v1": {"Filter": 'Service.Meta.version == "1"'}},
            "RequestTimeout": "7s",
            "LoadBalancer": {
                "Policy": "ring_hash",
                "HashPolicies": [{"Field": "header", "FieldValue": "x-user", "Terminal": True}],
            },
        },
        {
            "Kind": "service-splitter",
            "Name": "api",
            "Splits": [
                {
                    "Weight": 99.99,
                    "ServiceSubset": "v1",
                    "ResponseHeaders": {"Set": {"x-split": "v1"}},
                },
                {"Weight": 0.01, "RequestHeaders": {"Remove": ["x-debug"]}},
            ],
        },  # fmt: skip
        {
            "Kind": "service-router",
            "Name": "api",
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/pay"}},
                    "Destination": {
                        "NumRetries": 3,
                        "RetryOn": ["gateway-error", "unavailable"],
                        "PerTryTimeout": "250ms",
                        "RetryNonIdempotent": True,
                        "RetryBudget": {"Percent": 10, "MinRetriesPerSecond": 2},
                        "Fault": {
                            "Delay": "100ms",
                            "DelayPercent": 5,
                            "AbortStatus": 503,
                            "AbortPercent": 1.5,
                        },
                        "RequestHeaders": {"Add": {"x-a": "1"}, "Set": {"x-s": "2"}},
                    },
                },
            ],
        },  # fmt: skip
        {
            "Kind": "service-defaults",
            "Name": "web",
            "LocalRequestTimeoutMs": 1500,
            "RateLimits": {
                "InstanceLevel": {
                    "RequestsPerSecond": 100,
                    "Routes": [
                        {"PathPrefix": "/search", "RequestsPerSecond": 5, "RequestsMaxBurst": 2}
                    ],
                }
            },
        },  # fmt: skip
    )
    snap = snapshot(
        [{"DestinationName": "api", "LocalBindPort": 9191}],
        {("api", "dc1"): (sidecar("api", "host-b", "10.0.0.11", meta={"version": "1"}),)},
        config=config,
    )
    cfg = proxycfg.build_proxy_config(snap)
    (up,) = cfg.upstreams
    pay, default = up.routes
    assert pay.retry.retry_on == ("gateway-error", "unavailable")
    assert (pay.retry.num_retries, pay.retry.per_try_timeout_s) == (3, 0.25)
    assert pay.retry.retry_non_idempotent
    assert (pay.retry.budget_percent, pay.retry.budget_min_per_s) == (10.0, 2.0)
    assert pay.fault is not None
    assert (pay.fault.delay_s, pay.fault.delay_percent) == (0.1, 5.0)
    assert (pay.fault.abort_status, pay.fault.abort_percent) == (503, 1.5)
    assert pay.request_headers_add == (("x-a", "1"),)
    assert pay.request_headers_set == (("x-s", "2"),)
    weights = {s.weight: s for s in default.splits}
    assert set(weights) == {99.99, 0.01}
    assert weights[99.99].response_headers_set == (("x-split", "v1"),)
    assert weights[0.01].request_headers_remove == ("x-debug",)
    by_name = {c.name: c for c in up.clusters}
    v1 = by_name[weights[99.99].cluster]
    assert v1.lb_policy == "ring_hash"
    assert [(h.field, h.field_value, h.terminal) for h in v1.hash_policies] == [
        ("header", "x-user", True)
    ]
    assert v1.request_timeout_s == 7.0
    (limit,) = cfg.inbound.route_rate_limits
    assert (limit.path_prefix, limit.requests_per_second, limit.burst) == ("/search", 5.0, 2)
    assert cfg.inbound.request_timeout_s == 1.5
    assert ProxyConfig.from_json(cfg.to_json()) == cfg
