"""Prepared queries (`/v1/query`) through py-consul and raw HTTP: filters, failover
across the datacenters nodes belong to, templates, ACL by name, DNS answers."""

from __future__ import annotations

import dns.message
import dns.query
import dns.rcode
import pytest

pytestmark = pytest.mark.slow


def _register(
    http,
    node: str,
    dc: str,
    service: str,
    *,
    status="passing",
    tags=(),
    meta=None,
    port=80,
    address="10.0.0.1",
):
    body = {
        "Node": node,
        "Address": address,
        "Datacenter": dc,
        "Service": {
            "Service": service,
            "ID": f"{service}-{node}",
            "Port": port,
            "Tags": list(tags),
            "Meta": meta or {},
        },
        "Check": {
            "CheckID": f"{service}-{node}-up",
            "Name": "up",
            "Status": status,
            "ServiceID": f"{service}-{node}",
        },
    }
    r = http.put("/v1/catalog/register", json=body)
    assert r.status_code == 200, r.text


def _coord(x: float) -> dict:
    return {"Vec": [x, 0, 0, 0, 0, 0, 0, 0], "Error": 0.1, "Adjustment": 0.0, "Height": 1e-5}


def test_crud_through_py_consul(consul_client, unique):
    name = unique("pq")
    created = consul_client.query.create(name, name=name, tags=["v1"], onlypassing=True, ttl="10s")
    qid = created["ID"]
    [got] = consul_client.query.get(qid)
    assert got["Name"] == name and got["Service"]["Service"] == name
    assert got["Service"]["OnlyPassing"] is True and got["Service"]["Tags"] == ["v1"]
    assert got["DNS"]["TTL"] == "10s" and got["CreateIndex"] == got["ModifyIndex"]
    assert qid in [q["ID"] for q in consul_client.query.list()]
    assert consul_client.query.update(qid, name, name=name, tags=["v2"]) is True
    assert consul_client.query.get(qid)[0]["Service"]["Tags"] == ["v2"]
    assert consul_client.query.delete(qid) is True
    assert qid not in [q["ID"] for q in consul_client.query.list()]


def test_execute_filters_by_tags_meta_and_health(http, consul_client, unique):
    svc = unique("pq-svc")
    _register(http, unique("n"), "dc1", svc, tags=["primary"], meta={"env": "prod"})
    _register(http, unique("n"), "dc1", svc, tags=["primary", "experimental"], meta={"env": "prod"})
    _register(http, unique("n"), "dc1", svc, tags=["primary"], meta={"env": "dev"})
    _register(
        http, unique("n"), "dc1", svc, tags=["primary"], meta={"env": "prod"}, status="warning"
    )
    _register(
        http, unique("n"), "dc1", svc, tags=["primary"], meta={"env": "prod"}, status="critical"
    )
    body = {
        "Name": svc,
        "Service": {
            "Service": svc,
            "Tags": ["primary", "!experimental"],
            "ServiceMeta": {"env": "prod"},
        },
    }
    qid = http.post("/v1/query", json=body).json()["ID"]
    answer = consul_client.query.execute(svc)
    assert answer["Service"] == svc and answer["Datacenter"] == "dc1" and answer["Failovers"] == 0
    statuses = sorted(n["Checks"][0]["Status"] for n in answer["Nodes"])
    assert statuses == ["passing", "warning"]  # not critical, not experimental, not dev
    assert len(consul_client.query.execute(qid, limit=1)["Nodes"]) == 1
    body["Service"]["OnlyPassing"] = True
    assert http.put(f"/v1/query/{qid}", json=body).status_code == 200
    assert [n["Checks"][0]["Status"] for n in consul_client.query.execute(svc)["Nodes"]] == [
        "passing"
    ]
    assert http.get("/v1/query/no-such-query/execute").status_code == 404


def test_failover_moves_to_the_next_datacenter_with_healthy_instances(http, consul_client, unique):
    svc = unique("pq-fo")
    n1, n2, n3 = unique("dc1n"), unique("dc2n"), unique("dc3n")
    _register(http, n1, "dc1", svc, status="critical")
    _register(http, n2, "dc2", svc)
    _register(http, n3, "dc3", svc)
    qid = consul_client.query.create(svc, name=svc, datacenters=["dc-unknown", "dc3", "dc2"])["ID"]
    answer = consul_client.query.execute(qid)
    assert answer["Datacenter"] == "dc3" and answer["Failovers"] == 1
    assert [n["Node"]["Node"] for n in answer["Nodes"]] == [n3]
    # NearestN by coordinates: dc2's node is nearer to dc1's than dc3's
    for node, x in ((n1, 0.0), (n2, 0.010), (n3, 0.050)):
        assert consul_client.coordinate.update(node, _coord(x)) is True
    body = {
        "Name": svc,
        "Service": {"Service": svc, "Failover": {"NearestN": 1, "Datacenters": ["dc3"]}},
    }
    assert http.put(f"/v1/query/{qid}", json=body).status_code == 200
    answer = consul_client.query.execute(svc)
    assert answer["Datacenter"] == "dc2" and [n["Node"]["Node"] for n in answer["Nodes"]] == [n2]
    # with a healthy local instance there is no failover
    _register(http, n1, "dc1", svc)
    answer = consul_client.query.execute(svc)
    assert (answer["Datacenter"], answer["Failovers"]) == ("dc1", 0)
    # Near sorts by estimated round trip from the given node
    other = unique("dc1far")
    _register(http, other, "dc1", svc)
    consul_client.coordinate.update(other, _coord(0.030))
    near = http.get(f"/v1/query/{svc}/execute", params={"near": n2}).json()
    assert [n["Node"]["Node"] for n in near["Nodes"]] == [n1, other]  # 10 ms, then 20 ms


def test_templates_interpolate_names_and_regexp_groups(http, consul_client, unique):
    prefix = unique("geo-db") + "-"
    _register(http, unique("n"), "dc1", prefix + "mysql", tags=["primary"])
    _register(http, unique("n"), "dc1", prefix + "mysql", tags=["secondary"])
    body = {
        "Name": prefix,
        "Template": {"Type": "name_prefix_match", "Regexp": f"^{prefix}(.*?)-([^\\-]+?)$"},
        "Service": {"Service": prefix + "${match(1)}", "Tags": ["${match(2)}"]},
    }
    r = http.post("/v1/query", json=body)
    assert r.status_code == 200, r.text
    explained = consul_client.query.explain(prefix + "mysql-primary")["Query"]
    assert explained["Service"]["Service"] == prefix + "mysql"
    assert explained["Service"]["Tags"] == ["primary"]
    answer = consul_client.query.execute(prefix + "mysql-secondary")
    assert [n["Service"]["Tags"] for n in answer["Nodes"]] == [["secondary"]]
    # a name_prefix_match without a regexp: ${name.suffix} is what follows the prefix
    plain = unique("pfx") + "-"
    _register(http, unique("n"), "dc1", "svc-" + plain + "x")
    body = {
        "Name": plain,
        "Template": {"Type": "name_prefix_match"},
        "Service": {"Service": "svc-${name.full}"},
    }
    assert http.post("/v1/query", json=body).status_code == 200
    assert (
        consul_client.query.explain(plain + "x")["Query"]["Service"]["Service"]
        == "svc-" + plain + "x"
    )
    assert len(consul_client.query.execute(plain + "x")["Nodes"]) == 1


def test_bad_queries_are_refused_and_nothing_is_stored(http, unique):
    before = http.get("/v1/query").json()
    name = unique("bad")
    for body in (
        {"Name": name, "Template": {"Type": "prefix_match"}, "Service": {"Service": "x"}},
        {
            "Name": name,
            "Template": {"Type": "name_prefix_match", "Regexp": "(unclosed"},
            "Service": {"Service": "x"},
        },
        {
            "Name": name,
            "Template": {"Type": "name_prefix_match"},
            "Service": {"Service": "${nope}"},
        },
        {
            "Name": name,
            "Template": {"Type": "name_prefix_match"},
            "Service": {"Service": "${name.full"},
        },
        {"Name": name, "Service": {}},
        {"Name": "8f246b77-f3e1-ff88-5b48-8ec93abf3e05", "Service": {"Service": "x"}},
        {"Name": name, "Service": {"Service": "x"}, "DNS": {"TTL": "soon"}},
        {"Name": name, "Service": {"Service": "x", "Failover": {"NearestN": -1}}},
        [],
    ):
        r = http.post("/v1/query", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.text
    assert (
        http.post("/v1/query", json={"Name": name, "Service": {"Service": "x"}}).status_code == 200
    )
    r = http.post("/v1/query", json={"Name": name, "Service": {"Service": "y"}})
    assert r.status_code == 400 and "existing query name" in r.text
    after = http.get("/v1/query").json()
    assert len(after) == len(before) + 1


def test_acl_by_query_name(acl_server, unique):
    mine = unique("mine")
    with acl_server.client() as admin:
        policy = admin.put(
            "/v1/acl/policy",
            json={
                "Name": unique("pol"),
                "Rules": f'query_prefix "{mine}" {{ policy = "write" }}\nservice_prefix "" {{ policy = "read" }}\nnode_prefix "" {{ policy = "read" }}',
            },
        ).json()
        secret = admin.put("/v1/acl/token", json={"Policies": [{"ID": policy["ID"]}]}).json()[
            "SecretID"
        ]
        theirs = admin.post(
            "/v1/query", json={"Name": unique("theirs"), "Service": {"Service": "x"}}
        ).json()["ID"]
    with acl_server.client(token=secret) as http:
        assert (
            http.post("/v1/query", json={"Name": mine, "Service": {"Service": "x"}}).status_code
            == 200
        )
        r = http.post("/v1/query", json={"Name": unique("other"), "Service": {"Service": "x"}})
        assert r.status_code == 403
        listed = http.get("/v1/query")
        assert [q["Name"] for q in listed.json()] == [mine]
        assert listed.headers.get("X-Consul-Results-Filtered-By-ACLs") == "true"
        assert http.get(f"/v1/query/{theirs}").status_code == 403
        assert http.delete(f"/v1/query/{theirs}").status_code == 403
        # execution needs no query permission; its token decides what is seen
        assert http.get(f"/v1/query/{theirs}/execute").status_code == 200


def test_dns_answers_for_a_prepared_query(server, http, unique):
    svc = unique("pq-dns")
    _register(http, unique("n"), "dc1", svc, address="10.9.8.7", port=5432)
    _register(http, unique("n"), "dc1", svc, address="10.9.8.6", status="critical")
    assert (
        http.post(
            "/v1/query", json={"Name": svc, "Service": {"Service": svc}, "DNS": {"TTL": "7s"}}
        ).status_code
        == 200
    )

    def ask(name: str, qtype: str):
        q = dns.message.make_query(name, qtype)
        return dns.query.udp(q, "127.0.0.1", port=server.dns_port, timeout=10)

    a = ask(f"{svc}.query.consul", "A")
    assert [r.to_text() for rrset in a.answer for r in rrset] == ["10.9.8.7"]
    assert a.answer[0].ttl == 7
    srv = ask(f"{svc}.query.consul", "SRV")
    assert [r.port for rrset in srv.answer for r in rrset] == [5432]
    assert ask(f"{unique('none')}.query.consul", "A").rcode() == dns.rcode.NXDOMAIN
