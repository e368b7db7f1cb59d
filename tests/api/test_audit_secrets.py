"""No secret reaches the audit log or a generated link, against a real `mesh server`.

The attack this guards against: a token with only `operator = "read"` lists
`/api/audit/`, finds another token's `SecretID` in an entry, and uses it.
"""

from __future__ import annotations

import json
import uuid

import pytest

pytestmark = pytest.mark.slow


def _operator_reader(server, unique) -> str:
    with server.client() as c:
        name = unique("audit-reader")
        r = c.put("/v1/acl/policy", json={"Name": name, "Rules": 'operator = "read"'})
        assert r.status_code == 200, r.text
        r = c.put("/v1/acl/token", json={"Policies": [{"Name": name}]})
        assert r.status_code == 200, r.text
        return r.json()["SecretID"]


def _whole_log(server, token: str, min_index: int) -> str:
    """Every audit entry written since `min_index`, as one JSON text."""
    with server.client(token=token) as c:
        r = c.get("/api/audit/", params={"min_index": min_index, "limit": 1000})
    assert r.status_code == 200, r.text
    assert r.json()["results"], "the writes left no audit entry"
    return json.dumps(r.json()["results"])


def test_an_operator_reader_finds_no_token_secret_in_the_audit_log(acl_server, unique):
    reader = _operator_reader(acl_server, unique)
    secret = str(uuid.uuid4())
    with acl_server.client() as c:
        start = int(c.get("/v1/status/leader").headers.get("X-Consul-Index", "0") or 0)
        name = unique("db-readers")
        rules = 'key_prefix "secret/" { policy = "read" }'
        assert c.put("/v1/acl/policy", json={"Name": name, "Rules": rules}).status_code == 200
        r = c.put("/v1/acl/token", json={"SecretID": secret, "Policies": [{"Name": name}]})
        assert r.status_code == 200, r.text
        accessor = r.json()["AccessorID"]
        r = c.put(f"/v1/acl/token/{accessor}", json={"SecretID": secret, "Description": "db"})
        assert r.status_code == 200, r.text
        r = c.post("/api/acl/tokens/", json={"secret_id": str(uuid.uuid4()), "description": "x"})
        assert r.status_code == 201, r.text
        api_secret = r.json()["secret_id"]
        # The token in the query string of a write must not be kept in its path either.
        r = c.put(f"/v1/kv/{unique('plain')}?token={acl_server.token}", content=b"v")
        assert r.status_code == 200, r.text
    log = _whole_log(acl_server, reader, start)
    assert "SecretID" in log or accessor in log  # the writes are there...
    assert secret not in log  # ...but never their secrets
    assert api_secret not in log
    assert acl_server.token not in log


def test_kv_values_under_sensitive_prefixes_never_reach_the_audit_log(acl_server, unique):
    reader = _operator_reader(acl_server, unique)
    password = f"hunter2-{uuid.uuid4().hex}"
    key = f"secret/{unique('db-password')}"
    with acl_server.client() as c:
        r = c.put(f"/v1/kv/{key}", content=password.encode())
        assert r.status_code == 200, r.text
        entry = c.get(f"/v1/kv/{key}").json()[0]
        r = c.put(f"/api/kv/{key}", json={"value": password + "-2"})
        assert r.status_code in (200, 201), r.text
        assert c.delete(f"/v1/kv/{key}").status_code == 200
    log = _whole_log(acl_server, reader, entry["CreateIndex"])
    assert key in log  # who wrote which key is recorded...
    assert password not in log  # ...never the value
    assert "hunter2" not in log


def _paged_links(response) -> list[str]:
    body = response.json()
    return [link for link in (body.get("next"), body.get("previous")) if link]


def test_pagination_links_never_echo_the_token(acl_server, unique):
    token = acl_server.token
    with acl_server.client() as c:
        for _ in range(3):  # at least three entries: a middle page has both links
            assert c.put(f"/v1/kv/{unique('page')}", content=b"x").status_code == 200
    with acl_server.client(token="") as c:
        first = c.get("/api/audit/", params={"token": token, "limit": 1})
        assert first.status_code == 200, first.text
        second = c.get("/api/audit/", params={"token": token, "limit": 1, "offset": 1})
        assert second.status_code == 200, second.text
    links = _paged_links(first) + _paged_links(second)
    assert len(links) == 3, links  # next, and next + previous
    assert all("limit=1" in link for link in links)
    assert not any(token in link or "token=" in link for link in links)


def test_the_browsable_api_never_echoes_the_token(acl_server):
    token = acl_server.token
    with acl_server.client(token="") as c:
        r = c.get(
            "/api/acl/tokens/", params={"token": token, "limit": 1}, headers={"Accept": "text/html"}
        )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "limit=1" in r.text  # links built from the request are there...
    assert token not in r.text  # ...without the token
    assert "token=" not in r.text
