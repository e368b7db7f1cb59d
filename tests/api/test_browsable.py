"""The browsable API: every /api endpoint renders as HTML, with forms for its writes."""

from __future__ import annotations

from registry.domain import kv
from tests.api.conftest import MANAGEMENT, register


def test_every_endpoint_renders_in_the_browsable_api(acl_api):
    register("n1", "web")
    kv.put("a/b", b"x")
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    first = lambda path, field: acl_api.get(path).json()["results"][0][field]  # noqa: E731
    pages = [
        "/api/",
        "/api/datacenters/",
        "/api/datacenters/dc1/",
        "/api/nodes/",
        "/api/nodes/n1/",
        "/api/services/",
        "/api/services/web/",
        "/api/services/web/instances/",
        "/api/instances/",
        f"/api/instances/{first('/api/instances/', 'id')}/",
        "/api/checks/",
        f"/api/checks/{first('/api/checks/', 'id')}/",
        "/api/kv/",
        "/api/kv/a/b",
        "/api/acl/tokens/",
        f"/api/acl/tokens/{first('/api/acl/tokens/', 'accessor_id')}/",
        "/api/acl/policies/",
        f"/api/acl/policies/{first('/api/acl/policies/', 'id')}/",
    ]
    for page in pages:
        r = acl_api.get(page, HTTP_ACCEPT="text/html")
        assert r.status_code == 200, page
        assert r["Content-Type"].startswith("text/html")


def test_write_forms_show_the_input_fields(acl_api):
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=MANAGEMENT)
    html = acl_api.get("/api/datacenters/", HTTP_ACCEPT="text/html").content.decode()
    assert 'name="provider"' in html and 'name="region"' in html
    html = acl_api.get("/api/instances/", HTTP_ACCEPT="text/html").content.decode()
    assert 'name="node_address"' in html
