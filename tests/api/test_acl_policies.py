"""/api/acl/policies/: list, retrieve, create, update, delete (acl:read / acl:write)."""

from __future__ import annotations

from registry.models import ACLPolicy
from registry.models.acl import GLOBAL_MANAGEMENT_POLICY_ID
from tests.api.conftest import MANAGEMENT, results, token_with

RULES = 'service "web" { policy = "write" }'


def test_it_creates_reads_updates_and_deletes_a_policy(acl_api):
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    r = acl_api.post(
        "/api/acl/policies/",
        {"name": "web-write", "description": "deploys", "rules": RULES, "datacenters": ["dc1"]},
        format="json",
    )
    assert r.status_code == 201, r.content
    created = r.json()
    assert (created["name"], created["rules"], created["datacenters"]) == (
        "web-write",
        RULES,
        ["dc1"],
    )
    got = acl_api.get(f"/api/acl/policies/{created['id']}/").json()
    assert got == created
    r = acl_api.patch(
        f"/api/acl/policies/{created['id']}/", {"description": "ci deploys"}, format="json"
    )
    assert (r.json()["description"], r.json()["rules"]) == ("ci deploys", RULES)
    names = [p["name"] for p in results(acl_api.get("/api/acl/policies/"))]
    assert names == ["global-management", "web-write"]
    assert acl_api.delete(f"/api/acl/policies/{created['id']}/").status_code == 204
    assert acl_api.get(f"/api/acl/policies/{created['id']}/").status_code == 404


def test_bad_policies_are_refused_with_the_domains_message_and_nothing_is_stored(acl_api):
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    r = acl_api.post("/api/acl/policies/", {"name": "bad", "rules": "service {"}, format="json")
    assert r.status_code == 400 and r.json()["error"]
    r = acl_api.post("/api/acl/policies/", {"rules": RULES}, format="json")
    assert (r.status_code, r.json()["fields"]) == (400, {"name": ["This field is required."]})
    r = acl_api.post("/api/acl/policies/", {"name": "has space"}, format="json")
    assert r.status_code == 400 and "invalid Name" in r.json()["error"]
    assert set(ACLPolicy.objects.values_list("name", flat=True)) == {"global-management"}
    acl_api.post("/api/acl/policies/", {"name": "dup"}, format="json")
    r = acl_api.post("/api/acl/policies/", {"name": "dup"}, format="json")
    assert r.status_code == 400 and "already exists" in r.json()["error"]


def test_the_builtin_policy_cannot_be_deleted(acl_api):
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    r = acl_api.delete(f"/api/acl/policies/{GLOBAL_MANAGEMENT_POLICY_ID}/")
    assert r.status_code == 400
    assert "not permitted" in r.json()["error"]


def test_reading_needs_acl_read_and_writing_acl_write(acl_api):
    r = acl_api.get("/api/acl/policies/")
    assert r.status_code == 403 and "lacks permission 'acl:read'" in r.json()["error"]
    reader = token_with('acl = "read"')
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=reader)
    assert acl_api.get("/api/acl/policies/").status_code == 200
    r = acl_api.post("/api/acl/policies/", {"name": "x"}, format="json")
    assert r.status_code == 403 and "lacks permission 'acl:write'" in r.json()["error"]


def test_acl_resources_answer_401_while_acls_are_disabled(api):
    r = api.get("/api/acl/policies/")
    assert (r.status_code, r.json()) == (401, {"error": "ACL support disabled"})
