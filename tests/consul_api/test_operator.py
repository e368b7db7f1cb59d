"""Operator and agent odds and ends through py-consul and raw HTTP: autopilot health,
the server processes (one, then two on one database), host, reload, the streamed log
monitor, the UI's service summary, Prometheus metrics."""

from __future__ import annotations

import json
import socket
import threading
import time

import consul.exceptions
import httpx
import pytest

from tests.agents.conftest import eventually
from tests.support.servers import server_pair

pytestmark = pytest.mark.slow


def test_one_server_process_described_honestly(server, consul_client):
    assert consul_client.status.peers() == [server.addr]
    health = consul_client.operator.autopilot_health()
    assert health["Healthy"] is True and health["FailureTolerance"] == 0
    [me] = health["Servers"]
    assert me["Address"] == server.addr and me["Leader"] and me["Healthy"] and me["Voter"]
    assert me["SerfStatus"] == "alive"
    config = consul_client.operator.raft_config()
    [srv] = config["Servers"]
    assert srv["Address"] == server.addr and srv["Voter"] is True and srv["Leader"] is True
    assert srv["Meta"]["pid"] == str(server.proc.pid)


def test_every_server_process_sharing_a_database_is_listed(tmp_path_factory):
    with server_pair(tmp_path_factory) as (first, second):
        want = sorted([first.addr, second.addr])
        eventually(lambda: sorted(first.consul().status.peers()) == want, timeout=30)
        assert sorted(second.consul().status.peers()) == want
        health = first.consul().operator.autopilot_health()
        assert health["Healthy"] and health["FailureTolerance"] == 1
        leaders = [s["Address"] for s in health["Servers"] if s["Leader"]]
        assert leaders == [first.addr]  # each process says it is the one answering
        second.stop()  # a clean stop removes it
        eventually(lambda: first.consul().status.peers() == [first.addr], timeout=30)


def test_agent_host(http):
    r = http.get("/v1/agent/host")
    assert r.status_code == 200, r.text
    host = r.json()
    assert host["Host"]["hostname"] == socket.gethostname()
    assert host["Memory"]["total"] > 0 and 0 <= host["Memory"]["usedPercent"] <= 100
    assert len(host["CPU"]) >= 1 and host["Disk"]["total"] > 0
    assert host["CollectionTime"] > 0 and host["Errors"] is None


def test_agent_reload_and_its_acl(acl_server, unique):
    with acl_server.client() as admin:
        assert admin.put("/v1/agent/reload").status_code == 200
        assert admin.get("/v1/agent/reload").status_code == 405
        policy = admin.put(
            "/v1/acl/policy",
            json={"Name": unique("p"), "Rules": 'agent_prefix "" { policy = "read" }'},
        ).json()
        secret = admin.put("/v1/acl/token", json={"Policies": [{"ID": policy["ID"]}]}).json()[
            "SecretID"
        ]
    with acl_server.client(token=secret) as reader:
        assert reader.put("/v1/agent/reload").status_code == 403
        assert reader.get("/v1/agent/host").status_code == 403  # operator:read
        assert reader.get("/v1/operator/raft/configuration").status_code == 403
    # still serving after a reload: the management token resolves again from the database
    assert acl_server.consul().kv.put(unique("after-reload"), "x") is True


def test_monitor_streams_log_lines(server, http, unique):
    name = unique("monitored")
    seen: list[str] = []
    done = threading.Event()

    def follow() -> None:
        with httpx.stream(
            "GET", server.url + "/v1/agent/monitor", params={"loglevel": "info"}, timeout=30
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                seen.append(line)
                if name in line:
                    done.set()
                    return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not done.is_set() and time.monotonic() < deadline:
        http.put(f"/v1/event/fire/{name}")  # logs "user event ... fired" at INFO
        done.wait(0.5)
    assert done.is_set(), seen[-5:]
    assert any("INFO" in line and name in line for line in seen)
    r = http.get("/v1/agent/monitor", params={"loglevel": "loud"})
    assert r.status_code == 400 and "Unknown log level" in r.text


def test_monitor_json_lines(server, http, unique):
    name = unique("jsonmon")
    found: dict = {}

    def follow() -> None:
        with httpx.stream(
            "GET", server.url + "/v1/agent/monitor", params={"logjson": ""}, timeout=30
        ) as r:
            for line in r.iter_lines():
                if line and name in line:
                    found.update(json.loads(line))
                    return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not found and time.monotonic() < deadline:
        http.put(f"/v1/event/fire/{name}")
        t.join(0.5)
    assert found["@level"] == "info" and name in found["@message"]


def test_ui_services_summary(http, unique):
    svc = unique("ui")
    for i, status in enumerate(("passing", "critical")):
        node = unique("n")
        body = {
            "Node": node,
            "Address": f"10.2.0.{i + 1}",
            "Service": {"Service": svc, "ID": f"{svc}-{i}", "Tags": [f"t{i}"], "Port": 80},
            "Check": {"CheckID": f"c{i}", "Name": "c", "Status": status, "ServiceID": f"{svc}-{i}"},
        }
        assert http.put("/v1/catalog/register", json=body).status_code == 200
    rows = {r["Name"]: r for r in http.get("/v1/internal/ui/services").json()}
    row = rows[svc]
    assert row["InstanceCount"] == 2 and len(row["Nodes"]) == 2
    assert sorted(row["Tags"]) == ["t0", "t1"]
    assert (row["ChecksPassing"], row["ChecksWarning"], row["ChecksCritical"]) == (1, 0, 1)
    assert row["Datacenter"] == "dc1" and row["Kind"] == ""


def test_prometheus_metrics(http):
    r = http.get("/v1/agent/metrics", params={"format": "prometheus"})
    assert r.status_code == 200 and "# TYPE" in r.text
    assert r.headers["Content-Type"].startswith("text/plain")


def test_autopilot_needs_operator_read(acl_server, unique):
    with acl_server.client() as admin:
        policy = admin.put(
            "/v1/acl/policy",
            json={"Name": unique("p"), "Rules": 'key_prefix "" { policy = "read" }'},
        ).json()
        secret = admin.put("/v1/acl/token", json={"Policies": [{"ID": policy["ID"]}]}).json()[
            "SecretID"
        ]
    client = consul.Consul(port=acl_server.http_port, token=secret)
    with pytest.raises(consul.exceptions.ACLPermissionDenied):
        client.operator.autopilot_health(token=secret)
