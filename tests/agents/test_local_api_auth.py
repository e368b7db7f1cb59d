"""The agent's local API: a token for writes and leaves, the node's scope, and
no answer to a `Host` that is not this agent (DNS rebinding)."""

from __future__ import annotations

import stat

import consul
import httpx
import pytest

from tests.agents.conftest import eventually

pytestmark = pytest.mark.slow


@pytest.fixture
def agent(make_agent):
    return make_agent(services=("web", "api-*"))


def _register(agent, body: dict, **headers) -> httpx.Response:
    return httpx.put(
        agent.url + "/v1/agent/service/register", json=body, headers=headers, timeout=30
    )


def test_the_agent_writes_its_token_readable_by_its_user_only(agent):
    path = agent.data_dir / "agent-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(agent.local_token) >= 32


def test_writes_need_the_token_reads_do_not(agent):
    r = _register(agent, {"Name": "web", "Port": 8080})
    assert r.status_code == 403
    assert "needs its token" in r.text and "agent-token" in r.text
    assert (
        _register(agent, {"Name": "web", "Port": 8080}, **{"X-Consul-Token": "guess"}).status_code
        == 403
    )
    assert httpx.get(agent.url + "/v1/agent/services", timeout=30).json() == {}
    bearer = {"Authorization": f"Bearer {agent.local_token}"}
    assert _register(agent, {"Name": "web", "Port": 8080}, **bearer).status_code == 200
    r = httpx.put(agent.url + "/v1/agent/service/deregister/web", timeout=30)
    assert r.status_code == 403
    assert "web" in httpx.get(agent.url + "/v1/agent/services", timeout=30).json()


def test_py_consul_works_with_the_token_and_is_refused_without(agent):
    with pytest.raises(consul.ACLPermissionDenied):
        agent.consul(token="").agent.service.register("web", port=8080)
    c = agent.consul()
    assert c.agent.service.register("api-v1", port=9000) is True
    assert "api-v1" in c.agent.services()


def test_a_service_outside_the_nodes_scope_is_refused_locally_and_gets_no_leaf(agent):
    with agent.client() as http:
        r = http.put("/v1/agent/service/register", json={"Name": "billing", "Port": 7000})
        assert r.status_code == 403
        assert 'does not allow service "billing"' in r.text
        assert "allows: web, api-*" in r.text
        r = http.get("/v1/agent/connect/ca/leaf/billing")
        assert r.status_code == 403
        assert "billing" not in http.get("/v1/agent/services").json()


def test_a_leaf_needs_the_token(agent):
    with agent.client() as http:
        assert (
            http.put("/v1/agent/service/register", json={"Name": "web", "Port": 1}).status_code
            == 200
        )
    r = httpx.get(agent.url + "/v1/agent/connect/ca/leaf/web", timeout=30)
    assert r.status_code == 403
    with agent.client() as http:
        leaf = eventually(
            lambda: (
                (r := http.get("/v1/agent/connect/ca/leaf/web")).status_code == 200 and r.json()
            ),
            timeout=60,
        )
    assert "PRIVATE KEY" in leaf["PrivateKeyPEM"] and leaf["Service"] == "web"


def test_a_host_header_that_is_not_this_agent_is_refused(agent):
    for host in ("evil.example", f"evil.example:{agent.http_port}", "rebind.127.0.0.1.nip.io"):
        r = httpx.get(agent.url + "/v1/agent/self", headers={"Host": host}, timeout=30)
        assert r.status_code == 421, host
        assert "DNS rebinding" in r.json()["error"]
    for host in (f"127.0.0.1:{agent.http_port}", f"localhost:{agent.http_port}"):
        r = httpx.get(agent.url + "/v1/agent/self", headers={"Host": host}, timeout=30)
        assert r.status_code == 200, host
