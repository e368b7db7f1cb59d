"""The config stream end to end: the control plane pushes each proxy's config, the agent
hands it with a leaf made here to the real `mesh-sidecar`, and traffic flows
web -> outbound sidecar -> mTLS -> inbound sidecar -> api, on loopback."""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading
import time

import httpx
import pytest

from meshproto import pki
from meshproto.proxycfg import ProxyConfig
from tests.agents.conftest import eventually
from tests.support.servers import free_port

pytestmark = pytest.mark.slow


class App:
    """A tiny HTTP app that says who it is."""

    def __init__(self, name: str) -> None:
        body = f"hello from {name}\n".encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                self.send_response(200)
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
def api_app():
    app = App("api")
    yield app
    app.close()


def definitions(api_port: int, upstream_port: int) -> dict[str, str]:
    web = {
        "service": {
            "name": "web",
            "port": free_port(),
            "connect": {
                "sidecar_service": {
                    # Explicit ports: several agents (and other tests) share this host.
                    "port": free_port(),
                    "proxy": {
                        "upstreams": [{"destination_name": "api", "local_bind_port": upstream_port}]
                    },
                }
            },
        }
    }
    api = f"""
service:
  name: api
  port: {api_port}
  check: {{tcp: "127.0.0.1:{api_port}", interval: 1s}}
  connect:
    sidecar_service: {{port: {free_port()}}}
"""
    return {"web.json": json.dumps(web), "api.yaml": api}


def allow(server, source: str, destination: str) -> None:
    r = server.client().put(
        "/v1/connect/intentions/exact",
        params={"source": source, "destination": destination},
        json={"Action": "allow"},
    )
    assert r.status_code == 200, r.text


def call(port: int) -> str:
    with httpx.Client(timeout=3) as c:
        return c.get(f"http://127.0.0.1:{port}/").text


def test_the_agent_feeds_each_sidecar_its_config_and_a_local_leaf(
    control_plane, make_agent, api_app
):
    upstream_port = free_port()
    agent = make_agent(files=definitions(api_app.port, upstream_port))

    def proxy_config(pid: str) -> ProxyConfig:
        r = agent.client().get(f"/v1/agent/connect/proxy/{pid}")
        assert r.status_code == 200, r.text
        return ProxyConfig.from_json(r.json())

    web_cfg = eventually(lambda: proxy_config("web-sidecar-proxy"), timeout=20)
    assert web_cfg.service == "web"
    [upstream] = web_cfg.upstreams
    assert (upstream.destination, upstream.local_bind_port) == ("api", upstream_port)
    api_cfg = eventually(lambda: proxy_config("api-sidecar-proxy"), timeout=20)
    assert api_cfg.inbound.local_app_port == api_app.port
    # The sidecars acked: the agent's metrics show the acked versions.
    metrics = eventually(
        lambda: (
            (m := agent.metrics())
            and 'mesh_agent_proxy_config_version{proxy_id="web-sidecar-proxy"}' in m
            and 'mesh_agent_proxy_config_version{proxy_id="api-sidecar-proxy"}' in m
            and m
        ),
        timeout=20,
    )
    expiry = re.search(
        r'mesh_agent_proxy_cert_expiry_seconds\{proxy_id="web-sidecar-proxy"\} (\S+)', metrics
    )
    assert expiry and float(expiry.group(1)) > 3600
    # The leaf was made here and is kept in the data dir, readable by the agent only.
    leaf = json.loads((agent.data_dir / "leaves" / "web-sidecar-proxy.json").read_text())
    cert, key = pki.load_cert(leaf["cert"]), pki.load_key(leaf["key"])
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert pki.spiffe_id_of(cert) == web_cfg.spiffe_id


def test_traffic_flows_web_to_api_through_both_sidecars_once_allowed(
    control_plane, make_agent, api_app
):
    upstream_port = free_port()
    agent = make_agent(files=definitions(api_app.port, upstream_port))
    allow(control_plane, "web", "api")

    def through_the_mesh():
        assert call(upstream_port) == "hello from api\n"
        return True

    eventually(through_the_mesh, timeout=30, interval=0.25)
    # The api's inbound listener speaks only mTLS: a plaintext client gets nothing.
    api_proxy = agent.client().get("/v1/agent/service/api-sidecar-proxy").json()
    with socket.create_connection(("127.0.0.1", api_proxy["Port"]), timeout=3) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(3)
        try:
            data = s.recv(100)
        except (ConnectionResetError, TimeoutError):
            data = b""
    assert b"hello from api" not in data

    # One scrape of the agent shows the data plane: each sidecar's connections
    # and bytes, and the plaintext attempt as a handshake failure, by proxy.
    def scraped() -> str | None:
        m = agent.metrics()
        failures = 'mesh_sidecar_tls_handshake_failures_total{proxy_id="api-sidecar-proxy"'
        return m if failures in m else None

    metrics = eventually(scraped, timeout=10)
    assert 'mesh_sidecar_connections_opened_total{proxy_id="web-sidecar-proxy"' in metrics
    assert 'mesh_sidecar_tx_bytes_total{proxy_id="api-sidecar-proxy"' in metrics


def test_denying_the_intention_stops_new_calls(control_plane, make_agent, api_app):
    upstream_port = free_port()
    make_agent(files=definitions(api_app.port, upstream_port))
    allow(control_plane, "web", "api")
    eventually(lambda: call(upstream_port) == "hello from api\n", timeout=30, interval=0.25)
    r = control_plane.client().put(
        "/v1/connect/intentions/exact",
        params={"source": "web", "destination": "api"},
        json={"Action": "deny"},
    )
    assert r.status_code == 200

    def refused():
        try:
            return call(upstream_port) != "hello from api\n"
        except httpx.HTTPError:
            return True

    started = time.monotonic()
    eventually(refused, timeout=10, interval=0.1)
    assert time.monotonic() - started < 5


def _own_agent(server, tmp_path, unique, files: dict[str, str]):
    from tests.agents.conftest import MeshAgent, join_token

    token, pin = join_token(server)
    name = unique("node")
    agent = MeshAgent(
        server, tmp_path / name / "data", tmp_path / name / "config.d", name, token=token, pin=pin
    )
    agent.config_dir.mkdir(parents=True)
    for fname, text in files.items():
        (agent.config_dir / fname).write_text(text)
    return agent


def _sidecar_pids(agent) -> dict[str, int]:
    out = {}
    for path in (agent.data_dir / "sidecars").glob("*.pid"):
        out[path.stem] = json.loads(path.read_text())["pid"]
    return out


def test_calls_continue_without_the_control_plane_and_across_an_agent_crash(
    tmp_path, unique, api_app
):
    import os
    import signal

    from tests.agents.conftest import start_server

    server = start_server(tmp_path / "cp")
    upstream_port = free_port()
    agent = _own_agent(server, tmp_path, unique, definitions(api_app.port, upstream_port))
    try:
        agent.start()
        allow(server, "web", "api")
        eventually(lambda: call(upstream_port) == "hello from api\n", timeout=30, interval=0.25)
        server.stop()
        eventually(lambda: "mesh_agent_connected 0" in agent.metrics())
        assert call(upstream_port) == "hello from api\n"
        # The agent dies hard: its sidecars keep serving with what they have.
        pids = _sidecar_pids(agent)
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(10)
        for _ in range(5):
            assert call(upstream_port) == "hello from api\n"
        # Restarted with the control plane still away: it adopts the running sidecars,
        # serves its local API from its data dir, and traffic never stopped.
        agent.token = agent.pin = ""
        agent.start()
        assert _sidecar_pids(agent) == pids
        for pid in pids.values():
            os.kill(pid, 0)
        assert "web-sidecar-proxy" in agent.consul().agent.services()
        cfg = agent.client().get("/v1/agent/connect/proxy/web-sidecar-proxy")
        assert cfg.status_code == 200
        assert call(upstream_port) == "hello from api\n"
        server.start()
        eventually(lambda: "mesh_agent_connected 1" in agent.metrics(), timeout=45)
        assert call(upstream_port) == "hello from api\n"
    finally:
        agent.stop()
        server.close()


def test_leaves_renew_during_continuous_traffic_without_a_failed_call(tmp_path, unique, api_app):
    from tests.agents.conftest import start_server

    server = start_server(tmp_path / "cp", extra_env={"MESH_CA_LEAF_TTL": "6s"})
    upstream_port = free_port()
    agent = _own_agent(server, tmp_path, unique, definitions(api_app.port, upstream_port))
    try:
        agent.start()
        allow(server, "web", "api")
        eventually(lambda: call(upstream_port) == "hello from api\n", timeout=30, interval=0.25)

        def renewals() -> float:
            m = re.search(
                r'mesh_agent_leaf_renewals_total\{proxy_id="api-sidecar-proxy"\} (\S+)',
                agent.metrics(),
            )
            return float(m.group(1)) if m else 0.0

        before, calls, failures = renewals(), 0, []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                assert call(upstream_port) == "hello from api\n"
            except (AssertionError, httpx.HTTPError) as exc:
                failures.append(repr(exc))
            calls += 1
            time.sleep(0.02)
        # 6 s leaves renewed at 50-80 % of their life: every 3-4.8 s, so 2 to 4 times
        # in these 10 s (more would be a renewal loop: the CA backdates not_before).
        assert before + 2 <= renewals() <= before + 5
        assert failures == [], f"{len(failures)} of {calls} calls failed: {failures[:3]}"
        # The node certificate (issued with the same 6 s TTL at join) renewed too:
        # SignLeaf without a service.
        node_cert = pki.load_cert((agent.data_dir / "identity" / "node.crt").read_text())
        assert pki.info(node_cert).not_after.timestamp() > time.time()
    finally:
        agent.stop()
        server.close()


def test_a_sidecar_that_dies_is_restarted_and_traffic_recovers(control_plane, make_agent, api_app):
    import os
    import signal

    upstream_port = free_port()
    agent = make_agent(files=definitions(api_app.port, upstream_port))
    allow(control_plane, "web", "api")
    eventually(lambda: call(upstream_port) == "hello from api\n", timeout=30, interval=0.25)
    old = _sidecar_pids(agent)["api-sidecar-proxy"]
    os.kill(old, signal.SIGKILL)
    eventually(lambda: _sidecar_pids(agent).get("api-sidecar-proxy") not in (None, old))
    eventually(lambda: call(upstream_port) == "hello from api\n", timeout=30, interval=0.25)
    assert 'mesh_agent_sidecar_restarts_total{proxy_id="api-sidecar-proxy"} 1' in agent.metrics()


def test_a_root_rotation_moves_leaves_to_the_new_root_without_a_failed_call(
    tmp_path, unique, api_app
):
    from tests.agents.conftest import start_server

    server = start_server(tmp_path / "cp")
    upstream_port = free_port()
    agent = _own_agent(server, tmp_path, unique, definitions(api_app.port, upstream_port))
    try:
        agent.start()
        allow(server, "web", "api")
        eventually(lambda: call(upstream_port) == "hello from api\n", timeout=30, interval=0.25)
        r = server.client().post("/api/ca/rotate")
        assert r.status_code == 200, r.text
        new_root = next(
            x for x in server.client().get("/v1/connect/ca/roots").json()["Roots"] if x["Active"]
        )
        root = pki.load_cert(new_root["RootCert"])

        def leaves_moved() -> bool:
            for name in ("web-sidecar-proxy", "api-sidecar-proxy"):
                leaf = json.loads((agent.data_dir / "leaves" / f"{name}.json").read_text())
                pki.load_cert(leaf["cert"]).verify_directly_issued_by(root)
            return True

        failures, deadline = [], time.monotonic() + 30
        moved = False
        while time.monotonic() < deadline and not moved:
            try:
                assert call(upstream_port) == "hello from api\n"
            except (AssertionError, httpx.HTTPError) as exc:
                failures.append(repr(exc))
            try:
                moved = leaves_moved()
            except Exception:
                moved = False
            time.sleep(0.05)
        assert moved, agent.log()
        roots = agent.consul().agent.connect.ca.roots()
        assert roots["ActiveRootID"] == new_root["ID"]
        assert len(roots["Roots"]) == 2
        for _ in range(10):  # new handshakes with the new leaves
            assert call(upstream_port) == "hello from api\n"
        assert failures == []
    finally:
        agent.stop()
        server.close()
