"""/v1 agent, catalog and health endpoints: Consul's wire habits and bad input."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _services(http) -> dict:
    return http.get("/v1/agent/services").json()


def test_success_is_200_with_an_empty_body_for_agent_writes(http, unique):
    name = unique("web")
    r = http.put("/v1/agent/service/register", json={"Name": name, "Port": 80})
    assert (r.status_code, r.content) == (200, b"")
    r = http.put(f"/v1/agent/service/deregister/{name}")
    assert (r.status_code, r.content) == (200, b"")


def test_catalog_writes_answer_true(http, unique):
    node = unique("node")
    r = http.put("/v1/catalog/register", json={"Node": node, "Address": "10.1.1.1"})
    assert (r.status_code, r.json()) == (200, True)
    r = http.put("/v1/catalog/deregister", json={"Node": node})
    assert (r.status_code, r.json()) == (200, True)


def test_reads_carry_consul_index_headers_even_on_404(http, unique):
    r = http.get(f"/v1/catalog/node/{unique('missing')}")
    assert r.status_code == 404
    assert int(r.headers["X-Consul-Index"]) >= 1
    assert r.headers["X-Consul-KnownLeader"] == "true"
    assert r.headers["X-Consul-LastContact"] == "0"


def test_snake_case_bodies_register_like_consul_names(http, unique):
    name = unique("snake")
    r = http.put(
        "/v1/agent/service/register",
        json={
            "name": name,
            "port": 81,
            "tags": ["a"],
            "check": {"ttl": "10s", "check_id": f"{name}-ttl"},
        },
    )
    assert r.status_code == 200, r.text
    assert _services(http)[name]["Port"] == 81
    assert f"{name}-ttl" in http.get("/v1/agent/checks").json()


def test_replace_existing_checks_drops_checks_not_in_the_new_definition(http, unique):
    name = unique("replace")
    body = {
        "Name": name,
        "Checks": [{"CheckID": f"{name}-a", "TTL": "10s"}, {"CheckID": f"{name}-b", "TTL": "10s"}],
    }
    http.put("/v1/agent/service/register", json=body)
    body["Checks"] = [{"CheckID": f"{name}-a", "TTL": "10s"}]
    http.put("/v1/agent/service/register?replace-existing-checks=true", json=body)
    checks = [c for c in http.get("/v1/agent/checks").json() if c.startswith(name)]
    assert checks == [f"{name}-a"]


def test_tag_filters_select_instances(http, unique):
    name = unique("tagged")
    http.put(
        "/v1/agent/service/register",
        json={"Name": name, "ID": f"{name}-1", "Port": 1, "Tags": ["blue"]},
    )
    http.put(
        "/v1/agent/service/register",
        json={"Name": name, "ID": f"{name}-2", "Port": 2, "Tags": ["green"]},
    )
    r = http.get(f"/v1/catalog/service/{name}?tag=green")
    assert [s["ServiceID"] for s in r.json()] == [f"{name}-2"]
    r = http.get(f"/v1/health/service/{name}?tag=blue")
    assert [e["Service"]["ID"] for e in r.json()] == [f"{name}-1"]


def test_health_state_lists_critical_checks(http, unique):
    name = unique("crit")
    http.put("/v1/agent/service/register", json={"Name": name, "Check": {"TTL": "10s"}})
    critical = http.get("/v1/health/state/critical").json()
    assert f"service:{name}" in [c["CheckID"] for c in critical]
    passing = http.get("/v1/health/state/passing").json()
    assert f"service:{name}" not in [c["CheckID"] for c in passing]


def test_agent_health_by_id_answers_with_the_aggregated_status_code(http, unique):
    name = unique("aggr")
    http.put("/v1/agent/service/register", json={"Name": name, "Check": {"TTL": "10s"}})
    r = http.get(f"/v1/agent/health/service/id/{name}")
    assert (r.status_code, r.json()["AggregatedStatus"]) == (503, "critical")
    http.put(f"/v1/agent/check/pass/service:{name}")
    r = http.get(f"/v1/agent/health/service/id/{name}")
    assert (r.status_code, r.json()["AggregatedStatus"]) == (200, "passing")


def test_check_update_sets_status_and_output(http, unique):
    name = unique("upd")
    http.put("/v1/agent/service/register", json={"Name": name, "Check": {"TTL": "10s"}})
    r = http.put(
        f"/v1/agent/check/update/service:{name}", json={"Status": "warning", "Output": "slow"}
    )
    assert r.status_code == 200
    check = http.get("/v1/agent/checks").json()[f"service:{name}"]
    assert (check["Status"], check["Output"]) == ("warning", "slow")


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{", 400, "invalid JSON"),
        (b"\xff\xfe{}", 400, "not valid UTF-8"),
        (b'{"Name": "x", "Port": "eighty"}', 400, "Port: expected integer"),
        (b'{"Name": "x", "Tags": "a"}', 400, "Tags: expected list"),
        (b'{"Port": 80}', 400, "Missing service name"),
        (b'{"Name": "x", "Port": 70000}', 400, "Invalid service port"),
        (b'{"Name": "x", "Kind": "spaceship"}', 400, "Invalid service kind"),
        (b'{"Name": "x", "Check": {"Name": "c"}}', 400, "must provide one of HTTP, TCP, GRPC, TTL"),
        (
            b'{"Name": "x", "Check": {"Args": ["/bin/true"], "Interval": "5s"}}',
            400,
            "script checks are not supported",
        ),
        (
            b'{"Name": "x", "Check": {"HTTP": "http://a", "TCP": "a:1", "Interval": "5s"}}',
            400,
            "only one of",
        ),
        (b'{"Name": "x", "Check": {"HTTP": "http://a"}}', 400, "must have an Interval"),
        (b'{"Name": "x", "Check": {"TTL": "10s", "Status": "great"}}', 400, "Invalid check status"),
        (b'{"Name": "x", "Kind": "connect-proxy", "Port": 1}', 400, "DestinationServiceName"),
    ],
)
def test_bad_service_registrations_are_refused_with_a_named_reason(http, body, status, message):
    r = http.put("/v1/agent/service/register", content=body)
    assert r.status_code == status
    assert message in r.text
    assert r.headers["content-type"].startswith("text/plain")


def test_a_registration_failing_on_its_second_check_stores_nothing(http, unique):
    name = unique("atomic")
    body = {
        "Name": name,
        "Port": 1,
        "Checks": [{"TTL": "10s"}, {"HTTP": "ftp://nope", "Interval": "5s"}],
    }
    r = http.put("/v1/agent/service/register", json=body)
    assert r.status_code == 400
    assert name not in _services(http)
    assert not [c for c in http.get("/v1/agent/checks").json() if name in c]
    assert http.get(f"/v1/catalog/service/{name}").json() == []


def test_a_catalog_registration_with_a_bad_check_stores_no_node(http, unique):
    node = unique("node")
    body = {
        "Node": node,
        "Address": "10.2.2.2",
        "Service": {"Service": unique("svc"), "Port": 1},
        "Checks": [{"CheckID": "c1", "Status": "passing"}, {"CheckID": "c2", "Status": "bogus"}],
    }
    r = http.put("/v1/catalog/register", json=body)
    assert r.status_code == 400 and "Invalid check status" in r.text
    assert http.get(f"/v1/catalog/node/{node}").status_code == 404


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("index=-1", "Invalid index"),
        ("index=abc", "Invalid index"),
        ("index=99999999999999999999999", "out of range"),
        ("index=5&wait=forever", "Invalid wait time"),
        ("passing=maybe", "is not a boolean"),
        ("filter=Service.Port%20%3D%3D", "Failed to create boolean expression evaluator"),
        ("node-meta=nocolon", "Invalid node-meta filter"),
    ],
)
def test_bad_query_parameters_are_400s(http, query, message):
    r = http.get(f"/v1/health/service/web?{query}")
    assert r.status_code == 400
    assert message in r.text


def test_an_oversized_body_is_413(http):
    r = http.put("/v1/agent/service/register", content=b"x" * (5 * 1024 * 1024))
    assert r.status_code == 413
    assert "too large" in r.text


def test_an_unknown_datacenter_is_404(http):
    r = http.get("/v1/catalog/services?dc=mars")
    assert r.status_code == 404 and "No path to datacenter" in r.text


def test_unknown_paths_and_wrong_methods(http):
    assert http.get("/v1/catalog/nothing-here/x").status_code == 404
    r = http.get("/v1/agent/service/register")
    assert r.status_code == 405


def test_ttl_updates_on_unknown_or_non_ttl_checks_are_refused(http, unique):
    assert http.put(f"/v1/agent/check/pass/{unique('nope')}").status_code == 404
    name = unique("tcp")
    http.put(
        "/v1/agent/check/register",
        json={"Name": name, "CheckID": name, "TCP": "127.0.0.1:9", "Interval": "30s"},
    )
    r = http.put(f"/v1/agent/check/pass/{name}")
    assert r.status_code == 400 and "does not have associated TTL" in r.text
    http.put(f"/v1/agent/check/deregister/{name}")
