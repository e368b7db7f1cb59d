"""`mesh agent` as a real process against a real `mesh server`: join, sync, checks, API."""

from __future__ import annotations

import http.server
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from meshproto import pki
from tests.agents.conftest import MeshAgent, eventually, join_token
from tests.support.servers import ROOT

pytestmark = pytest.mark.slow


def catalog_services(server, node: str) -> dict:
    r = server.client().get(f"/v1/catalog/node-services/{node}")
    if r.status_code == 404:
        return {}
    r.raise_for_status()
    return {s["ID"]: s for s in r.json()["Services"]}


def node_checks(server, node: str) -> dict:
    r = server.client().get(f"/v1/health/node/{node}")
    r.raise_for_status()
    return {c["CheckID"]: c for c in r.json()}


class Health:
    """A local HTTP endpoint whose answer the test flips (200 or 500)."""

    def __init__(self) -> None:
        self.status = 200
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = b"ok" if owner.status == 200 else b"broken"
                self.send_response(owner.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def health_endpoint():
    h = Health()
    yield h
    h.close()


def test_an_agent_joins_with_a_token_and_the_pin(control_plane, make_agent):
    agent = make_agent(extra=["-node-meta", "rack:r1"])
    ident = agent.data_dir / "identity"
    for name in ("node.key", "node.crt", "roots.pem", "identity.json"):
        assert stat.S_IMODE(os.stat(ident / name).st_mode) == 0o600
    cert = pki.load_cert((ident / "node.crt").read_text())
    meta = json.loads((ident / "identity.json").read_text())
    assert pki.spiffe_id_of(cert) == (
        f"spiffe://{meta['trust_domain']}/agent/client/dc/{meta['datacenter']}/id/{agent.node}"
    )
    node = control_plane.client().get(f"/v1/catalog/node/{agent.node}").json()
    assert node["Node"]["Address"] == "127.0.0.1"
    assert node["Node"]["Meta"] == {"mesh-role": "agent", "rack": "r1"}
    me = agent.client().get("/v1/agent/self").json()
    assert me["Config"]["NodeName"] == agent.node
    assert me["Config"]["NodeID"] == node["Node"]["ID"]


def test_a_restarted_agent_reuses_its_identity_without_a_token(control_plane, make_agent):
    agent = make_agent()
    cert_before = (agent.data_dir / "identity" / "node.crt").read_text()
    agent.stop()
    agent.token = agent.pin = ""  # a used single-use token would be refused anyway
    agent.start()
    assert (agent.data_dir / "identity" / "node.crt").read_text() == cert_before
    eventually(lambda: agent.metrics().count("mesh_agent_connected 1"))


def test_a_wrong_pin_is_refused_with_a_clear_message(control_plane, tmp_path):
    token, _pin = join_token(control_plane)
    agent = MeshAgent(
        control_plane,
        tmp_path / "data",
        tmp_path / "config.d",
        "wrong-pin",
        token=token,
        pin="sha256:" + "ab" * 32,
    )
    agent.start(wait=False)
    code = agent.proc.wait(60)
    assert code != 0
    assert "-ca-pin sha256:" + "ab" * 32 + " matches no certificate" in agent.log()
    assert "refusing to join" in agent.log()
    assert not (agent.data_dir / "identity" / "node.crt").exists()
    assert control_plane.client().get("/v1/catalog/node/wrong-pin").status_code == 404


def test_a_used_up_token_is_refused_with_the_control_planes_reason(control_plane, tmp_path):
    token, pin = join_token(control_plane)  # single use
    first = MeshAgent(
        control_plane, tmp_path / "a", tmp_path / "a.d", "first-user", token=token, pin=pin
    )
    first.start()
    try:
        second = MeshAgent(
            control_plane, tmp_path / "b", tmp_path / "b.d", "second-user", token=token, pin=pin
        )
        second.start(wait=False)
        assert second.proc.wait(60) != 0
        assert "the control plane refused to join" in second.log()
        assert "used up" in second.log()
    finally:
        first.stop()


def test_bad_flags_stop_start_up_naming_the_flag(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshweb.cli",
            "agent",
            "-data-dir",
            str(tmp_path),
            "-join",
            "x:1",
            "-join-token",
            "t",
            "-ca-pin",
            "md5:1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("mesh agent: -ca-pin: expected sha256:<64 hex digits>")


WEB_JSON = {
    "service": {
        "name": "web",
        "port": 9090,
        "connect": {
            "sidecar_service": {
                "proxy": {"upstreams": [{"destination_name": "api", "local_bind_port": 9191}]}
            }
        },
    }
}
API_YAML = """
service:
  name: api
  port: 9091
  tags: [v2]
  connect:
    sidecar_service: {}
"""


def test_services_from_the_config_dir_appear_in_the_catalog_with_their_sidecars(
    control_plane, make_agent
):
    agent = make_agent(files={"web.json": json.dumps(WEB_JSON), "api.yaml": API_YAML})
    services = eventually(
        lambda: (s := catalog_services(control_plane, agent.node)) and len(s) == 4 and s
    )
    assert sorted(services) == ["api", "api-sidecar-proxy", "web", "web-sidecar-proxy"]
    web_proxy = services["web-sidecar-proxy"]
    assert web_proxy["Kind"] == "connect-proxy"
    assert 21000 <= web_proxy["Port"] <= 21255
    assert web_proxy["Proxy"]["DestinationServiceName"] == "web"
    assert web_proxy["Proxy"]["LocalServicePort"] == 9090
    assert [
        (u["DestinationName"], u["LocalBindPort"]) for u in web_proxy["Proxy"]["Upstreams"]
    ] == [("api", 9191)]
    assert services["api"]["Tags"] == ["v2"]
    local = agent.client().get("/v1/agent/services").json()
    assert local["web-sidecar-proxy"]["Port"] == web_proxy["Port"]


def test_a_failing_http_check_goes_critical_in_the_control_plane_within_interval_plus_a_second(
    control_plane, make_agent, health_endpoint
):
    definition = {
        "service": {
            "name": "checked",
            "port": health_endpoint.port,
            "check": {
                "id": "checked-http",
                "http": f"http://127.0.0.1:{health_endpoint.port}/health",
                "interval": "1s",
            },
        }
    }
    agent = make_agent(files={"checked.json": json.dumps(definition)})
    eventually(
        lambda: node_checks(control_plane, agent.node)["checked-http"]["Status"] == "passing"
    )
    health_endpoint.status = 500
    flipped = time.monotonic()
    eventually(
        lambda: node_checks(control_plane, agent.node)["checked-http"]["Status"] == "critical",
        timeout=5,
        interval=0.05,
    )
    assert time.monotonic() - flipped <= 2.0 + 0.5  # interval + 1 s (+ polling slack)
    check = node_checks(control_plane, agent.node)["checked-http"]
    assert "500 Internal Server Error" in check["Output"]
    assert agent.client().get("/v1/agent/checks").json()["checked-http"]["Status"] == "critical"


def test_anti_entropy_restores_a_service_deregistered_behind_the_agents_back(
    control_plane, make_agent
):
    agent = make_agent(files={"api.yaml": API_YAML})
    eventually(lambda: "api" in catalog_services(control_plane, agent.node))
    r = control_plane.client().put(
        "/v1/catalog/deregister", json={"Node": agent.node, "ServiceID": "api"}
    )
    assert r.status_code == 200
    assert "api" not in catalog_services(control_plane, agent.node)
    eventually(lambda: "api" in catalog_services(control_plane, agent.node), timeout=10)


def test_sighup_picks_up_a_new_file_and_reports_a_broken_one_keeping_state(
    control_plane, make_agent
):
    agent = make_agent(files={"api.yaml": API_YAML})
    eventually(lambda: "api" in catalog_services(control_plane, agent.node))
    (agent.config_dir / "web.json").write_text(json.dumps(WEB_JSON))
    agent.signal(signal.SIGHUP)
    eventually(lambda: "web-sidecar-proxy" in catalog_services(control_plane, agent.node))
    broken = agent.config_dir / "broken.json"
    broken.write_text('{"service": {"name": "x", "port": "not a port"}}')
    agent.signal(signal.SIGHUP)
    eventually(
        lambda: any(
            str(broken) in str(line.get("error", ""))
            for line in agent.log_lines()
            if line.get("msg", "").startswith("reload failed")
        )
    )
    time.sleep(1.5)  # a sync or two later, nothing was lost
    assert sorted(catalog_services(control_plane, agent.node)) == [
        "api",
        "api-sidecar-proxy",
        "web",
        "web-sidecar-proxy",
    ]
    assert agent.proc.poll() is None


def test_py_consul_against_the_agent_registers_a_ttl_service_and_passes_it(
    control_plane, make_agent
):
    import consul

    agent = make_agent()
    c = agent.consul()
    assert c.agent.service.register(
        "cache", service_id="cache-1", port=6379, check=consul.Check.ttl("30s")
    )
    assert "cache-1" in c.agent.services()
    assert c.agent.checks()["service:cache-1"]["Status"] == "critical"
    assert c.agent.check.ttl_pass("service:cache-1", "warm")
    assert c.agent.checks()["service:cache-1"]["Output"] == "warm"

    def seen():
        _, nodes = control_plane.consul().health.service("cache")
        mine = [n for n in nodes if n["Node"]["Node"] == agent.node]
        assert mine and mine[0]["Checks"][-1]["Status"] == "passing"
        return mine

    eventually(seen)
    # Persisted: a restarted agent still has it.
    agent.stop()
    agent.token = agent.pin = ""
    agent.start()
    assert "cache-1" in agent.consul().agent.services()
    assert agent.consul().agent.service.deregister("cache-1")
    eventually(lambda: "cache-1" not in catalog_services(control_plane, agent.node))


def test_the_local_api_answers_consuls_errors(make_agent):
    agent = make_agent()
    with agent.client() as http:
        r = http.put("/v1/agent/service/register", content=b'{"Port": 80}')
        assert (r.status_code, "Missing service name" in r.text) == (400, True)
        r = http.put("/v1/agent/service/deregister/nope")
        assert r.status_code == 404
        r = http.put("/v1/agent/check/pass/nope")
        assert r.status_code == 404
        r = http.get("/v1/agent/health/service/id/nope")
        assert (r.status_code, r.text) == (404, "ServiceId nope not found")
        r = http.put("/v1/agent/service/register", content=b"{not json")
        assert r.status_code == 400
        r = http.get("/v1/agent/nothing-here")
        assert r.status_code == 404


def test_a_leaf_through_the_agent_has_a_key_made_here(control_plane, make_agent):
    agent = make_agent(files={"web.json": json.dumps(WEB_JSON)})
    eventually(lambda: "web" in catalog_services(control_plane, agent.node))
    leaf = eventually(lambda: agent.consul().agent.connect.ca.leaf("web"))
    cert = pki.load_cert(leaf["CertPEM"])
    key = pki.load_key(leaf["PrivateKeyPEM"])
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert leaf["ServiceURI"].endswith("/svc/web")
    assert pki.spiffe_id_of(cert) == leaf["ServiceURI"]
    roots = agent.consul().agent.connect.ca.roots()
    assert (
        roots["ActiveRootID"]
        == control_plane.client().get("/v1/connect/ca/roots").json()["ActiveRootID"]
    )
    # A service that is not on this node gets no leaf.
    r = agent.client().get("/v1/agent/connect/ca/leaf/someone-else")
    assert r.status_code == 403


def test_the_agent_outlives_the_control_plane_and_restores_it_on_return(tmp_path, unique):
    from tests.agents.conftest import start_server

    server = start_server(tmp_path / "cp")
    try:
        token, pin = join_token(server)
        agent = MeshAgent(
            server,
            tmp_path / "a" / "data",
            tmp_path / "a" / "config.d",
            unique("node"),
            token=token,
            pin=pin,
        )
        agent.config_dir.mkdir(parents=True)
        (agent.config_dir / "api.yaml").write_text(API_YAML)
        agent.start()
    except Exception:
        server.close()
        raise
    try:
        eventually(lambda: "api" in catalog_services(server, agent.node))
        server.stop()
        eventually(lambda: "mesh_agent_connected 0" in agent.metrics())
        # Still serving locally, and still taking registrations.
        c = agent.consul()
        assert "api" in c.agent.services()
        assert c.agent.service.register("late", port=1234)
        time.sleep(1)
        assert agent.proc.poll() is None
        server.start()  # same data dir and database
        eventually(lambda: "late" in catalog_services(server, agent.node), timeout=45)
        assert "api" in catalog_services(server, agent.node)
        assert "mesh_agent_connected 1" in agent.metrics()
    finally:
        agent.stop()
        server.close()


def test_py_consul_checks_maintenance_and_health_codes_on_the_agent(control_plane, make_agent):
    import consul

    agent = make_agent()
    c = agent.consul()
    assert c.agent.service.register("queue", service_id="queue-1", port=5672)
    assert c.agent.check.register(
        "queue depth", check=consul.Check.ttl("30s"), check_id="queue-depth", service_id="queue-1"
    )
    with agent.client() as http:
        assert http.get("/v1/agent/health/service/id/queue-1").status_code == 503
        r = http.put(
            "/v1/agent/check/update/queue-depth", json={"Status": "warning", "Output": "deep"}
        )
        assert r.status_code == 200
        r = http.get("/v1/agent/health/service/id/queue-1")
        assert (r.status_code, r.json()["AggregatedStatus"]) == (429, "warning")
        assert c.agent.check.ttl_pass("queue-depth")
        assert http.get("/v1/agent/health/service/id/queue-1").status_code == 200
        r = http.put("/v1/agent/check/update/queue-depth", json={"Status": "sideways"})
        assert r.status_code == 400
    assert c.agent.service.maintenance("queue-1", "true", "upgrading")
    checks = c.agent.checks()
    assert checks["_service_maintenance:queue-1"]["Status"] == "critical"
    assert checks["_service_maintenance:queue-1"]["Notes"] == "upgrading"

    def control_plane_sees_maintenance():
        checks = node_checks(control_plane, agent.node)
        assert checks["_service_maintenance:queue-1"]["Status"] == "critical"
        assert checks["queue-depth"]["Status"] == "passing"
        return True

    eventually(control_plane_sees_maintenance)
    assert c.agent.service.maintenance("queue-1", "false")
    assert c.agent.check.deregister("queue-depth")
    eventually(lambda: "queue-depth" not in node_checks(control_plane, agent.node))
    assert "_service_maintenance:queue-1" not in node_checks(control_plane, agent.node)


def test_anti_entropy_registers_a_deleted_node_again_with_its_services(control_plane, make_agent):
    agent = make_agent(files={"api.yaml": API_YAML})
    eventually(lambda: "api" in catalog_services(control_plane, agent.node))
    before = control_plane.client().get(f"/v1/catalog/node/{agent.node}").json()["Node"]
    r = control_plane.client().put("/v1/catalog/deregister", json={"Node": agent.node})
    assert r.status_code == 200  # (the agent may put it back at once: 1 s syncs)

    def registered_again() -> bool:
        r = control_plane.client().get(f"/v1/catalog/node/{agent.node}")
        return r.status_code == 200 and r.json()["Node"]["CreateIndex"] > before["CreateIndex"]

    eventually(registered_again, timeout=10)
    eventually(
        lambda: sorted(catalog_services(control_plane, agent.node)) == ["api", "api-sidecar-proxy"],
        timeout=10,
    )
    node = control_plane.client().get(f"/v1/catalog/node/{agent.node}").json()["Node"]
    assert (node["Address"], node["Meta"]["mesh-role"]) == ("127.0.0.1", "agent")
