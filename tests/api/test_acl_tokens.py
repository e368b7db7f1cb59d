"""/api/acl/tokens/: create (secret shown once), list, retrieve, update, delete."""

from __future__ import annotations

from registry.domain import acl
from tests.api.conftest import MANAGEMENT, register, results


def _policy(api, name: str, rules: str) -> dict:
    r = api.post("/api/acl/policies/", {"name": name, "rules": rules}, format="json")
    assert r.status_code == 201, r.content
    return r.json()


def test_a_created_token_shows_its_secret_once_and_that_secret_works(acl_api):
    register("n1", "web")
    register("n1", "db")
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    policy = _policy(
        acl_api, "web-read", 'service "web" { policy = "read" }\nnode_prefix "" { policy = "read" }'
    )
    r = acl_api.post(
        "/api/acl/tokens/",
        {"description": "web reader", "policies": [{"name": "web-read"}]},
        format="json",
    )
    assert r.status_code == 201, r.content
    created = r.json()
    assert created["policies"] == [{"id": policy["id"], "name": "web-read"}]
    secret = created["secret_id"]
    got = acl_api.get(f"/api/acl/tokens/{created['accessor_id']}/").json()
    assert "secret_id" not in got and got["description"] == "web reader"
    listed = results(acl_api.get("/api/acl/tokens/?policy=web-read"))
    assert [t["accessor_id"] for t in listed] == [created["accessor_id"]]
    assert all("secret_id" not in t for t in results(acl_api.get("/api/acl/tokens/")))
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=secret)
    assert [s["name"] for s in results(acl_api.get("/api/services/"))] == ["web"]


def test_updating_a_token_changes_its_description_and_policies(acl_api):
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    a = _policy(acl_api, "a", 'key_prefix "a/" { policy = "read" }')
    b = _policy(acl_api, "b", 'key_prefix "b/" { policy = "read" }')
    token = acl_api.post("/api/acl/tokens/", {"policies": [{"id": a["id"]}]}, format="json").json()
    url = f"/api/acl/tokens/{token['accessor_id']}/"
    r = acl_api.patch(url, {"description": "renamed"}, format="json")
    assert r.status_code == 200
    assert [p["name"] for p in r.json()["policies"]] == ["a"]
    r = acl_api.put(url, {"policies": [{"name": "b"}]}, format="json")
    assert (r.json()["description"], [p["id"] for p in r.json()["policies"]]) == (
        "renamed",
        [b["id"]],
    )
    r = acl_api.patch(url, {"expiration_ttl": "1h"}, format="json")
    assert r.status_code == 400 and "expiration_ttl" in r.json()["fields"]


def test_bad_token_input_is_refused_and_nothing_is_created(acl_api):
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    before = len(acl.list_tokens())
    r = acl_api.post("/api/acl/tokens/", {"policies": [{"name": "missing"}]}, format="json")
    assert (r.status_code, r.json()) == (400, {"error": 'No such ACL policy with name "missing"'})
    r = acl_api.post("/api/acl/tokens/", {"policies": [{}]}, format="json")
    assert r.status_code == 400 and "policies[0]" in r.json()["fields"]
    r = acl_api.post("/api/acl/tokens/", {"expiration_ttl": "soon"}, format="json")
    assert r.status_code == 400 and "expiration_ttl" in r.json()["fields"]
    r = acl_api.post("/api/acl/tokens/", {"local": "yes please"}, format="json")
    assert r.status_code == 400 and "local" in r.json()["fields"]
    assert len(acl.list_tokens()) == before


def test_a_token_is_deleted_but_not_the_callers_own(acl_api):
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    token = acl_api.post("/api/acl/tokens/", {"description": "temp"}, format="json").json()
    assert acl_api.delete(f"/api/acl/tokens/{token['accessor_id']}/").status_code == 204
    assert acl_api.get(f"/api/acl/tokens/{token['accessor_id']}/").status_code == 404
    own = acl.get_token_by_secret(MANAGEMENT).accessor_id
    r = acl_api.delete(f"/api/acl/tokens/{own}/")
    assert r.status_code == 400 and "not permitted" in r.json()["error"]


def test_anonymous_callers_cannot_list_or_create_tokens(acl_api):
    assert acl_api.get("/api/acl/tokens/").status_code == 403
    r = acl_api.post("/api/acl/tokens/", {"description": "x"}, format="json")
    assert r.status_code == 403 and "acl:write" in r.json()["error"]
