"""/api/ root, /api/schema/ (OpenAPI 3), /api/docs/ and /api/redoc/ served from the
server's own static files, the browsable API, and JSON 404s under /api/."""

from __future__ import annotations

import re

import pytest
import yaml

pytestmark = pytest.mark.slow

RESOURCES = [
    "/api/datacenters/",
    "/api/datacenters/{name}/",
    "/api/nodes/",
    "/api/nodes/{name}/",
    "/api/services/",
    "/api/services/{name}/",
    "/api/services/{name}/instances/",
    "/api/instances/",
    "/api/instances/{id}/",
    "/api/checks/",
    "/api/checks/{id}/",
    "/api/kv/",
    "/api/kv/{key}",
    "/api/acl/tokens/",
    "/api/acl/tokens/{accessor_id}/",
    "/api/acl/policies/",
    "/api/acl/policies/{id}/",
    "/api/acl/roles/",
    "/api/acl/roles/{id}/",
]
_ASSET = re.compile(r'<(?:script|link|img)\b[^>]*?\b(?:src|href)="([^"]*)"', re.I)


def test_the_root_lists_every_resource_and_the_docs(server, http):
    body = http.get("/api/").json()
    assert set(body) == {
        "datacenters",
        "nodes",
        "services",
        "instances",
        "checks",
        "kv",
        "acl/tokens",
        "acl/policies",
        "acl/roles",
        "schema",
        "docs",
        "redoc",
    }
    assert body["services"] == f"{server.url}/api/services/"
    assert body["kv"] == f"{server.url}/api/kv/"


def test_the_schema_is_openapi_3_with_every_resource_path(http):
    r = http.get("/api/schema/")
    assert r.status_code == 200
    schema = yaml.safe_load(r.text)
    assert schema["openapi"].startswith("3.")
    assert schema["info"]["title"] == "meshweb API"
    assert set(RESOURCES) <= set(schema["paths"])
    assert set(schema["paths"]["/api/kv/{key}"]) >= {"get", "put", "delete"}
    assert set(schema["paths"]["/api/instances/"]) == {"get", "post"}
    as_json = http.get("/api/schema/", params={"format": "json"}).json()
    assert as_json["paths"].keys() == schema["paths"].keys()
    schemes = as_json["components"]["securitySchemes"]
    assert schemes["consulToken"] == {"type": "apiKey", "in": "header", "name": "X-Consul-Token"}
    assert schemes["bearerToken"]["scheme"] == "bearer"


@pytest.mark.parametrize("page", ["/api/docs/", "/api/redoc/"])
def test_the_docs_load_only_this_servers_static_assets(http, page):
    r = http.get(page)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assets = _ASSET.findall(r.text)
    assert assets, r.text
    assert not re.search(r'(?:src|href)="(?:https?:)?//', r.text), "an asset from elsewhere"
    for url in assets:
        assert url.startswith("/static/"), url
        got = http.get(url)
        assert got.status_code == 200, url
        assert len(got.content) > 100
    assert any(u.endswith(".js") for u in assets)


def test_the_browsable_api_renders_html_with_local_assets(http):
    r = http.get("/api/services/", headers={"Accept": "text/html"})
    assert r.status_code == 200
    assert "<html" in r.text and "Service" in r.text
    assets = _ASSET.findall(r.text)
    assert assets and all(u.startswith("/static/rest_framework/") for u in assets)
    assert http.get(assets[0]).status_code == 200


def test_unknown_api_paths_are_json_404s(http):
    r = http.get("/api/no-such-thing/")
    assert (r.status_code, r.json()) == (404, {"error": "Not found: /api/no-such-thing/"})
    r = http.get("/api/services")
    assert r.json() == {
        "error": "Not found: /api/services (paths end with a slash: /api/services/)"
    }
