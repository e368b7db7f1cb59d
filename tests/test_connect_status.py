"""`mesh connect status`: sidecars per service with health and config versions, CA roots,
intentions — the domain read on the database, then API and CLI against a real server and
agent (the pushed/acked versions come from the live config stream)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from meshweb.commands.connect import render_text
from registry import decode
from registry.acl_rules import Authorizer, parse_rules
from registry.domain import catalog, connect_ca, intentions
from registry.domain.connect_status import connect_status
from registry.grpc.status import StreamedProxy
from tests.support.servers import ROOT, free_port

MANAGE = Authorizer.management()


def reg(raw: dict) -> None:
    catalog.catalog_register(decode.CATALOG_REGISTER(raw))


def register_app(service: str, node: str, address: str, port: int, status: str = "passing"):
    """An app instance with a check, and its sidecar, as an agent registers them."""
    reg(
        {
            "Node": node,
            "Address": address,
            "Service": {"ID": service, "Service": service, "Port": port},
            "Check": {
                "CheckID": f"service:{service}",
                "Name": "app",
                "Status": status,
                "ServiceID": service,
            },
        }
    )
    reg(
        {
            "Node": node,
            "Address": address,
            "Service": {
                "ID": f"{service}-sidecar-proxy",
                "Service": f"{service}-sidecar-proxy",
                "Kind": "connect-proxy",
                "Port": 21000,
                "Proxy": {"DestinationServiceName": service, "DestinationServiceID": service},
            },
        }
    )


@pytest.fixture
def mesh(db, settings):
    settings.MESH_ACL_ENABLED = True
    intentions.reset_caches()
    register_app("web", "host-a", "10.0.0.10", 8080)
    register_app("api", "host-b", "10.0.0.11", 9091)
    register_app("api", "host-c", "10.0.0.12", 9091, status="critical")
    reg({"Node": "host-x", "Address": "10.0.0.99", "Service": {"Service": "plain", "Port": 1}})
    intentions.upsert_exact(MANAGE, ("default", "web"), ("default", "api"), {"Action": "allow"})
    intentions.upsert_exact(MANAGE, ("default", "*"), ("default", "api"), {"Action": "deny"})
    yield
    intentions.reset_caches()


def proxies_of(data: dict, service: str) -> list[dict]:
    entries = [s for s in data["services"] if s["service"] == service]
    assert len(entries) == 1, data  # an AssertionError: `eventually` tries again
    return entries[0]["proxies"]


def test_it_lists_each_service_with_sidecars_and_their_health(mesh):
    data = connect_status(MANAGE, {}, set())
    assert [s["service"] for s in data["services"]] == ["api", "web"]  # `plain` has no sidecar
    api = proxies_of(data, "api")
    assert [(p["node"], p["address"], p["port"], p["health"]) for p in api] == [
        ("host-b", "10.0.0.11", 21000, "passing"),
        ("host-c", "10.0.0.12", 21000, "critical"),  # the app it fronts fails its check
    ]
    assert {"check_id": "service:api", "status": "critical", "service_id": "api"} in api[1][
        "checks"
    ]
    assert data["intentions"] == {"total": 2, "allow": 1, "deny": 1, "l7": 0}
    _index, roots = connect_ca.roots_json()
    assert data["ca"]["trust_domain"] == roots["TrustDomain"]
    assert [r["id"] for r in data["ca"]["roots"]] == [roots["ActiveRootID"]]
    assert data["ca"]["roots"][0]["active"] is True
    assert (data["datacenter"], data["server"]) == ("dc1", "mesh-server")


def test_it_shows_what_the_stream_pushed_and_the_agent_acked(mesh):
    streams = {
        ("host-a", "web-sidecar-proxy"): StreamedProxy(
            "host-a", "web-sidecar-proxy", 7, 7, 0, "", compiles=4
        ),
        ("host-b", "api-sidecar-proxy"): StreamedProxy(
            "host-b", "api-sidecar-proxy", 9, 5, 9, "bad inbound port"
        ),
    }
    data = connect_status(MANAGE, streams, {"host-a", "host-b"})
    [web] = proxies_of(data, "web")
    assert web["config"] == {
        "stream": "connected",
        "pushed_version": 7,
        "acked_version": 7,
        "nacked_version": 0,
        "error": "",
        "in_sync": True,
        "compiles": 4,
    }
    b, c = proxies_of(data, "api")
    assert (b["config"]["pushed_version"], b["config"]["acked_version"]) == (9, 5)
    assert b["config"]["in_sync"] is False and b["config"]["error"] == "bad inbound port"
    # No stream for host-c on this server.
    assert c["config"]["stream"] == "not connected here" and c["config"]["pushed_version"] == 0
    text = render_text(data)
    assert "rejected: bad inbound port" in text and "in sync" in text
    assert "not connected here" in text
    assert "Intentions: 2 (1 allow, 1 deny, 0 L7)" in text


def test_it_can_be_limited_to_one_service(mesh):
    data = connect_status(MANAGE, {}, set(), service="web")
    assert [s["service"] for s in data["services"]] == ["web"]
    assert connect_status(MANAGE, {}, set(), service="nope")["services"] == []


def test_a_token_sees_only_the_sidecars_and_intentions_it_may_read(mesh):
    authz = Authorizer.from_rules(
        [parse_rules('service "web" { policy = "read" } node_prefix "" { policy = "read" }')]
    )
    data = connect_status(authz, {}, set())
    assert [s["service"] for s in data["services"]] == ["web"]
    # Intentions count as `intentions:read` decides (reading web reads web -> api).
    assert data["intentions"]["total"] == intentions.visible(authz).count() >= 1
    no_nodes = Authorizer.from_rules([parse_rules('service_prefix "" { policy = "read" }')])
    assert connect_status(no_nodes, {}, set())["services"] == []
    anonymous = connect_status(Authorizer.deny_all(), {}, set())
    assert anonymous["services"] == []
    assert anonymous["intentions"]["total"] == 0


def test_a_caller_without_rights_sees_no_server_name_trust_domain_or_roots(mesh, settings):
    anonymous = connect_status(Authorizer.deny_all(), {}, set())
    assert anonymous == {
        "datacenter": settings.MESH_DC,  # public, as /v1/catalog/datacenters
        "server": None,
        "services": [],
        "ca": None,
        "intentions": {"total": 0, "allow": 0, "deny": 0, "l7": 0},
    }
    text = render_text(anonymous)
    assert "needs operator:read" in text and settings.MESH_NODE_NAME not in text
    node_reader = Authorizer.from_rules([parse_rules('node_prefix "" { policy = "read" }')])
    assert connect_status(node_reader, {}, set())["server"] == settings.MESH_NODE_NAME
    operator = Authorizer.from_rules([parse_rules('operator = "read"')])
    ca = connect_status(operator, {}, set())["ca"]
    assert ca["trust_domain"] and ca["roots"] and ca["active_root_id"]


# --------------------------------------------------------------------------- API and CLI


@pytest.mark.slow
def test_the_api_and_cli_show_the_versions_the_live_stream_pushed_and_the_agent_acked(
    tmp_path, unique
):
    from tests.agents.conftest import MeshAgent, eventually, start_server

    server = start_server(tmp_path / "cp", acl=True)
    r = server.client().post("/api/join-tokens/", json={"uses": 1, "services": ["api"]})
    assert r.status_code == 201, r.text
    token, pin = r.json()["token"], r.json()["ca_pin"]
    node = unique("node")
    agent = MeshAgent(
        server, tmp_path / "a" / "data", tmp_path / "a" / "config.d", node, token, pin
    )
    agent.config_dir.mkdir(parents=True)
    api_port = free_port()
    (agent.config_dir / "api.json").write_text(
        json.dumps(
            {
                "service": {
                    "name": "api",
                    "port": api_port,
                    "connect": {"sidecar_service": {"port": free_port()}},
                }
            }
        )
    )
    try:
        agent.start()

        def synced() -> dict:
            r = server.client().get("/api/connect/status/", params={"service": "api"})
            assert r.status_code == 200, r.text
            proxies = proxies_of(r.json(), "api")
            assert len(proxies) == 1, proxies
            proxy = proxies[0]
            assert proxy["node"] == node and proxy["config"]["in_sync"], proxy
            return proxy

        proxy = eventually(synced, timeout=30)
        first = proxy["config"]["acked_version"]
        assert first > 0 and proxy["config"]["stream"] == "connected"
        # An intention protecting api changes its config: a newer version is pushed and acked.
        r = server.client().put(
            "/v1/connect/intentions/exact",
            params={"source": "web", "destination": "api"},
            json={"Action": "allow"},
        )
        assert r.status_code == 200
        proxy = eventually(lambda: (p := synced())["config"]["acked_version"] > first and p)
        assert proxy["config"]["pushed_version"] == proxy["config"]["acked_version"]

        # Without a token: no sidecars (api is not readable), no CA state.
        anon = httpx.get(server.url + "/api/connect/status/", timeout=10).json()
        assert anon["services"] == [] and anon["ca"] is None

        out = subprocess.run(
            [sys.executable, "-m", "meshweb.cli", "connect", "status"],
            cwd=ROOT,
            env={**server.env, "MESH_HTTP_ADDR": server.addr, "MESH_HTTP_TOKEN": server.token},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "api-sidecar-proxy" in out.stdout and node in out.stdout
        assert "in sync" in out.stdout
        assert "Intentions: 1 (1 allow, 0 deny, 0 L7)" in out.stdout

        agent.stop()
        # The agent gone, its stream closed: the sidecar stays registered, not connected.
        assert eventually(lambda: _stream(server)) == "not connected here"
    finally:
        agent.stop()
        server.close()


def _stream(server) -> str:
    r = server.client().get("/api/connect/status/", params={"service": "api"})
    proxies = proxies_of(r.json(), "api")
    assert len(proxies) == 1, proxies
    state = proxies[0]["config"]["stream"]
    return state if state != "connected" else ""


@pytest.mark.slow
def test_an_anonymous_caller_of_the_api_learns_nothing_it_may_not_read(acl_server):
    with acl_server.client(token="") as anonymous:
        r = anonymous.get("/api/connect/status/")
    assert r.status_code == 200, r.text
    data = r.json()
    assert (data["server"], data["ca"], data["services"]) == (None, None, [])
    assert "mesh-server" not in r.text and ".mesh" not in r.text  # node name, trust domain
    with acl_server.client() as management:
        full = management.get("/api/connect/status/").json()
    assert full["server"] == "mesh-server" and full["ca"]["trust_domain"].endswith(".mesh")
