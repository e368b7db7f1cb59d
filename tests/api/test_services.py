"""/api/services/: services aggregated by name, one service with its instances,
and /api/services/<name>/instances/."""

from __future__ import annotations

from tests.api.conftest import register, results, token_with


def _setup():
    register("n1", "web", service_id="web-1", tags=["v1", "blue"], status="passing")
    register("n2", "web", service_id="web-2", tags=["v2"], status="critical", address="10.0.0.2")
    register("n3", "web", service_id="web-3", dc="dc2", status="warning", address="10.0.0.3")
    register("n1", "web-proxy", service_id="web-1-proxy", kind="connect-proxy", port=21000)
    register("n1", "db", status=None)


def test_it_aggregates_instances_tags_kinds_datacenters_and_health_per_service(api):
    _setup()
    rows = {r["name"]: r for r in results(api.get("/api/services/"))}
    assert list(rows) == ["db", "web", "web-proxy"]
    web = rows["web"]
    assert web["instance_count"] == 3
    assert web["tags"] == ["blue", "v1", "v2"]
    assert web["kinds"] == ["typical"]
    assert web["datacenters"] == ["dc1", "dc2"]
    assert web["health"] == {"passing": 1, "warning": 1, "critical": 1}
    assert web["checks"] == {"passing": 1, "warning": 1, "critical": 1}
    assert rows["web-proxy"]["kinds"] == ["connect-proxy"]
    # No checks: passing, as Consul's health endpoints count it.
    assert rows["db"]["health"] == {"passing": 1, "warning": 0, "critical": 0}
    assert rows["db"]["checks"] == {"passing": 0, "warning": 0, "critical": 0}


def test_the_list_filters_the_instances_it_aggregates(api):
    _setup()
    by_dc = results(api.get("/api/services/?datacenter=dc2"))
    assert [(r["name"], r["instance_count"]) for r in by_dc] == [("web", 1)]
    by_tag = results(api.get("/api/services/?tag=v1&tag=blue"))
    assert [(r["name"], r["instance_count"], r["tags"]) for r in by_tag] == [
        ("web", 1, ["blue", "v1"])
    ]
    by_kind = results(api.get("/api/services/?kind=connect-proxy"))
    assert [r["name"] for r in by_kind] == ["web-proxy"]


def test_the_list_paginates_by_service_name(api):
    for i in range(4):
        register("n1", f"svc-{i}")
    body = api.get("/api/services/?limit=3").json()
    assert body["count"] == 4
    assert [r["name"] for r in body["results"]] == ["svc-0", "svc-1", "svc-2"]
    assert [r["name"] for r in results(api.get(body["next"]))] == ["svc-3"]


def test_one_service_shows_its_instances_with_their_checks(api):
    _setup()
    body = api.get("/api/services/web/").json()
    assert body["instance_count"] == 3
    got = [(i["service_id"], i["node"], i["datacenter"], i["status"]) for i in body["instances"]]
    assert got == [
        ("web-1", "n1", "dc1", "passing"),
        ("web-2", "n2", "dc1", "critical"),
        ("web-3", "n3", "dc2", "warning"),
    ]
    assert [c["check_id"] for c in body["instances"][1]["checks"]] == ["web-2-check"]


def test_service_instances_are_a_filterable_paginated_list(api):
    _setup()
    rows = results(api.get("/api/services/web/instances/?datacenter=dc1"))
    assert [(r["service_id"], r["address"] or r["node"]) for r in rows] == [
        ("web-1", "n1"),
        ("web-2", "n2"),
    ]
    body = api.get("/api/services/web/instances/?limit=1&offset=2").json()
    assert body["count"] == 3 and body["results"][0]["service_id"] == "web-3"


def test_an_unknown_service_is_a_404_json(api):
    r = api.get("/api/services/nothing/")
    assert (r.status_code, r.json()) == (404, {"error": 'Service "nothing" not found'})
    assert api.get("/api/services/nothing/instances/").status_code == 404


def test_a_scoped_token_sees_only_services_it_may_read(acl_api):
    _setup()
    secret = token_with('service "web" { policy = "read" }\nnode_prefix "" { policy = "read" }')
    acl_api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert [r["name"] for r in results(acl_api.get("/api/services/"))] == ["web"]
    assert acl_api.get("/api/services/db/").status_code == 404
    # node:read on only one node hides the instances on the others.
    secret = token_with('service "web" { policy = "read" }\nnode "n2" { policy = "read" }')
    acl_api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    rows = results(acl_api.get("/api/services/"))
    assert [(r["name"], r["instance_count"]) for r in rows] == [("web", 1)]
