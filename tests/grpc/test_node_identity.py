"""A joined node is exactly what its join token allows: its own name, the
services in its scope, a certificate bound to its node ID; revocation and
silence take it out of the mesh; failed joins are throttled."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from meshproto import pki, spiffe
from meshproto.proto import mesh_pb2
from tests.grpc.conftest import (
    Agent,
    acl_token,
    join_now,
    new_token,
    trust_domain,
    unique_node,
)
from tests.support.servers import make_server


def run(coro):
    return asyncio.run(coro)


def _refused(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        run(coro)
    return err.value


def _web(port: int = 8080, **extra) -> dict:
    return {"Name": "web", "Port": port, **extra}


def _server_services(server) -> set[str]:
    with server.client() as http:
        node = http.get("/v1/catalog/node/mesh-server").json()
    return set((node or {}).get("Services") or {})


def _signed_elsewhere(server, node: str, token: str | None = None) -> tuple[int, Agent]:
    """An agent holding a node certificate signed through `/api/ca/sign`."""
    agent = Agent(server, node)
    uri = spiffe.agent_id(trust_domain(server), node, "dc1").uri
    with server.client(token) as http:
        r = http.post("/api/ca/sign", json={"csr": pki.make_csr(agent.key, uri)})
    if r.status_code == 200:
        agent.cert_pem = r.json()["cert"] + "".join(r.json()["chain"])
    return r.status_code, agent


# --- item 3: node certificates only from the join flow --------------------------------------


def test_a_node_write_token_gets_no_node_certificate_from_the_ca_api(cp):
    token = acl_token(cp, 'node "n-esc" { policy = "write" }')
    status, _agent = _signed_elsewhere(cp, "n-esc", token)
    assert status == 403


def test_a_node_certificate_signed_outside_the_join_flow_is_refused_and_the_server_node_kept(cp):
    before = _server_services(cp)
    status, agent = _signed_elsewhere(cp, "mesh-server")  # the management token may sign it
    assert status == 200
    err = _refused(agent.sync([]))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not issued" in err.details()
    err = _refused(agent.call("SignLeaf", mesh_pb2.SignRequest(csr_pem="x", service="web")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _server_services(cp) == before


def test_an_agent_cannot_join_as_the_server_node(cp):
    err = _refused(Agent(cp, "mesh-server").join(new_token(cp)["token"], replace=True))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


# --- item 5: scope ---------------------------------------------------------------------------


def test_a_node_registers_and_gets_leaves_only_for_services_in_its_scope(cp):
    agent = join_now(cp, services=["web", "api-*"])
    assert list(agent.response.services) == ["web", "api-*"]
    run(agent.sync([_web(connect={"SidecarService": {}}), {"Name": "api-v2", "Port": 81}]))
    err = _refused(agent.sync([_web(), {"Name": "vault", "Port": 8200}]))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert 'may not register service "vault"' in err.details()
    assert "allows: web, api-*" in err.details()
    sneaky = {
        "Name": "web-proxy-2",
        "Kind": "connect-proxy",
        "Port": 21001,
        "Proxy": {"DestinationServiceName": "vault"},
    }
    assert _refused(agent.sync([sneaky])).code() == grpc.StatusCode.PERMISSION_DENIED
    td = trust_domain(cp)
    csr = pki.make_csr(pki.generate_key(), spiffe.service_id(td, "vault", "dc1").uri)
    err = _refused(agent.call("SignLeaf", mesh_pb2.SignRequest(csr_pem=csr, service="vault")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    csr = pki.make_csr(pki.generate_key(), spiffe.service_id(td, "web", "dc1").uri)
    leaf = run(agent.call("SignLeaf", mesh_pb2.SignRequest(csr_pem=csr, service="web")))
    assert leaf.serial
    with cp.client() as http:
        names = set(http.get(f"/v1/catalog/node/{agent.node}").json()["Services"])
        audit = http.get(
            "/api/audit/", params={"resource_id": agent.node, "action": "agent.scope.refuse"}
        ).json()["results"]
    assert names == {"web", "web-sidecar-proxy", "api-v2"}
    refused = [e for e in audit if e["action"] == "agent.scope.refuse"]
    assert {e["after"]["Service"] for e in refused} >= {"vault"}


def test_a_token_created_without_services_lets_its_node_register_none(cp):
    agent = join_now(cp, services=[])
    run(agent.sync([], checks=[{"CheckID": "disk", "Name": "disk", "TTL": "30s"}]))
    err = _refused(agent.sync([_web()]))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "allows: no services" in err.details()


def test_a_token_for_one_node_name_joins_only_that_name(cp):
    token = new_token(cp, node="only-this", uses=2)["token"]
    err = _refused(Agent(cp, unique_node()).join(token))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert 'the join token is for node "only-this"' in err.details()


def test_a_bad_scope_pattern_is_refused_with_the_field_named(cp):
    with cp.client() as http:
        r = http.post("/api/join-tokens/", json={"services": ["web", "a b"]})
    assert r.status_code == 400
    assert "services" in r.json()["error"]


# --- item 4: a live node's name ----------------------------------------------------------------


def test_a_live_nodes_name_is_refused_unless_replaced_and_the_old_certificate_stops(cp):
    first = join_now(cp)
    run(first.sync([_web()]))
    second = Agent(cp, first.node)
    err = _refused(second.join(new_token(cp)["token"]))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "-replace" in err.details()
    run(first.sync([_web(8081)]))  # the holder is untouched
    resp = run(second.join(new_token(cp)["token"], replace=True))
    assert resp.node_id != first.response.node_id
    err = _refused(first.sync([_web()]))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "replaced" in err.details()
    run(second.sync([_web(9090)]))
    with cp.client() as http:
        node = http.get(f"/v1/catalog/node/{first.node}").json()
    assert node["Node"]["ID"] == resp.node_id
    assert node["Services"]["web"]["Port"] == 9090


# --- item 6: revocation ----------------------------------------------------------------------


def test_revoking_a_token_with_its_nodes_refuses_them_and_keeps_them_out(cp):
    token = new_token(cp, uses=2)
    agents = [Agent(cp, unique_node()) for _ in range(2)]
    for a in agents:
        run(a.join(token["token"]))
        run(a.sync([_web()]))
    bystander = join_now(cp)
    run(bystander.sync([_web()]))
    with cp.client() as http:
        r = http.delete(f"/api/join-tokens/{token['id']}/", params={"nodes": "true"})
        assert r.status_code == 200 and r.json()["state"] == "revoked"
    for a in agents:
        err = _refused(a.sync([_web()]))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in err.details()
    with cp.client() as http:
        for a in agents:
            assert http.get(f"/v1/catalog/node/{a.node}").status_code == 404
        nodes = {i["Node"] for i in http.get("/v1/catalog/service/web").json()}
    assert bystander.node in nodes and not nodes & {a.node for a in agents}
    run(bystander.sync([_web()]))


# --- item 6: liveness and item 9: the join throttle -------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    srv = make_server(
        tmp_path_factory.mktemp("quick"),
        acl=True,
        extra_env={
            "MESH_NODE_LIVENESS_TIMEOUT": "3",
            "MESH_JOIN_FAILURE_BURST": "3",
            "MESH_JOIN_FAILURE_REFILL_SECONDS": "60",
        },
    )
    yield srv
    srv.close()


def _passing_nodes(server, service: str) -> set[str]:
    with server.client() as http:
        rows = http.get(f"/v1/health/service/{service}", params={"passing": "1"}).json()
    return {r["Node"]["Node"] for r in rows}


def _eventually(fn, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def test_a_silent_node_leaves_healthy_answers_and_comes_back_when_it_speaks(quick):
    agent = join_now(quick)
    run(agent.sync([{"Name": "quiet", "Port": 80}]))
    assert _passing_nodes(quick, "quiet") == {agent.node}
    assert _eventually(lambda: not _passing_nodes(quick, "quiet"))
    with quick.client() as http:
        checks = http.get(f"/v1/health/node/{agent.node}").json()
    serf = next(c for c in checks if c["CheckID"] == "serfHealth")
    assert serf["Status"] == "critical"
    run(agent.sync([{"Name": "quiet", "Port": 80}]))
    assert _passing_nodes(quick, "quiet") == {agent.node}


def test_failed_joins_from_one_address_are_throttled(quick):
    for _ in range(3):
        err = _refused(Agent(quick, unique_node()).join("0123456789abcdef.wrong"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    good = new_token(quick)["token"]
    err = _refused(Agent(quick, unique_node()).join(good))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many failed joins from 127.0.0.1" in err.details()
