"""`/api/config-entries/` and `/api/discovery-chains/`: the same entries as
`/v1/config`, in the product API's envelope, with JSON errors."""

from __future__ import annotations

import pytest

from registry.domain import intentions
from registry.models import AuditEntry, ConfigEntry, Intention
from tests.api.conftest import MANAGEMENT, token_with


@pytest.fixture(autouse=True)
def _fresh_caches():
    intentions.reset_caches()
    yield
    intentions.reset_caches()


def put(api, kind: str, name: str, config: dict, **extra):
    return api.put(
        f"/api/config-entries/{kind}/{name}/", {"config": config, **extra}, format="json"
    )


def test_an_entry_is_written_read_listed_and_deleted(api):
    r = put(api, "service-defaults", "web", {"protocol": "http", "LocalConnectTimeoutMs": 500})
    assert r.status_code == 200, r.content
    body = r.json()
    assert body == {
        "kind": "service-defaults",
        "name": "web",
        "config": {"Protocol": "http", "LocalConnectTimeoutMs": 500},
        "create_index": body["modify_index"],
        "modify_index": body["modify_index"],
    }
    assert api.get("/api/config-entries/service-defaults/web/").json() == body
    put(api, "service-resolver", "web", {"ConnectTimeout": "2s"})
    listed = api.get("/api/config-entries/").json()
    assert [(e["kind"], e["name"]) for e in listed["results"]] == [
        ("service-defaults", "web"),
        ("service-resolver", "web"),
    ]
    only = api.get("/api/config-entries/service-resolver/").json()
    assert [e["config"] for e in only["results"]] == [{"ConnectTimeout": "2s"}]
    assert api.get("/api/config-entries/?kind=service-defaults").json()["count"] == 1
    assert api.delete("/api/config-entries/service-resolver/web/").status_code == 204
    r = api.get("/api/config-entries/service-resolver/web/")
    assert (r.status_code, r.json()) == (
        404,
        {"error": 'Config entry not found for "service-resolver" / "web"'},
    )


def test_cas_mismatches_are_409s(api):
    first = put(api, "service-defaults", "web", {"Protocol": "http"}, cas=0).json()
    r = put(api, "service-defaults", "web", {"Protocol": "grpc"}, cas=0)
    assert r.status_code == 409 and "cas 0 did not match" in r.json()["error"]
    r = put(api, "service-defaults", "web", {"Protocol": "grpc"}, cas=first["modify_index"])
    assert r.status_code == 200 and r.json()["config"]["Protocol"] == "grpc"
    r = api.delete(f"/api/config-entries/service-defaults/web/?cas={first['modify_index']}")
    assert r.status_code == 409
    assert ConfigEntry.objects.filter(kind="service-defaults", name="web").exists()


def test_bad_input_is_a_json_400_and_nothing_is_stored(api):
    cases = [
        ("service-defaults", "web", {"Protocl": "http"}, "Protocl: unknown field"),
        ("service-defaults", "web", {"Name": "api"}, "does not match the URL's 'web'"),
        ("service-widgets", "web", {}, "invalid config entry kind: 'service-widgets'"),
        (
            "service-splitter",
            "web",
            {"Splits": [{"Weight": 60}, {"Weight": 39, "Service": "b"}]},
            "the weights must add up to 100, not 99",
        ),
        (
            "service-router",
            "web",
            {"Routes": [{"Match": {"HTTP": {"PathPrefix": "/"}}}]},
            'needs an HTTP-family protocol (http, http2 or grpc), but service "web" has protocol "tcp"',
        ),
    ]
    for kind, name, config, message in cases:
        r = put(api, kind, name, config)
        assert r.status_code == 400, (kind, r.content)
        assert message in r.json()["error"], (kind, r.json())
    r = api.put("/api/config-entries/service-defaults/web/", {"cfg": {}}, format="json")
    assert r.status_code == 400 and "config" in r.json()["fields"]
    assert not ConfigEntry.objects.exists()


def test_service_intentions_are_the_intentions_of_the_destination(api):
    r = put(api, "service-intentions", "db", {"Sources": [{"Name": "web", "Action": "allow"}]})
    assert r.status_code == 200, r.content
    assert r.json()["config"]["Sources"][0]["Name"] == "web"
    assert Intention.objects.get(destination_name="db").source_name == "web"
    listed = api.get("/api/intentions/?destination=db").json()["results"]
    assert [(i["source_name"], i["action"]) for i in listed] == [("web", "allow")]


def test_the_discovery_chain_resource_compiles_the_same_chain(api):
    put(api, "service-defaults", "web", {"Protocol": "http"})
    put(api, "service-resolver", "web", {"Subsets": {"v1": {}, "v2": {}}})
    put(
        api,
        "service-splitter",
        "web",
        {"Splits": [{"Weight": 80, "ServiceSubset": "v1"}, {"Weight": 20, "ServiceSubset": "v2"}]},
    )
    chain = api.get("/api/discovery-chains/web/").json()["chain"]
    assert chain["StartNode"] == "splitter:web"
    assert [s["Weight"] for s in chain["Nodes"]["splitter:web"]["Splits"]] == [80, 20]
    tcp = api.get("/api/discovery-chains/web/?override_protocol=tcp").json()["chain"]
    assert tcp["Protocol"] == "tcp" and tcp["StartNode"] == "resolver:web.default.dc1"
    r = api.get("/api/discovery-chains/web/?override_protocol=udp")
    assert r.status_code == 400 and "OverrideProtocol" in r.json()["error"]


def test_writes_are_audited_as_api_writes(api):
    put(api, "service-defaults", "web", {"Protocol": "http"})
    entry = AuditEntry.objects.get(action="config.write")
    assert (entry.via, entry.resource_id, entry.after["Protocol"]) == (
        "api",
        "service-defaults/web",
        "http",
    )


def test_acls_apply_per_kind(acl_api):
    secret = token_with('service "web" { policy = "write" }')
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=secret)
    assert put(acl_api, "service-defaults", "web", {"Protocol": "http"}).status_code == 200
    r = put(acl_api, "service-defaults", "api", {"Protocol": "http"})
    assert r.status_code == 403 and "service:write" in r.json()["error"]
    r = put(acl_api, "proxy-defaults", "global", {})
    assert r.status_code == 403 and "operator:write" in r.json()["error"]
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    put(acl_api, "service-defaults", "api", {"Protocol": "http"})
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=secret)
    names = [e["name"] for e in acl_api.get("/api/config-entries/").json()["results"]]
    assert names == ["web"]
