"""Two separate control planes peered, each cloud a network namespace pair
(tests/e2e/clouds.py) joined only by the gateway hosts' WAN link.

- cluster A (cloud 1): its own `mesh server` (own database, own CA and trust
  domain) bound on cloud 1's bridge; host A runs `api` with its sidecar; host
  G1 runs A's mesh gateway;
- cluster B (cloud 2): another `mesh server` bound on cloud 2's bridge; host B
  runs `web` whose upstream names `api` with `DestinationPeer: cluster-a`;
  host G2 runs B's mesh gateway. B's sidecars leave through their gateway
  (`MeshGateway.Mode = local`).

Shown: B establishes a peering with A's token; A exports `api` to B; B's web
cannot call it until A has an intention naming the peer `cluster-b` as the
source, then calls go web -> G2 -> (WAN) -> G1 -> api's sidecar with mTLS end
to end between the two clusters' identities; deleting the peering stops them.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.clouds import Clouds, api_service
from tests.e2e.conftest import (
    BridgedServer,
    NsProcess,
    Started,
    bridged_server,
    data_logs,
    demo_app,
    made,
    new_join_token,
    start_agent,
    wait_for,
)

pytestmark = pytest.mark.slow


def peer_server(address: str, data_dir: Path, secret: str) -> BridgedServer:
    """A control plane of its own (own database, ACLs on) bound on `address`."""
    return bridged_server(address, data_dir, redis=False, extra_env={"MESH_SECRET_KEY": secret})


class Peered(Started):
    def __init__(self, topo: Clouds, tmp: Path) -> None:
        self.topo, self.tmp = topo, tmp
        self.servers: dict[str, BridgedServer] = {}
        self.procs: list[NsProcess] = []

    def _start(self) -> None:
        c1 = self.topo.gateway
        c2 = f"10.201.{self.topo.subnets['c2']}.1"
        self.servers["A"] = peer_server(c1, self.tmp / "cp-a", "cluster-a-secret-key")
        self.servers["B"] = peer_server(c2, self.tmp / "cp-b", "cluster-b-secret-key")
        with self.cp("B") as c:
            r = c.put(
                "/v1/config",
                json={"Kind": "proxy-defaults", "Name": "global", "MeshGateway": {"Mode": "local"}},
            )
            assert r.status_code == 200, r.text
        self.app("A", "api-a", "api", 9091)
        self.app("B", "web-b", "web", 9090, bind=self.topo.hosts["B"].address, upstream=9191)
        web = {
            "service": {
                "name": "web",
                "port": 9090,
                "connect": {
                    "sidecar_service": {
                        "port": 21000,
                        "proxy": {
                            "upstreams": [
                                {
                                    "destination_name": "api",
                                    "destination_peer": "cluster-a",
                                    "local_bind_port": 9191,
                                }
                            ]
                        },
                    }
                },
            }
        }
        self.agent("A", "A", "host-a", {"api.json": api_service()})
        self.agent("B", "B", "host-b", {"web.json": web})
        self.agent("A", "G1", "gw-a", {"gateway.json": self.topo.gateway_service("G1")})
        self.agent("B", "G2", "gw-b", {"gateway.json": self.topo.gateway_service("G2")})

    def cp(self, cluster: str) -> httpx.Client:
        return self.servers[cluster].client()

    def app(self, label: str, name: str, role: str, port: int, **kw) -> None:
        self.procs.append(demo_app(self.topo.hosts[label], self.tmp, name, role, port, **kw))

    def agent(self, cluster: str, label: str, node: str, files: dict[str, dict]) -> None:
        server = self.servers[cluster]
        with self.cp(cluster) as c:
            join_token = new_join_token(c)
        proc = start_agent(
            self.topo.hosts[label],
            self.tmp,
            node,
            files,
            join=f"{server.host}:{server.grpc_port}",
            join_token=join_token,
        )
        self.procs.append(proc)

    def call(self) -> tuple[bool, str]:
        url = f"http://{self.topo.hosts['B'].address}:9090/"
        try:
            r = httpx.get(url, timeout=8, trust_env=False)
        except httpx.HTTPError as exc:
            return False, f"web unreachable: {exc!r}"
        if r.status_code != 200:
            return False, r.text[:300]
        return True, r.json()["upstream"]["instance"]

    def gateway_metrics(self, label: str) -> str:
        url = f"http://{self.topo.hosts[label].address}:9102/metrics"
        return httpx.get(url, timeout=5, trust_env=False).text

    def logs(self) -> str:
        parts = [f"--- {p.name} ---\n{p.log(2000)}" for p in self.procs]
        parts += data_logs(self.tmp)
        for name, s in self.servers.items():
            parts.append(f"--- server {name} ---\n{s.log()}")
        return "\n".join(parts)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        for s in self.servers.values():
            s.close()


@pytest.fixture(scope="module")
def peered(tmp_path_factory):
    with made(Clouds()) as topo:
        world = Peered(topo, tmp_path_factory.mktemp("peered")).start()
        try:
            yield world
        finally:
            world.close()


def _step(world: Peered, what: str, fn, timeout: float = 60.0):
    try:
        return wait_for(fn, timeout=timeout, interval=0.3)
    except AssertionError:
        pytest.fail(f"{what} never happened:\n{world.logs()}")


def test_an_exported_service_is_callable_from_the_peer_only_with_a_peer_intention(peered):
    w = peered
    # ACLs are on: peering needs peering:write, listing peering:read.
    with w.servers["A"].client(token="") as anonymous:
        r = anonymous.post("/v1/peering/token", json={"PeerName": "cluster-b"})
        assert r.status_code == 403 and "peering:write" in r.text
        assert anonymous.get("/v1/peerings").status_code == 403
    with w.cp("A") as c:
        td_a = c.get("/v1/connect/ca/roots").json()["TrustDomain"]
        r = c.post("/v1/peering/token", json={"PeerName": "cluster-b"})
        assert r.status_code == 200, r.text
        token = r.json()["PeeringToken"]
    with w.cp("B") as c:
        r = c.post("/v1/peering/establish", json={"PeerName": "cluster-a", "PeeringToken": token})
        assert r.status_code == 200, r.text

    # Both gateways and both services are up in their own clusters.
    def healthy(cluster: str, service: str) -> bool:
        with w.cp(cluster) as c:
            return bool(c.get(f"/v1/health/service/{service}", params={"passing": "1"}).json())

    for cluster, service in (("A", "api"), ("A", "mesh-gateway"), ("B", "mesh-gateway")):
        _step(
            w,
            f"{service} healthy in cluster {cluster}",
            lambda a=cluster, b=service: healthy(a, b),
            90,
        )
    with w.cp("A") as c:
        r = c.put(
            "/v1/config",
            json={
                "Kind": "exported-services",
                "Name": "default",
                "Services": [{"Name": "api", "Consumers": [{"Peer": "cluster-b"}]}],
            },
        )
        assert r.status_code == 200, r.text

    def imported() -> list:
        with w.cp("B") as c:
            return c.get("/v1/health/service/api", params={"peer": "cluster-a"}).json()

    took = _step(w, "api imported into B", imported)
    report("export on A visible on B (?peer=)", f"{took:.2f} s")
    assert [e["Service"]["PeerName"] for e in imported()] == ["cluster-a"]
    with w.cp("B") as c:
        peering = c.get("/v1/peering/cluster-a").json()
    assert peering["State"] == "ACTIVE" and peering["PeerTrustDomain"] == td_a

    # The path is compiled (B's gateway routes api's SNI to A's gateway), but no
    # intention names the peer: A's api sidecar refuses B's web.
    def g2_routes_api() -> bool:
        return metric_sum(w.gateway_metrics("G2"), "mesh_gateway_connections_total", "api") > 0

    _step(w, "B's calls to reach B's gateway for api", lambda: (w.call(), g2_routes_api())[1])
    for _ in range(5):
        ok, detail = w.call()
        assert not ok, detail

    with w.cp("A") as c:
        r = c.put(
            "/v1/config",
            json={
                "Kind": "service-intentions",
                "Name": "api",
                "Sources": [{"Name": "web", "Peer": "cluster-b", "Action": "allow"}],
            },
        )
        assert r.status_code == 200, r.text
    took = _step(w, "B's web calling A's api", lambda: w.call() == (True, "api-a"), timeout=60)
    report("peer intention written on A to first call from B", f"{took:.2f} s")
    answers = [w.call() for _ in range(20)]
    assert answers == [(True, "api-a")] * 20

    # The calls went through both gateways: out of G2 to the peer, into G1 for api.
    assert metric_sum(w.gateway_metrics("G2"), "mesh_gateway_connections_total", "api") >= 20
    assert metric_sum(w.gateway_metrics("G1"), "mesh_gateway_connections_total", "api") >= 20

    # Deleting the peering (on either side; here B) stops the calls.
    with w.cp("B") as c:
        assert c.delete("/v1/peering/cluster-a").status_code == 200
    took = _step(w, "calls refused after the peering is deleted", lambda: not w.call()[0], 30)
    report("peering deleted on B to calls refused", f"{took:.2f} s")
    for _ in range(5):
        ok, detail = w.call()
        assert not ok, detail

    def a_side() -> str:
        with w.cp("A") as c:
            return c.get("/v1/peering/cluster-b").json()["State"]

    _step(w, "A's side terminated", lambda: a_side() == "TERMINATED")


def report(what: str, value: str) -> None:
    print(f"\n[e2e peering] {what}: {value}")


def metric_sum(text: str, name: str, service: str) -> float:
    """The sum of `name`'s samples labelled with `service`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'service="{service}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
