"""/api/audit/: writes through /v1 and /api show up with who, what, before and after."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _entries(client, **params) -> list[dict]:
    r = client.get("/api/audit/", params=params)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_a_v1_registration_is_audited_with_the_token_accessor(acl_server, unique):
    name = unique("audited")
    with acl_server.client() as c:
        me = c.get("/v1/acl/token/self").json()["AccessorID"]
        assert (
            c.put("/v1/agent/service/register", json={"Name": name, "Port": 8080}).status_code
            == 200
        )
        assert (
            c.put("/v1/agent/service/register", json={"Name": name, "Port": 8081}).status_code
            == 200
        )
        entries = _entries(c, resource_id=f"mesh-server/{name}", action="service.register")
    assert [(e["before"] and e["before"]["Port"], e["after"]["Port"]) for e in entries] == [
        (8080, 8081),
        (None, 8080),
    ]
    assert {e["actor"] for e in entries} == {me}
    assert {(e["via"], e["method"], e["path"]) for e in entries} == {
        ("v1", "PUT", "/v1/agent/service/register")
    }


def test_a_kv_write_through_the_rest_api_is_audited(acl_server, unique):
    key = unique("audit-kv")
    with acl_server.client() as c:
        r = c.put(f"/api/kv/{key}", json={"value": "hello"})
        assert r.status_code in (200, 201), r.text
        entries = [
            e for e in _entries(c, via="api") if key in (e["resource_id"] or "") or key in e["path"]
        ]
    assert entries, "the write left no audit entry"
    assert entries[0]["method"] == "PUT"


def test_the_audit_log_needs_operator_read_and_is_read_only(acl_server, unique):
    with acl_server.client(token="") as anonymous:
        assert anonymous.get("/api/audit/").status_code == 403
    with acl_server.client() as c:
        assert c.put(f"/v1/kv/{unique('audit')}", content=b"x").status_code == 200
        first = _entries(c)[0]
        assert c.delete(f"/api/audit/{first['id']}/").status_code == 405
        assert c.put(f"/api/audit/{first['id']}/", json={}).status_code == 405


def test_a_refused_write_is_not_in_the_log(acl_server, unique):
    name = unique("refused")
    with acl_server.client(token="") as anonymous:
        assert anonymous.put("/v1/agent/service/register", json={"Name": name}).status_code == 403
    with acl_server.client() as c:
        assert _entries(c, resource_id=f"mesh-server/{name}") == []
