"""/api/datacenters/: list, retrieve, create and update (provider and region)."""

from __future__ import annotations

from registry.models import Datacenter
from tests.api.conftest import MANAGEMENT, register, results, token_with


def test_it_lists_datacenters_with_provider_region_and_node_count(api):
    register("n1", "web", dc="dc1")
    register("n2", "web", dc="dc1")
    register("n3", "web", dc="eu-west")
    rows = results(api.get("/api/datacenters/"))
    assert [(r["name"], r["provider"], r["region"], r["node_count"]) for r in rows] == [
        ("dc1", "onprem", "", 2),
        ("eu-west", "onprem", "", 1),
    ]
    assert all(r["modify_index"] >= r["create_index"] > 0 for r in rows)


def test_it_creates_a_datacenter_with_its_provider_and_region(api):
    r = api.post(
        "/api/datacenters/",
        {"name": "aws-eu", "provider": "aws", "region": "eu-west-1"},
        format="json",
    )
    assert r.status_code == 201, r.content
    assert r.json()["name"] == "aws-eu"
    got = api.get("/api/datacenters/aws-eu/").json()
    assert (got["provider"], got["region"], got["node_count"]) == ("aws", "eu-west-1", 0)


def test_it_updates_provider_and_region_keeping_what_is_not_sent(api):
    api.post("/api/datacenters/", {"name": "site1"}, format="json")
    r = api.patch("/api/datacenters/site1/", {"provider": "gcp"}, format="json")
    assert r.status_code == 200, r.content
    assert (r.json()["provider"], r.json()["region"]) == ("gcp", "")
    r = api.put("/api/datacenters/site1/", {"region": "europe-west4"}, format="json")
    assert (r.json()["provider"], r.json()["region"]) == ("gcp", "europe-west4")
    assert r.json()["modify_index"] > r.json()["create_index"]


def test_it_refuses_an_unknown_provider_naming_the_field_and_stores_nothing(api):
    r = api.post("/api/datacenters/", {"name": "x1", "provider": "ibm"}, format="json")
    assert r.status_code == 400
    assert "provider" in r.json()["fields"]
    assert "provider" in r.json()["error"]
    assert not Datacenter.objects.filter(name="x1").exists()


def test_it_refuses_a_name_that_cannot_be_a_datacenter(api):
    r = api.post("/api/datacenters/", {"name": "has space"}, format="json")
    assert r.status_code == 400
    assert r.json()["error"].startswith("Invalid datacenter name 'has space'")


def test_it_answers_409_for_a_datacenter_that_exists(api):
    api.post("/api/datacenters/", {"name": "dup"}, format="json")
    r = api.post("/api/datacenters/", {"name": "dup", "provider": "aws"}, format="json")
    assert (r.status_code, r.json()) == (409, {"error": 'Datacenter "dup" already exists'})
    assert Datacenter.objects.get(name="dup").provider == "onprem"


def test_it_answers_404_json_for_an_unknown_datacenter(api):
    r = api.get("/api/datacenters/nowhere/")
    assert (r.status_code, r.json()) == (404, {"error": 'Datacenter "nowhere" not found'})
    r = api.patch("/api/datacenters/nowhere/", {"region": "r"}, format="json")
    assert r.status_code == 404


def test_it_filters_by_provider_and_orders_by_name_descending(api):
    for name, provider in [("a1", "aws"), ("a2", "aws"), ("g1", "gcp")]:
        api.post("/api/datacenters/", {"name": name, "provider": provider}, format="json")
    rows = results(api.get("/api/datacenters/?provider=aws&ordering=-name"))
    assert [r["name"] for r in rows] == ["a2", "a1"]
    r = api.get("/api/datacenters/?provider=nimbus")
    assert r.status_code == 400 and "provider" in r.json()["fields"]


def test_writes_need_operator_write_when_acls_are_on(acl_api):
    r = acl_api.post("/api/datacenters/", {"name": "z1"}, format="json")
    assert r.status_code == 403
    assert "lacks permission 'operator:write'" in r.json()["error"]
    reader = token_with('operator = "read"')
    r = acl_api.post("/api/datacenters/", {"name": "z1"}, format="json", HTTP_X_CONSUL_TOKEN=reader)
    assert r.status_code == 403
    r = acl_api.post(
        "/api/datacenters/", {"name": "z1"}, format="json", HTTP_X_CONSUL_TOKEN=MANAGEMENT
    )
    assert r.status_code == 201
    assert not Datacenter.objects.filter(name="z2").exists()
