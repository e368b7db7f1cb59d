"""Cluster peering between two separate control planes: two real `mesh server`
processes, each on its own database, peered through their `/v1/peering` API.

Token -> establish -> exported-services -> the imported service visible on
the other side through py-consul with `?peer=` -> delete. Bad tokens (altered,
malformed, expired, reused) are refused with a message that says which.
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from tests.support.servers import make_server

pytestmark = pytest.mark.slow

A_NAME_FOR_B = "cluster-b"  # what A calls B
B_NAME_FOR_A = "cluster-a"  # what B calls A


def wait_for(fn, what: str, timeout: float = 45.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    a = make_server(
        tmp_path_factory.mktemp("peer-a"),
        redis=False,
        extra_env={"MESH_SECRET_KEY": "peer-a-secret-key-for-tests", "MESH_DC": "dc1"},
    )
    try:
        b = make_server(
            tmp_path_factory.mktemp("peer-b"),
            redis=False,
            extra_env={"MESH_SECRET_KEY": "peer-b-secret-key-for-tests", "MESH_DC": "dc1"},
        )
    except Exception:
        a.close()
        raise
    try:
        yield a, b
    finally:
        b.close()
        a.close()


def _token(server, name: str, **extra) -> str:
    with server.client() as c:
        r = c.post("/v1/peering/token", json={"PeerName": name, **extra})
    assert r.status_code == 200, r.text
    return r.json()["PeeringToken"]


def _establish(server, name: str, token: str):
    with server.client() as c:
        return c.post("/v1/peering/establish", json={"PeerName": name, "PeeringToken": token})


def _peering(server, name: str):
    with server.client() as c:
        return c.get(f"/v1/peering/{name}")


def _trust_domain(server) -> str:
    with server.client() as c:
        return c.get("/v1/connect/ca/roots").json()["TrustDomain"]


def _register(server, node: str, service_id: str, status: str, port: int, name="api") -> None:
    with server.client() as c:
        r = c.put(
            "/v1/catalog/register",
            json={
                "Node": node,
                "Address": "127.0.0.1",
                "Service": {"ID": service_id, "Service": name, "Port": port, "Tags": ["v1"]},
                "Check": {
                    "CheckID": f"{service_id}-check",
                    "Name": "api alive",
                    "Status": status,
                    "ServiceID": service_id,
                },
            },
        )
    assert r.status_code == 200, r.text


def _register_connect(server, node, service_id, name, port, *, upstreams) -> None:
    """A service with a sidecar (port 21000) registered through the catalog."""
    with server.client() as c:
        r = c.put(
            "/v1/catalog/register",
            json={
                "Node": node,
                "Address": "127.0.0.1",
                "Service": {
                    "ID": f"{service_id}-sidecar-proxy",
                    "Service": f"{name}-sidecar-proxy",
                    "Kind": "connect-proxy",
                    "Port": 21000,
                    "Proxy": {
                        "DestinationServiceName": name,
                        "DestinationServiceID": service_id,
                        "LocalServicePort": port,
                        "Upstreams": upstreams,
                    },
                },
                "Check": {
                    "CheckID": f"{service_id}-sidecar-check",
                    "Name": "sidecar alive",
                    "Status": "passing",
                    "ServiceID": f"{service_id}-sidecar-proxy",
                },
            },
        )
    assert r.status_code == 200, r.text


def _proxy_config(server, service: str) -> dict:
    with server.client() as c:
        r = c.get(f"/api/services/{service}/proxy-config")
    assert r.status_code == 200, r.text
    return r.json()


def _altered(token: str) -> str:
    body = json.loads(base64.b64decode(token))
    body["Payload"]["ServerAddresses"] = ["127.0.0.1:1"]  # signature left as it was
    return base64.b64encode(json.dumps(body).encode()).decode()


def test_bad_tokens_are_refused_with_clear_messages(clusters):
    a, b = clusters
    token = _token(a, "refusals")
    r = _establish(b, "refusals", _altered(token))
    # The altered token sends B to a wrong address: B cannot even reach it.
    assert r.status_code == 502 and "cannot reach" in r.text
    body = json.loads(base64.b64decode(token))
    body["Payload"]["Datacenter"] = "elsewhere"
    r = _establish(b, "refusals", base64.b64encode(json.dumps(body).encode()).decode())
    assert r.status_code == 400
    assert "signature is invalid" in r.text and "altered" in r.text

    r = _establish(b, "refusals", "not-a-token!")
    assert r.status_code == 400 and "malformed" in r.text

    expiring = _token(a, "short-lived", ExpiresIn="1s")
    time.sleep(1.5)
    r = _establish(b, "short-lived", expiring)
    assert r.status_code == 400 and "expired" in r.text
    # The acceptor checks expiry itself too (a dialer's clock is not trusted).
    with a.client() as c:
        r = c.post("/v1/peering/exchange", json={"PeeringToken": expiring})
    assert r.status_code == 400 and "expired" in r.text

    r = _establish(b, "", token)
    assert r.status_code == 400 and "PeerName is required" in r.text
    with a.client() as c:
        r = c.post("/v1/peering/token", json={"PeerName": "Bad_Name"})
    assert r.status_code == 400 and "is not valid" in r.text
    # Nothing was stored on B by any refusal.
    with b.client() as c:
        assert c.get("/v1/peerings").json() == []
    # A's pending rows are still pending (unused).
    assert _peering(a, "refusals").json()["State"] == "PENDING"


def test_peer_export_import_and_delete(clusters):
    a, b = clusters
    td_a, td_b = _trust_domain(a), _trust_domain(b)
    assert td_a != td_b
    token = _token(a, A_NAME_FOR_B)
    assert _peering(a, A_NAME_FOR_B).json()["State"] == "PENDING"

    r = _establish(b, B_NAME_FOR_A, token)
    assert r.status_code == 200, r.text
    on_b = _peering(b, B_NAME_FOR_A).json()
    assert on_b["State"] == "ACTIVE"
    # A turns ACTIVE when B, having stored its side, first pulls from it.
    on_a = wait_for(
        lambda: (lambda p: p if p["State"] == "ACTIVE" else None)(_peering(a, A_NAME_FOR_B).json()),
        "A's side ACTIVE",
    )
    assert on_b["PeerTrustDomain"] == td_a and on_a["PeerTrustDomain"] == td_b
    assert on_b["PeerID"] == on_a["ID"] and on_a["PeerID"] == on_b["ID"]
    with a.client() as c:
        roots_a = [r["RootCert"] for r in c.get("/v1/connect/ca/roots").json()["Roots"]]
    assert on_b["PeerCAPems"] == roots_a

    # The token is single-use: a second establish with it is refused by A.
    r = _establish(b, "cluster-a-again", token)
    assert r.status_code == 400 and "already been used" in r.text

    # Export api from A to B: only the healthy instance crosses.
    _register(a, "a-node-1", "api-1", "passing", 9001)
    _register(a, "a-node-2", "api-2", "critical", 9002)
    _register(
        a, "a-node-1", "secret-1", "passing", 9100, name="secret"
    )  # a second service, not exported
    with a.client() as c:
        bad = c.put(
            "/v1/config",
            json={"Kind": "exported-services", "Name": "other", "Services": []},
        )
        assert bad.status_code == 400 and 'named after its partition, "default"' in bad.text
        bad = c.put(
            "/v1/config",
            json={
                "Kind": "exported-services",
                "Name": "default",
                "Services": [{"Name": "api", "Consumers": [{"Partition": "x"}]}],
            },
        )
        assert bad.status_code == 400 and "only Peer consumers" in bad.text
        ok = c.put(
            "/v1/config",
            json={
                "Kind": "exported-services",
                "Name": "default",
                "Services": [{"Name": "api", "Consumers": [{"Peer": A_NAME_FOR_B}]}],
            },
        )
        assert ok.status_code == 200 and ok.json() is True

    consul_b = b.consul()
    _, entries = wait_for(
        lambda: (lambda res: res if res[1] else None)(
            consul_b.health.service("api", peer=B_NAME_FOR_A)
        ),
        "api imported on B",
    )
    assert [e["Service"]["ID"] for e in entries] == ["api-1"]
    assert entries[0]["Service"]["PeerName"] == B_NAME_FOR_A
    assert entries[0]["Node"]["PeerName"] == B_NAME_FOR_A
    assert entries[0]["Checks"][0]["Status"] == "passing"
    _, services = consul_b.catalog.services()
    assert "api" not in services  # imported services are not B's own
    with b.client() as c:
        listed = c.get("/v1/catalog/services", params={"peer": B_NAME_FOR_A}).json()
        assert listed == {"api": ["v1"]}  # `secret` is not exported
        catalog = c.get("/v1/catalog/service/api", params={"peer": B_NAME_FOR_A}).json()
        assert [(x["ServiceID"], x["PeerName"]) for x in catalog] == [("api-1", B_NAME_FOR_A)]
        assert c.get("/v1/health/service/secret", params={"peer": B_NAME_FOR_A}).json() == []
    status = _peering(b, B_NAME_FOR_A).json()["StreamStatus"]
    assert status["ImportedServices"] == ["api"]
    assert _peering(a, A_NAME_FOR_B).json()["StreamStatus"]["ExportedServices"] == ["api"]

    # A blocking query on B wakes when A's export changes (the second instance heals).
    index, _ = consul_b.health.service("api", peer=B_NAME_FOR_A)
    _register(a, "a-node-2", "api-2", "passing", 9002)
    t0 = time.monotonic()
    new_index, entries = consul_b.health.service("api", peer=B_NAME_FOR_A, index=index, wait="20s")
    assert time.monotonic() - t0 < 19, "the blocking query timed out instead of waking"
    assert new_index > index
    assert sorted(e["Service"]["ID"] for e in entries) == ["api-1", "api-2"]

    # Sidecars: B's web has an upstream naming the peer; A's api sidecar is exported to B.
    _register_connect(a, "a-node-1", "api-1", "api", 9001, upstreams=[])
    _register_connect(
        b,
        "b-node-1",
        "web-1",
        "web",
        8080,
        upstreams=[
            {"DestinationName": "api", "DestinationPeer": B_NAME_FOR_A, "LocalBindPort": 9191}
        ],
    )
    web_cfg = wait_for(
        lambda: (lambda cfg: cfg if cfg["upstreams"][0]["clusters"] else None)(
            _proxy_config(b, "web")
        ),
        "B's web sidecar config with the imported api",
    )
    up = web_cfg["upstreams"][0]
    assert up["peer"] == B_NAME_FOR_A and up["local_bind_port"] == 9191
    cluster = up["clusters"][0]
    assert cluster["spiffe_id"] == f"spiffe://{td_a}/ns/default/dc/dc1/svc/api"
    assert cluster["sni"] == f"api.default.dc1.internal.{td_a}"
    # A has no mesh gateway: B dials A's api sidecar directly.
    assert [(e["address"], e["port"]) for e in cluster["endpoints"]] == [("127.0.0.1", 21000)]
    assert web_cfg["peer_trust"] == [{"peer": B_NAME_FOR_A, "trust_domain": td_a, "roots": roots_a}]
    api_cfg = _proxy_config(a, "api")
    assert [(t["peer"], t["trust_domain"]) for t in api_cfg["peer_trust"]] == [(A_NAME_FOR_B, td_b)]

    # Deleting on B cuts the peering: B's imports go at once, A turns TERMINATED.
    with b.client() as c:
        assert c.delete(f"/v1/peering/{B_NAME_FOR_A}").status_code == 200
        assert c.get("/v1/health/service/api", params={"peer": B_NAME_FOR_A}).json() == []
    assert _peering(b, B_NAME_FOR_A).status_code == 404
    terminated = wait_for(
        lambda: (lambda p: p if p["State"] == "TERMINATED" else None)(
            _peering(a, A_NAME_FOR_B).json()
        ),
        "A's side TERMINATED",
    )
    assert terminated["PeerCAPems"] == []
    # Both sides' sidecars lose the peer: no cluster, no trust.
    web_cfg = _proxy_config(b, "web")
    assert web_cfg["upstreams"][0]["clusters"] == [] and web_cfg["peer_trust"] == []
    assert _proxy_config(a, "api")["peer_trust"] == []
    # The old stream secret no longer pulls anything from A.
    with a.client() as c:
        r = c.get("/v1/peering/exported", headers={"X-Mesh-Peering-Secret": "x" * 43})
    assert r.status_code == 403


def test_the_mesh_peering_cli(clusters, tmp_path):
    from tests.test_cli import run_mesh

    a, b = clusters
    gen = run_mesh("peering", "generate-token", "-name", "cli-b", "-meta", "team=pay", server=a)
    assert gen.returncode == 0, gen.stderr
    token_file = tmp_path / "token"
    token_file.write_text(gen.stdout)

    bad = run_mesh("peering", "establish", "-name", "cli-a", "-peering-token", "garbage", server=b)
    assert bad.returncode != 0 and "malformed" in bad.stderr

    est = run_mesh(
        "peering", "establish", "-name", "cli-a", "-peering-token", f"@{token_file}", server=b
    )
    assert est.returncode == 0, est.stderr
    assert 'established peering connection with "cli-a"' in est.stdout
    again = run_mesh(
        "peering", "establish", "-name", "cli-a2", "-peering-token", f"@{token_file}", server=b
    )
    assert again.returncode != 0 and "already been used" in again.stderr

    listed = run_mesh("peering", "list", server=b)
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith("cli-a "))
    assert "ACTIVE" in row and _trust_domain(a) in row
    read = run_mesh("peering", "read", "-name", "cli-b", "-format", "json", server=a)
    assert json.loads(read.stdout)["Meta"] == {"team": "pay"}
    missing = run_mesh("peering", "read", "-name", "nope", server=a)
    assert missing.returncode != 0 and 'No peering with name "nope"' in missing.stderr

    gone = run_mesh("peering", "delete", "-name", "cli-a", server=b)
    assert gone.returncode == 0 and "for deletion" in gone.stdout
    assert "cli-a " not in run_mesh("peering", "list", server=b).stdout


def test_a_peer_that_goes_away_leaves_its_imports_served_and_the_peering_failing(clusters):
    """Runs last: it stops cluster A."""
    a, b = clusters
    _register(a, "a-node-3", "api-3", "passing", 9003)
    r = _establish(b, "late-a", _token(a, "late-b"))
    assert r.status_code == 200, r.text
    with a.client() as c:
        ok = c.put(
            "/v1/config",
            json={
                "Kind": "exported-services",
                "Name": "default",
                "Services": [{"Name": "api", "Consumers": [{"Peer": "late-b"}]}],
            },
        )
        assert ok.status_code == 200

    def imported():
        with b.client() as c:
            return c.get("/v1/health/service/api", params={"peer": "late-a"}).json()

    before = wait_for(imported, "api imported from late-a", timeout=60)
    a.stop()
    failing = wait_for(
        lambda: (lambda p: p if p["State"] == "FAILING" else None)(_peering(b, "late-a").json()),
        "B's peering FAILING",
        timeout=60,
    )
    # Why it fails is shown (a refused connection, or the dying server's last answer).
    assert "cannot reach" in failing["LastError"] or "peer answered" in failing["LastError"]
    # Static stability: what was imported stays served while the peer is away.
    assert imported() == before
