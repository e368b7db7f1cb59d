"""/api/instances/ against real servers: registration and deregistration go through
the same service layer as /v1 (same rows, same indexes, same wake-ups), bad input
is a 4xx JSON that stores nothing, and ACLs guard writes and filter reads."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow
OMIT = object()


def _create(http, body: dict, **kw) -> httpx.Response:
    return http.post("/api/instances/", json=body, **kw)


def _catalog(http, name: str, **params) -> list[dict]:
    r = http.get(f"/v1/catalog/service/{name}", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_an_instance_created_without_a_node_is_registered_on_the_servers_node(http, unique):
    name = unique("web")
    r = _create(
        http,
        {
            "name": name,
            "service_id": f"{name}-1",
            "port": 8080,
            "tags": ["v1"],
            "meta": {"team": "pay"},
            "checks": [{"name": "heartbeat", "ttl": "30s"}],
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["node"], body["agent_local"], body["status"]) == ("mesh-server", True, "critical")
    assert [c["check_id"] for c in body["checks"] if c["service_id"]] == [f"service:{name}-1"]
    agent = http.get(f"/v1/agent/service/{name}-1").json()
    assert (agent["Service"], agent["Port"], agent["Tags"], agent["Meta"]) == (
        name,
        8080,
        ["v1"],
        {"team": "pay"},
    )
    checks = http.get("/v1/agent/checks").json()
    assert checks[f"service:{name}-1"]["Status"] == "critical"
    assert checks[f"service:{name}-1"]["Type"] == "ttl"


def test_a_v1_registration_is_the_same_instance_through_api(http, unique):
    name, node = unique("api"), unique("node")
    r = http.put(
        "/v1/catalog/register",
        json={
            "Node": node,
            "Address": "10.9.0.1",
            "NodeMeta": {"rack": "r1"},
            "Service": {
                "Service": name,
                "ID": f"{name}-a",
                "Port": 9000,
                "Tags": ["blue"],
                "Meta": {"v": "2"},
                "Address": "10.9.0.2",
            },
            "Check": {"CheckID": f"{name}-c", "ServiceID": f"{name}-a", "Status": "warning"},
        },
    )
    assert r.status_code == 200
    v1 = _catalog(http, name)[0]
    health = http.get(f"/v1/health/service/{name}").json()[0]
    rows = http.get(f"/api/services/{name}/instances/").json()["results"]
    assert len(rows) == 1
    api = rows[0]
    assert (api["node"], api["datacenter"], api["service_id"], api["name"]) == (
        v1["Node"],
        v1["Datacenter"],
        v1["ServiceID"],
        v1["ServiceName"],
    )
    assert (api["address"], api["port"], api["tags"], api["meta"]) == (
        v1["ServiceAddress"],
        v1["ServicePort"],
        v1["ServiceTags"],
        v1["ServiceMeta"],
    )
    assert (api["create_index"], api["modify_index"]) == (v1["CreateIndex"], v1["ModifyIndex"])
    assert api["status"] == "warning"
    detail = http.get(f"/api/instances/{api['id']}/").json()
    assert [(c["check_id"], c["status"]) for c in detail["checks"]] == [
        (c["CheckID"], c["Status"]) for c in health["Checks"]
    ]
    node_api = http.get(f"/api/nodes/{node}/").json()
    node_v1 = http.get(f"/v1/catalog/node/{node}").json()["Node"]
    assert (node_api["address"], node_api["meta"], node_api["modify_index"]) == (
        node_v1["Address"],
        node_v1["Meta"],
        node_v1["ModifyIndex"],
    )


def test_an_instance_created_with_a_node_is_in_the_catalog_of_its_datacenter(http, unique):
    name, node, dc = unique("db"), unique("node"), unique("dc")
    assert http.post("/api/datacenters/", json={"name": dc, "provider": "aws"}).status_code == 201
    r = _create(
        http,
        {
            "name": name,
            "node": node,
            "node_address": "10.7.0.1",
            "datacenter": dc,
            "port": 5432,
            "checks": [{"name": "pg", "tcp": "10.7.0.1:5432", "interval": "10s"}],
        },
    )
    assert r.status_code == 201, r.text
    assert (r.json()["datacenter"], r.json()["agent_local"]) == (dc, False)
    assert _catalog(http, name) == []  # not in the server's own datacenter
    [entry] = _catalog(http, name, dc=dc)
    assert (entry["Node"], entry["Address"], entry["ServicePort"]) == (node, "10.7.0.1", 5432)
    [check] = http.get(f"/v1/health/checks/{name}", params={"dc": dc}).json()
    assert (check["CheckID"], check["Definition"]["TCP"], check["Interval"]) == (
        "pg",
        "10.7.0.1:5432",
        "10s",
    )
    # A second instance on the now existing node needs no address.
    r = _create(http, {"name": name, "service_id": f"{name}-2", "node": node, "port": 5433})
    assert r.status_code == 201, r.text
    assert len(_catalog(http, name, dc=dc)) == 2


def test_deleting_an_instance_deregisters_it_and_its_sidecar(http, unique):
    name = unique("pay")
    r = _create(http, {"name": name, "port": 7000, "connect": {"sidecar_service": {}}})
    assert r.status_code == 201, r.text
    instance = r.json()
    assert [s["ServiceID"] for s in _catalog(http, f"{name}-sidecar-proxy")] == [
        f"{name}-sidecar-proxy"
    ]
    r = http.delete(f"/api/instances/{instance['id']}/")
    assert (r.status_code, r.content) == (204, b"")
    assert _catalog(http, name) == []
    assert _catalog(http, f"{name}-sidecar-proxy") == []
    assert f"{name}" not in http.get("/v1/agent/services").json()
    r = http.get(f"/api/instances/{instance['id']}/")
    assert (r.status_code, r.json()) == (404, {"error": f"Instance {instance['id']} not found"})


def _block(http_url: str, path: str, index: int, out: dict) -> None:
    with httpx.Client(base_url=http_url, timeout=40) as c:
        started = time.monotonic()
        r = c.get(path, params={"index": index, "wait": "30s"})
        out.update(elapsed=time.monotonic() - started, response=r)


def _wakes(server, http, path: str, action) -> dict:
    """Run `action` while a /v1 blocking query on `path` waits; return what it answered."""
    index = int(http.get(path).headers["X-Consul-Index"])
    out: dict = {}
    waiter = threading.Thread(target=_block, args=(server.url, path, index, out))
    waiter.start()
    time.sleep(0.5)  # let the query park
    assert "response" not in out, "the blocking query returned before any change"
    action()
    waiter.join(35)
    assert not waiter.is_alive()
    assert out["elapsed"] < 10, out
    assert int(out["response"].headers["X-Consul-Index"]) > index
    return out


def test_creating_and_deleting_through_api_wakes_a_v1_blocking_query(server, http, unique):
    name = unique("live")
    created: dict = {}

    def create() -> None:
        created.update(_create(http, {"name": name, "port": 1234}).json())

    out = _wakes(server, http, f"/v1/health/service/{name}", create)
    assert [e["Service"]["ID"] for e in out["response"].json()] == [name]
    out = _wakes(
        server,
        http,
        f"/v1/health/service/{name}",
        lambda: http.delete(f"/api/instances/{created['id']}/"),
    )
    assert out["response"].json() == []


def test_a_kv_write_through_api_wakes_a_v1_blocking_read_of_the_key(server, http, unique):
    key = f"{unique('cfg')}/feature"
    http.put(f"/api/kv/{key}", json={"value": "off"})
    out = _wakes(
        server, http, f"/v1/kv/{key}", lambda: http.put(f"/api/kv/{key}", json={"value": "on"})
    )
    assert out["response"].json()[0]["Value"] == "b24="  # "on"


@pytest.mark.parametrize(
    ("body", "status", "expect"),
    [
        ({"name": OMIT, "port": 80}, 400, {"name": ["This field is required."]}),
        ({"name": 5}, 400, {"name": ["Not a valid string."]}),
        ({"port": "eighty"}, 400, {"port": ["A valid integer is required."]}),
        ({"port": 70000}, 400, {"port": ["Ensure this value is less than or equal to 65535."]}),
        ({"tags": "blue"}, 400, {"tags": ['Expected a list of items but got type "str".']}),
        ({"meta": {"k": 1}}, 400, {"meta.k": ["Not a valid string."]}),
        ({"checks": [{"ttl": "soon"}]}, 400, "checks[0].ttl"),
        ({"kind": "gateway"}, 400, {"kind": ['"gateway" is not a valid choice.']}),
        (
            {"node": "n", "node_address": "10.0.0.9", "datacenter": "nowhere"},
            400,
            {"datacenter": ['Unknown datacenter "nowhere"']},
        ),
        (
            {"node": "ghost-node"},
            400,
            {"node_address": ['required to create the node "ghost-node"']},
        ),
        ({"datacenter": "dc1"}, 400, {"datacenter": ["only valid together with node"]}),
        # Rules of the service layer, answered with its message.
        (
            {"kind": "connect-proxy", "port": 21000},
            400,
            "Proxy.DestinationServiceName must be set for a connect-proxy",
        ),
        (
            {"checks": [{"http": "http://127.0.0.1:1/", "tcp": "127.0.0.1:1", "interval": "5s"}]},
            400,
            "Invalid check: only one of HTTP, TCP, GRPC, TTL, alias may be set (got http, tcp)",
        ),
        (
            {"checks": [{"http": "http://127.0.0.1:1/"}]},
            400,
            "Invalid check: HTTP checks must have an Interval",
        ),
    ],
)
def test_bad_input_is_a_4xx_json_naming_the_problem_and_stores_nothing(
    http, unique, body, status, expect
):
    name = unique("bad")
    full = {k: v for k, v in {"name": name, **body}.items() if v is not OMIT}
    r = _create(http, full)
    assert r.status_code == status, r.text
    answer = r.json()
    if isinstance(expect, dict):
        assert answer["fields"] == expect
        assert answer["error"].startswith("Invalid request: ")
    elif expect.startswith("checks["):
        assert expect in answer["fields"]
    else:
        assert answer == {"error": expect}
    assert _catalog(http, name) == []
    assert name not in http.get("/v1/agent/services").json()


def test_malformed_json_and_wrong_media_types_are_refused(http, unique):
    name = unique("bad")
    r = http.post(
        "/api/instances/",
        content=b'{"name": "' + name.encode() + b'", ',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"].startswith("Invalid request body: JSON parse error")
    r = http.post("/api/instances/", content=b"name=x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert r.json() == {"error": 'Unsupported media type "text/plain" in request.'}
    assert _catalog(http, name) == []


def test_an_oversized_body_is_a_413_json_and_stores_nothing(server, http, unique):
    name = unique("big")
    body = json.dumps({"name": name, "meta": {"blob": "x" * (4 * 1024 * 1024)}}).encode()
    r = http.post("/api/instances/", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"].startswith(f"Request body ({len(body)} bytes) too large")
    assert _catalog(http, name) == []


def test_instances_are_filtered_by_node_tag_and_name(http, unique):
    name, node = unique("flt"), unique("node")
    for i, tags in enumerate([["a"], ["a", "b"], ["b"]]):
        body = {"name": name, "service_id": f"{name}-{i}", "tags": tags, "node": node}
        if i == 0:
            body["node_address"] = "10.3.0.1"
        assert _create(http, body).status_code == 201
    ids = lambda q: [r["service_id"] for r in http.get(f"/api/instances/?{q}").json()["results"]]  # noqa: E731
    assert ids(f"name={name}") == [f"{name}-0", f"{name}-1", f"{name}-2"]
    assert ids(f"name={name}&tag=a") == [f"{name}-0", f"{name}-1"]
    assert ids(f"node={node}&tag=a&tag=b") == [f"{name}-1"]
    assert ids(f"name={name}&ordering=-service_id&limit=1") == [f"{name}-2"]


# --- ACLs -------------------------------------------------------------------------------


def test_on_an_acl_server_anonymous_writes_are_refused_and_the_management_token_writes(
    acl_server, unique
):
    name = unique("web")
    with acl_server.client(token="") as anon:
        r = _create(anon, {"name": name, "port": 80})
        assert r.status_code == 403
        assert r.json()["error"].endswith(f"lacks permission 'service:write' on \"{name}\"")
        assert anon.get("/api/services/").json()["results"] == []
    with acl_server.client() as admin:
        assert _catalog(admin, name) == []
        r = _create(admin, {"name": name, "port": 80})
        assert r.status_code == 201, r.text
        assert [e["ServiceID"] for e in _catalog(admin, name)] == [name]


def test_on_an_acl_server_a_scoped_token_writes_and_sees_only_its_services(acl_server, unique):
    prefix = unique("team")
    with acl_server.client() as admin:
        rules = f'service_prefix "{prefix}-" {{ policy = "write" }}\nnode_prefix "" {{ policy = "read" }}'
        policy = admin.post("/api/acl/policies/", json={"name": prefix, "rules": rules}).json()
        token = admin.post("/api/acl/tokens/", json={"policies": [{"id": policy["id"]}]}).json()
        assert _create(admin, {"name": f"other-{prefix}", "port": 1}).status_code == 201
    with acl_server.client(token=token["secret_id"]) as scoped:
        assert _create(scoped, {"name": f"{prefix}-api", "port": 2}).status_code == 201
        r = _create(scoped, {"name": f"x-{prefix}", "port": 3})
        assert r.status_code == 403
        names = [s["name"] for s in scoped.get("/api/services/").json()["results"]]
        assert names == [f"{prefix}-api"]
        other = admin_instance_id(acl_server, f"other-{prefix}")
        assert scoped.get(f"/api/instances/{other}/").status_code == 404
        assert scoped.delete(f"/api/instances/{other}/").status_code == 404


def admin_instance_id(srv, name: str) -> int:
    with srv.client() as admin:
        return admin.get(f"/api/instances/?name={name}").json()["results"][0]["id"]
