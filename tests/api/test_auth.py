"""Who calls /api: tokens in the header, as a bearer or in the query; UI sessions;
anonymous callers; unknown tokens."""

from __future__ import annotations

from django.contrib.auth.models import User

from tests.api.conftest import MANAGEMENT, register, results


def test_an_unknown_token_is_a_403_json_wherever_it_is_sent(acl_api):
    for kwargs, path in [
        ({"HTTP_X_CONSUL_TOKEN": "nope"}, "/api/services/"),
        ({"HTTP_AUTHORIZATION": "Bearer nope"}, "/api/services/"),
        ({}, "/api/services/?token=nope"),
    ]:
        r = acl_api.get(path, **kwargs)
        assert (r.status_code, r.json()) == (403, {"error": "ACL not found"})


def test_the_management_token_works_in_each_place(acl_api):
    register("n1", "web")
    for kwargs, path in [
        ({"HTTP_X_CONSUL_TOKEN": MANAGEMENT}, "/api/services/"),
        ({"HTTP_AUTHORIZATION": f"Bearer {MANAGEMENT}"}, "/api/services/"),
        ({}, f"/api/services/?token={MANAGEMENT}"),
    ]:
        assert [s["name"] for s in results(acl_api.get(path, **kwargs))] == ["web"]


def test_anonymous_callers_get_the_anonymous_tokens_view_and_writes_are_refused(acl_api):
    register("n1", "web")
    assert results(acl_api.get("/api/services/")) == []
    r = acl_api.post("/api/instances/", {"name": "web", "port": 80}, format="json")
    assert r.status_code == 403
    assert r.json() == {
        "error": "Permission denied: token with AccessorID "
        "'00000000-0000-0000-0000-000000000002' lacks permission 'service:write' on \"web\""
    }


def test_a_logged_in_staff_user_manages_everything_and_other_users_are_anonymous(acl_api):
    register("n1", "web")
    staff = User.objects.create_user("ops", password="pw", is_staff=True)
    plain = User.objects.create_user("dev", password="pw")
    acl_api.force_login(plain)
    assert results(acl_api.get("/api/services/")) == []
    acl_api.force_login(staff)
    assert [s["name"] for s in results(acl_api.get("/api/services/"))] == ["web"]
    assert acl_api.get("/api/acl/policies/").status_code == 200


def test_with_acls_disabled_everything_is_allowed_whatever_the_token(api):
    register("n1", "web")
    r = api.get("/api/services/", HTTP_X_CONSUL_TOKEN="anything")
    assert [s["name"] for s in results(r)] == ["web"]
    r = api.post("/api/datacenters/", {"name": "new"}, format="json")
    assert r.status_code == 201
