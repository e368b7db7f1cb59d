"""`/api/gateways/`, `/api/gateways/<node>/<id>/config` and the failover warning
on `/api/config-entries/` (the DRF client on the test database)."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from registry.domain import acl, intentions, proxycfg
from tests.api.conftest import MANAGEMENT, token_with
from tests.gateways.test_gateway_compile import register_gateway
from tests.registry.test_proxycfg import register_app


@pytest.fixture
def gateways(db, settings):
    settings.MESH_ACL_ENABLED = True
    settings.MESH_ACL_DEFAULT_POLICY = "deny"
    acl._cache.clear()
    acl.ensure_initial_management(MANAGEMENT)
    intentions.reset_caches()
    proxycfg.forget_shared_reads()
    register_app("api", "host-b", "10.0.0.11", port=9091)
    register_gateway("gw-1", "10.0.0.2", "dc1", "192.0.2.1")
    register_gateway("gw-2", "10.1.0.2", "dc2", "198.51.100.2")
    yield APIClient()
    acl._cache.clear()
    proxycfg.forget_shared_reads()


def test_the_gateways_and_a_routing_table_are_listed_for_a_management_token(gateways):
    api = gateways
    api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    rows = api.get("/api/gateways/").json()
    assert [(r["datacenter"], r["node"], r["address"], r["wan"]["Address"]) for r in rows] == [
        ("dc1", "gw-1", "10.0.0.2", "192.0.2.1"),
        ("dc2", "gw-2", "10.1.0.2", "198.51.100.2"),
    ]
    r = api.get("/api/gateways/gw-1/mesh-gateway/config")
    assert r.status_code == 200
    config = r.json()
    assert [x["service"] for x in config["routes"]] == ["api"]
    assert [d["datacenter"] for d in config["datacenters"]] == ["dc2"]
    assert int(r.headers["X-Consul-Index"]) == config["version"] > 0
    r = api.get("/api/gateways/gw-1/nope/config")
    assert r.status_code == 404 and r.json() == {"error": 'No mesh-gateway "nope" on node "gw-1"'}


def test_a_token_that_may_not_read_the_routed_services_gets_a_403(gateways):
    api = gateways
    api.credentials(
        HTTP_X_CONSUL_TOKEN=token_with('node_prefix "" { policy = "read" }\n'
                                       'service "mesh-gateway" { policy = "read" }')
    )  # fmt: skip
    r = api.get("/api/gateways/gw-1/mesh-gateway/config")
    assert r.status_code == 403 and "service:read" in r.json()["error"]
    # The list shows what the token may read: the gateways, not api's routes.
    assert len(api.get("/api/gateways/").json()) == 2
    api.credentials(HTTP_X_CONSUL_TOKEN=token_with('service_prefix "" { policy = "read" }'))
    assert api.get("/api/gateways/").json() == []  # no node:read


def test_the_rest_api_flags_a_failover_that_can_never_trigger(gateways):
    api = gateways
    api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    r = api.put(
        "/api/config-entries/service-resolver/api/",
        {"config": {"Failover": {"*": {"Datacenters": ["dc2", "dc7"]}}}},
        format="json",
    )
    assert r.status_code == 200, r.content
    assert '"dc7"' in r.headers["X-Mesh-Warning"] and '"dc2"' not in r.headers["X-Mesh-Warning"]
    r = api.put(
        "/api/config-entries/service-resolver/api/",
        {"config": {"Failover": {"*": {"Datacenters": ["dc2"]}}}},
        format="json",
    )
    assert r.status_code == 200 and "X-Mesh-Warning" not in r.headers
