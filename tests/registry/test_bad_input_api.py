"""Hostile bodies get a 400 naming the field, never a 500 (issue 12, findings 7 and 8).

Before: 100k `[` or 50k `{"a":` raised RecursionError on 16 write endpoints (an HTML
500 page on `/api`); NaN, LockDelay 1e30, ExpirationTTL 1e30 and deep JSON policy
rules were 500s; a chunked `PUT /api/kv/...` answered 200 and stored null.
"""

from __future__ import annotations

import json
import uuid

import pytest
from django.test import RequestFactory

pytestmark = pytest.mark.slow

DEEP_LISTS = b"[" * 100_000
DEEP_OBJECTS = b'{"a":' * 50_000

V1_WRITES = [
    ("PUT", "/v1/agent/service/register"),
    ("PUT", "/v1/agent/check/register"),
    ("PUT", "/v1/agent/check/update/some-check"),
    ("PUT", "/v1/catalog/register"),
    ("PUT", "/v1/catalog/deregister"),
    ("PUT", "/v1/acl/token"),
    ("PUT", "/v1/acl/policy"),
    ("PUT", "/v1/acl/bootstrap"),
    ("PUT", "/v1/session/create"),
    ("PUT", "/v1/config"),
    ("POST", "/v1/connect/intentions"),
    ("PUT", "/v1/connect/intentions/exact?source=a&destination=b"),
    ("POST", "/v1/agent/connect/authorize"),
    ("PUT", "/v1/connect/ca/configuration"),
    ("POST", "/v1/discovery-chain/web"),
]
API_WRITES = [
    ("POST", "/api/acl/tokens/"),
    ("POST", "/api/acl/policies/"),
    ("PUT", "/api/kv/deep/key"),
    ("POST", "/api/join-tokens/"),
    ("POST", "/api/intentions/"),
    ("POST", "/api/ca/sign/"),
]


@pytest.fixture
def admin(acl_server):
    with acl_server.client() as c:
        c.headers["Content-Type"] = "application/json"
        yield c


def _index(admin) -> int:
    return int(admin.get("/v1/kv/", params={"recurse": "1"}).headers["X-Consul-Index"])


@pytest.mark.parametrize("body", [DEEP_LISTS, DEEP_OBJECTS], ids=["lists", "objects"])
def test_deeply_nested_bodies_are_a_400_on_every_write_endpoint(admin, body):
    before = _index(admin)
    for method, path in V1_WRITES:
        r = admin.request(method, path, content=body)
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        assert "nested deeper than 64 levels" in r.text, path
    for method, path in API_WRITES:
        r = admin.request(method, path, content=body)
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        assert r.headers["Content-Type"].startswith("application/json"), path
        assert "nested deeper than 64 levels" in r.json()["error"], path
    assert _index(admin) == before  # nothing was written


@pytest.mark.parametrize(
    "method, path, body, field",
    [
        ("PUT", "/v1/acl/token", b'{"Description": NaN}', "Description"),
        ("PUT", "/v1/acl/token", b'{"ExpirationTTL": NaN}', "ExpirationTTL"),
        ("PUT", "/v1/acl/token", b'{"ExpirationTTL": 1e30}', "ExpirationTTL"),
        ("PUT", "/v1/acl/token", b'{"ExpirationTTL": "99999999999h"}', "ExpirationTTL"),
        ("POST", "/api/acl/tokens/", b'{"description": NaN}', "description"),
        ("PUT", "/v1/session/create", b'{"LockDelay": 1e30}', "LockDelay"),
        ("PUT", "/v1/session/create", b'{"LockDelay": "99999999999h"}', "LockDelay"),
        ("PUT", "/v1/session/create", b'{"LockDelay": "61s"}', "LockDelay"),
        ("POST", "/api/join-tokens/", b'{"uses": 1e30}', "uses"),
        ("POST", "/api/join-tokens/", b'{"uses": 3000000000}', "uses"),
        ("POST", "/api/join-tokens/", b'{"uses": 100000000000000000000000000000}', "uses"),
        ("PUT", "/v1/agent/service/register", b'{"Name": "x", "Port": 1e999}', "Port"),
    ],
)
def test_bad_numbers_are_a_400_naming_the_field(admin, method, path, body, field):
    before = _index(admin)
    r = admin.request(method, path, content=body)
    assert r.status_code == 400, r.text
    message = r.json()["error"] if path.startswith("/api/") else r.text
    assert field in message
    assert _index(admin) == before


@pytest.mark.parametrize(
    "path, name_field, rules_field",
    [
        ("/v1/acl/policy", "Name", "Rules"),
        ("/api/acl/policies/", "name", "rules"),
    ],
)
def test_deep_json_policy_rules_are_a_400(admin, path, name_field, rules_field):
    name = f"deep-{uuid.uuid4().hex[:8]}"
    for rules in ("[" * 5000, '{"key": ' * 3000):
        r = admin.request(
            "PUT" if path.startswith("/v1") else "POST",
            path,
            json={name_field: name, rules_field: rules},
        )
        assert r.status_code == 400, r.text[:300]
        assert "nested deeper than 64 levels" in r.text
    assert admin.get(f"/v1/acl/policy/name/{name}").status_code in (403, 404)


def test_a_chunked_api_body_is_read_and_stored(admin):
    def chunks():
        yield b'{"value":'
        yield b'"hello"}'

    r = admin.put("/api/kv/chunk/test", content=chunks())
    assert r.status_code == 200, r.text
    assert r.json()["value"] == "hello"
    assert admin.get("/v1/kv/chunk/test", params={"raw": "1"}).content == b"hello"


def test_a_chunked_v1_body_is_read_and_stored(admin):
    def chunks():
        yield b"wor"
        yield b"ld"

    r = admin.put("/v1/kv/chunk/v1", content=chunks())
    assert r.status_code == 200, r.text
    assert admin.get("/v1/kv/chunk/v1", params={"raw": "1"}).content == b"world"


def test_an_oversized_chunked_api_body_is_a_json_413(admin, acl_server):
    def chunks():
        for _ in range(5):
            yield b"x" * (1024 * 1024)

    before = _index(admin)
    r = admin.put("/api/kv/chunk/huge", content=chunks())
    assert r.status_code == 413
    assert "too large" in r.json()["error"]
    assert _index(admin) == before


def test_api_errors_outside_drf_are_json(settings):
    from registry.api import errors

    request = RequestFactory().get("/api/anything/")
    response = errors.server_error(request)
    assert response.status_code == 500
    assert json.loads(response.content) == {"error": "Internal server error"}
    response = errors.page_not_found(RequestFactory().get("/api/nope"), Exception())
    assert response.status_code == 404
    assert "Not found" in json.loads(response.content)["error"]
    assert b"<html" in errors.server_error(RequestFactory().get("/ui/")).content.lower()


@pytest.mark.parametrize(
    "method, path, body, field",
    [
        ("PUT", "/v1/agent/service/register", {"Name": "a\u0000b"}, "Name"),
        ("PUT", "/v1/agent/service/register", {"Name": "ab", "Meta": {"k": "v\u0000"}}, "Meta.k"),
        ("PUT", "/v1/acl/token", {"Description": "d\u0000"}, "Description"),
        ("PUT", "/v1/session/create", {"Name": "\u0000"}, "Name"),
        ("PUT", "/v1/catalog/register", {"Node": "n\u0000", "Address": "127.0.0.1"}, "Node"),
        ("POST", "/api/acl/tokens/", {"description": "\u0000"}, "description"),
    ],
)
def test_nul_characters_in_a_body_are_a_400_naming_the_field(admin, method, path, body, field):
    """PostgreSQL text cannot hold NUL: it failed deep in the write, a 500."""
    before = _index(admin)
    r = admin.request(method, path, json=body)
    assert r.status_code == 400, r.text
    assert field in r.text and "NUL" in r.text
    assert _index(admin) == before


@pytest.mark.parametrize(
    "path",
    [
        "/v1/catalog/service/a%00b",
        "/v1/kv/a%00b",
        "/v1/acl/token/%00",
        "/v1/health/service/web?node-meta=a:%00",
        "/api/nodes/%00/",
        "/api/acl/tokens/%00/",
    ],
)
def test_a_nul_in_the_url_is_a_400(admin, path):
    r = admin.get(path)
    assert r.status_code == 400, r.text
    assert "NUL" in r.text
    if path.startswith("/api/"):
        assert "NUL" in r.json()["error"]


@pytest.mark.parametrize(
    "path", ["/api/instances/abc/", "/api/instances/99999999999999999999999/", "/api/checks/x/"]
)
def test_an_id_that_cannot_be_a_row_is_a_404(admin, path):
    assert admin.get(path).status_code == 404
    if path.startswith("/api/instances/"):
        assert admin.delete(path).status_code == 404
