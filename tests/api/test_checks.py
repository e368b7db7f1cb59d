"""/api/checks/: list with filters (status, node, service), retrieve."""

from __future__ import annotations

from registry.domain import catalog
from tests.api.conftest import register, results, token_with


def _setup():
    register("n1", "web", status="passing")
    register("n2", "web", status="critical", address="10.0.0.2")
    register("n2", "api", status="warning", address="10.0.0.2")
    catalog.catalog_register(
        {
            "Node": "n1",
            "Address": "10.0.0.1",
            "Check": {"CheckID": "mem", "Name": "Memory", "Status": "passing", "Notes": "n"},
        }
    )


def _ids(api, query: str = "") -> list[tuple[str, str]]:
    return [(c["node"], c["check_id"]) for c in results(api.get("/api/checks/" + query))]


def test_it_lists_checks_with_their_node_service_and_status(api):
    _setup()
    rows = results(api.get("/api/checks/"))
    assert [(c["node"], c["check_id"], c["status"], c["service_name"]) for c in rows] == [
        ("n1", "mem", "passing", ""),
        ("n1", "web-check", "passing", "web"),
        ("n2", "api-check", "warning", "api"),
        ("n2", "web-check", "critical", "web"),
    ]
    assert rows[0]["name"] == "Memory" and rows[0]["notes"] == "n"


def test_it_filters_checks_by_status_node_and_service(api):
    _setup()
    assert _ids(api, "?status=critical") == [("n2", "web-check")]
    assert _ids(api, "?status=warning&status=critical") == [
        ("n2", "api-check"),
        ("n2", "web-check"),
    ]
    assert _ids(api, "?node=n1") == [("n1", "mem"), ("n1", "web-check")]
    assert _ids(api, "?service=web") == [("n1", "web-check"), ("n2", "web-check")]
    assert _ids(api, "?service=web&status=passing") == [("n1", "web-check")]
    r = api.get("/api/checks/?status=sick")
    assert r.status_code == 400 and "status" in r.json()["fields"]


def test_it_orders_checks_by_status(api):
    _setup()
    rows = results(api.get("/api/checks/?ordering=status,check_id"))
    assert [c["status"] for c in rows] == ["critical", "passing", "passing", "warning"]


def test_it_retrieves_one_check_and_404s_an_unknown_one(api):
    _setup()
    first = results(api.get("/api/checks/?node=n2&service=api"))[0]
    body = api.get(f"/api/checks/{first['id']}/").json()
    assert (body["check_id"], body["status"], body["service_id"]) == ("api-check", "warning", "api")
    r = api.get("/api/checks/999999/")
    assert (r.status_code, r.json()) == (404, {"error": "Check 999999 not found"})


def test_a_scoped_token_sees_node_checks_of_readable_nodes_and_readable_services_only(acl_api):
    _setup()
    secret = token_with('node "n1" { policy = "read" }\nservice "api" { policy = "read" }')
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=secret)
    assert _ids(acl_api) == [("n1", "mem")]
