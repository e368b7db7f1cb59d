"""/api/nodes/: list (filters, ordering, pagination), retrieve with services and checks."""

from __future__ import annotations

from registry.domain import catalog
from tests.api.conftest import register, results, token_with


def test_it_lists_nodes_with_their_datacenter_meta_and_service_count(api):
    register("n1", "web", node_meta={"env": "prod"})
    register("n1", "api", address="10.0.0.1")
    register("n2", "web", dc="dc2", address="10.0.0.2", node_meta={"env": "dev"})
    rows = results(api.get("/api/nodes/"))
    assert [(r["name"], r["address"], r["datacenter"], r["service_count"]) for r in rows] == [
        ("n1", "10.0.0.1", "dc1", 2),
        ("n2", "10.0.0.2", "dc2", 1),
    ]
    assert rows[1]["meta"] == {"env": "dev"}


def test_it_filters_nodes_by_datacenter_and_by_meta(api):
    register("n1", "web", node_meta={"env": "prod", "team": "pay"})
    register("n2", "web", node_meta={"env": "prod", "team": "web"})
    register("n3", "web", dc="dc2", node_meta={"env": "dev"})
    names = lambda q: [r["name"] for r in results(api.get("/api/nodes/" + q))]  # noqa: E731
    assert names("?datacenter=dc2") == ["n3"]
    assert names("?meta=env:prod") == ["n1", "n2"]
    assert names("?meta=env:prod&meta=team:web") == ["n2"]
    assert names("?datacenter=dc1&meta=env:dev") == []
    r = api.get("/api/nodes/?meta=envprod")
    assert r.status_code == 400
    assert r.json()["fields"]["meta"] == ["expected key:value, got 'envprod'"]


def test_it_paginates_with_limit_and_offset_and_orders_by_any_listed_field(api):
    for i in range(5):
        register(f"node-{i}", "web", address=f"10.0.1.{9 - i}")
    r = api.get("/api/nodes/?limit=2&offset=2")
    body = r.json()
    assert body["count"] == 5
    assert [n["name"] for n in body["results"]] == ["node-2", "node-3"]
    assert "offset=4" in body["next"] and "limit=2" in body["next"]
    rows = results(api.get("/api/nodes/?ordering=address&limit=2"))
    assert [n["address"] for n in rows] == ["10.0.1.5", "10.0.1.6"]


def test_it_shows_a_node_with_its_services_checks_and_their_health(api):
    register("n1", "web", port=8080, tags=["v1"], status="critical")
    register("n1", "api", port=9090, status="passing")
    body = api.get("/api/nodes/n1/").json()
    assert body["name"] == "n1" and body["service_count"] == 2
    assert [(s["service_id"], s["port"], s["status"]) for s in body["services"]] == [
        ("api", 9090, "passing"),
        ("web", 8080, "critical"),
    ]
    assert body["services"][1]["tags"] == ["v1"]
    assert [(c["check_id"], c["status"], c["service_name"]) for c in body["checks"]] == [
        ("api-check", "passing", "api"),
        ("web-check", "critical", "web"),
    ]


def test_a_node_check_makes_every_service_on_the_node_critical(api):
    register("n1", "web")
    catalog.catalog_register(
        {"Node": "n1", "Address": "10.0.0.1", "Check": {"CheckID": "disk", "Status": "critical"}}
    )
    body = api.get("/api/nodes/n1/").json()
    assert body["services"][0]["status"] == "critical"


def test_it_answers_404_json_for_an_unknown_node(api):
    r = api.get("/api/nodes/ghost/")
    assert (r.status_code, r.json()) == (404, {"error": 'Node "ghost" not found'})


def test_a_scoped_token_sees_only_the_nodes_and_services_it_may_read(acl_api):
    register("edge-1", "web")
    register("edge-1", "secret-svc")
    register("core-1", "web")
    secret = token_with(
        'node_prefix "edge-" { policy = "read" }\nservice "web" { policy = "read" }'
    )
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=secret)
    assert [r["name"] for r in results(acl_api.get("/api/nodes/"))] == ["edge-1"]
    assert acl_api.get("/api/nodes/core-1/").status_code == 404
    body = acl_api.get("/api/nodes/edge-1/").json()
    assert [s["name"] for s in body["services"]] == ["web"]
    assert [c["service_name"] for c in body["checks"]] == ["web"]
    acl_api.credentials()
    assert results(acl_api.get("/api/nodes/")) == []
