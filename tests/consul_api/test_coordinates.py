"""Network coordinates: the Vivaldi estimate converges on a known network; agents
measure and report; `/v1/coordinate` and `?near=` through py-consul and raw HTTP."""

from __future__ import annotations

import itertools
import random

import consul.exceptions
import pytest

from meshproto import vivaldi
from tests.agents.conftest import eventually


def _coord(x: float, y: float = 0.0) -> dict:
    return {"Vec": [x, y, 0, 0, 0, 0, 0, 0], "Error": 0.2, "Adjustment": 0.0, "Height": 1e-5}


def test_vivaldi_learns_a_known_network():
    """Nodes on a plane with RTT = distance: after bounded rounds the estimates are close."""
    rng = random.Random(7)
    where = {
        "a": (0.0, 0.0),
        "b": (0.030, 0.0),
        "c": (0.0, 0.040),
        "d": (0.030, 0.040),
        "e": (0.015, 0.020),
    }

    def rtt(p, q):
        (x1, y1), (x2, y2) = where[p], where[q]
        return ((x1 - x2) ** 2 + (y1 - y2) ** 2) ** 0.5 + 0.0005

    clients = {n: vivaldi.Client(random.Random(rng.random())) for n in where}
    for _ in range(300):
        for p in where:
            q = rng.choice([n for n in where if n != p])
            clients[p].update(q, clients[q].coord, rtt(p, q))
    for p, q in itertools.combinations(where, 2):
        estimate = clients[p].coord.distance(clients[q].coord)
        assert abs(estimate - rtt(p, q)) < 0.3 * rtt(p, q) + 0.002, (p, q, estimate, rtt(p, q))
        assert clients[p].coord.error < 0.5


def test_vivaldi_refuses_bad_samples():
    c = vivaldi.Client()
    with pytest.raises(ValueError):
        c.update("x", vivaldi.Coordinate(), -1.0)
    with pytest.raises(ValueError):
        c.update("x", vivaldi.Coordinate(vec=[float("nan")] * 8), 0.01)
    with pytest.raises(ValueError):
        vivaldi.Coordinate.from_json({"Vec": [0.0] * 3, "Error": 1, "Adjustment": 0, "Height": 0})


@pytest.mark.slow
def test_coordinate_api_and_near_sorting(http, consul_client, unique):
    svc = unique("near")
    nodes = [unique("n") for _ in range(3)]
    for node, x in zip(nodes, (0.050, 0.0, 0.020), strict=True):
        r = http.put(
            "/v1/catalog/register",
            json={"Node": node, "Address": "10.1.1.1", "Service": {"Service": svc, "ID": svc}},
        )
        assert r.status_code == 200
        assert consul_client.coordinate.update(node, _coord(x)) is True
    index, got = consul_client.coordinate.node(nodes[1])
    assert got[0]["Node"] == nodes[1] and got[0]["Coord"]["Vec"][0] == 0.0
    _, listed = consul_client.coordinate.nodes()
    assert set(nodes) <= {e["Node"] for e in listed}
    dcs = consul_client.coordinate.datacenters()
    assert "dc1" in [d["Datacenter"] for d in dcs]
    # ?near=<node> on catalog and health: nearest first
    order = [
        e["Node"] for e in http.get(f"/v1/catalog/service/{svc}", params={"near": nodes[1]}).json()
    ]
    assert order == [nodes[1], nodes[2], nodes[0]]
    order = [
        e["Node"]["Node"]
        for e in http.get(f"/v1/health/service/{svc}", params={"near": nodes[0]}).json()
    ]
    assert order == [nodes[0], nodes[2], nodes[1]]
    _, health = consul_client.health.service(svc, near=nodes[2])
    assert health[0]["Node"]["Node"] == nodes[2]
    # bad input: a clear 400, nothing stored
    for body in (
        {"Node": nodes[0], "Coord": {"Vec": [1, 2], "Error": 0, "Adjustment": 0, "Height": 0}},
        {"Node": nodes[0], "Coord": "far"},
        {"Node": unique("ghost"), "Coord": _coord(0.1)},
        {"Coord": _coord(0.1)},
    ):
        r = http.put("/v1/coordinate/update", json=body)
        assert r.status_code == 400, (body, r.text)
    assert consul_client.coordinate.node(nodes[0])[1][0]["Coord"]["Vec"][0] == 0.050
    assert http.get(f"/v1/coordinate/node/{unique('none')}").status_code == 404


@pytest.mark.slow
def test_updating_a_coordinate_needs_node_write(acl_server, unique):
    node = unique("n")
    admin = acl_server.consul()
    admin.catalog.register(node, "10.1.1.2")
    with acl_server.client() as http:
        policy = http.put(
            "/v1/acl/policy",
            json={"Name": unique("p"), "Rules": 'node_prefix "" { policy = "read" }'},
        ).json()
        secret = http.put("/v1/acl/token", json={"Policies": [{"ID": policy["ID"]}]}).json()[
            "SecretID"
        ]
    reader = consul.Consul(port=acl_server.http_port, token=secret)
    with pytest.raises(consul.exceptions.ACLPermissionDenied):
        reader.coordinate.update(node, _coord(0.01))
    assert admin.coordinate.update(node, _coord(0.01)) is True
    # (py-consul's coordinate.node sends no token: read it over HTTP with the reader's)
    with acl_server.client(token=secret) as http:
        assert http.get(f"/v1/coordinate/node/{node}").json()[0]["Coord"]["Vec"][0] == 0.01


@pytest.mark.slow
def test_agents_measure_and_report_their_coordinates(control_plane, make_agent):
    a = make_agent(extra=["-rtt-interval", "0.2s"])
    b = make_agent(extra=["-rtt-interval", "0.2s"])
    c = control_plane.consul()
    server_node = c.agent.self()["Config"]["NodeName"]

    def reported():
        _, entries = c.coordinate.nodes()
        by = {e["Node"]: e["Coord"] for e in entries}
        # both agents and the control plane's node, each having learnt from samples
        if not all(n in by for n in (a.node, b.node, server_node)):
            return None
        if not all(by[n]["Error"] < vivaldi.ERROR_MAX for n in (a.node, b.node, server_node)):
            return None
        return by

    by = eventually(reported, timeout=60)
    for coord in by.values():
        assert vivaldi.Coordinate.from_json(coord).valid()
    # loopback round trips: the estimates are small (well under 100 ms)
    ca, cb = (vivaldi.Coordinate.from_json(by[n]) for n in (a.node, b.node))
    assert ca.distance(cb) < 0.1
    # the agent's own API shows its coordinate
    own = a.client().get("/v1/agent/self").json()["Coord"]
    assert own["Error"] < vivaldi.ERROR_MAX and len(own["Vec"]) == vivaldi.DIMENSIONALITY
    # ?near=_agent sorts from the control plane's own node
    names = [n["Node"] for n in c.catalog.nodes(near="_agent")[1]]
    assert {a.node, b.node} <= set(names)
