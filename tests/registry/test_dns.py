"""The DNS interface against a real `mesh server`, over UDP and TCP, with dnspython."""

from __future__ import annotations

import shutil
import socket
import subprocess

import consul
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype as T
import dns.resolver
import pytest

pytestmark = pytest.mark.slow

TIMEOUT = 5


@pytest.fixture
def resolver(server) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = server.dns_port
    r.timeout = 2
    r.lifetime = TIMEOUT
    return r


@pytest.fixture
def ask(server):
    """One raw query over UDP or TCP: the whole response message."""

    def ask(name: str, qtype: str = "A", *, tcp: bool = False, **kw) -> dns.message.Message:
        q = dns.message.make_query(name, qtype, **kw)
        send = dns.query.tcp if tcp else dns.query.udp
        return send(q, "127.0.0.1", port=server.dns_port, timeout=TIMEOUT)

    return ask


def register(http, name: str, sid: str, port: int, *, tags=(), address: str = "") -> None:
    body = {"Name": name, "ID": sid, "Port": port, "Tags": list(tags), "Check": {"TTL": "60s"}}
    if address:
        body["Address"] = address
    assert http.put("/v1/agent/service/register", json=body).status_code == 200


def set_check(http, sid: str, state: str) -> None:
    assert http.put(f"/v1/agent/check/{state}/service:{sid}").status_code == 200


def catalog_node(http, node: str, address: str, *, dc: str = "", service: dict | None = None):
    body = {"Node": node, "Address": address}
    if dc:
        body["Datacenter"] = dc
    if service:
        body["Service"] = service
    r = http.put("/v1/catalog/register", json=body)
    assert r.status_code == 200, r.text


def addresses(answer) -> list[str]:
    return sorted(rd.to_text() for rd in answer)


def local_node(http) -> str:
    return http.get("/v1/agent/self").json()["Config"]["NodeName"]


def test_it_answers_a_and_srv_for_a_passing_service_over_udp_and_tcp(http, resolver, unique):
    name = unique("dns")
    register(http, name, f"{name}-1", 8080, address="10.20.0.1")
    set_check(http, f"{name}-1", "pass")
    for tcp in (False, True):
        a = resolver.resolve(f"{name}.service.consul", "A", tcp=tcp)
        assert addresses(a) == ["10.20.0.1"]
        assert a.rrset.ttl == 0
        srv = resolver.resolve(f"{name}.service.consul", "SRV", tcp=tcp)
        [record] = list(srv)
        assert (record.priority, record.weight, record.port) == (1, 1, 8080)
        assert record.target.to_text() == "0a140001.addr.dc1.consul."
        glue = srv.response.find_rrset(srv.response.additional, record.target, 1, T.A)
        assert addresses(glue) == ["10.20.0.1"]


def test_it_answers_srv_with_the_node_as_target_for_an_instance_on_the_node_address(
    http, ask, unique
):
    name = unique("dns")
    register(http, name, name, 9000)
    set_check(http, name, "pass")
    node = local_node(http)
    msg = ask(f"{name}.service.consul", "SRV")
    [record] = list(msg.answer[0])
    assert record.target.to_text() == f"{node}.node.dc1.consul."
    [glue] = msg.additional
    assert (glue.name.to_text(), addresses(glue)) == (f"{node}.node.dc1.consul.", ["127.0.0.1"])


def test_it_registers_with_py_consul_and_resolves_case_insensitively(
    consul_client, resolver, unique
):
    name = unique("dns")
    consul_client.agent.service.register(
        name, service_id=name, port=7000, address="10.20.0.9", check=consul.Check.ttl("60s")
    )
    consul_client.agent.check.ttl_pass(f"service:{name}")
    a = resolver.resolve(f"{name.upper()}.SERVICE.Consul.", "A")
    assert addresses(a) == ["10.20.0.9"]
    assert a.rrset.name.to_text() == f"{name.upper()}.SERVICE.Consul."


def test_it_filters_by_tag_and_answers_rfc_2782_names(http, resolver, unique):
    name = unique("dns")
    register(http, name, f"{name}-1", 8001, tags=["primary"], address="10.21.0.1")
    register(http, name, f"{name}-2", 8002, tags=["replica"], address="10.21.0.2")
    set_check(http, f"{name}-1", "pass")
    set_check(http, f"{name}-2", "pass")

    assert addresses(resolver.resolve(f"primary.{name}.service.consul", "A")) == ["10.21.0.1"]
    tagged = resolver.resolve(f"replica.{name}.service.consul", "SRV")
    assert [r.port for r in tagged] == [8002]
    rfc = resolver.resolve(f"_{name}._primary.service.consul", "SRV")
    assert [r.port for r in rfc] == [8001]
    all_ports = resolver.resolve(f"_{name}._tcp.service.consul", "SRV")
    assert sorted(r.port for r in all_ports) == [8001, 8002]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve(f"canary.{name}.service.consul", "A")


def test_it_answers_node_lookups_and_datacenter_qualified_names(http, resolver, unique):
    node, name = unique("node"), unique("dns")
    catalog_node(http, node, "10.22.0.1", service={"Service": name, "Port": 81})
    other = unique("node")
    catalog_node(http, other, "10.22.0.2", dc="dc2", service={"Service": name, "Port": 82})

    assert addresses(resolver.resolve(f"{node}.node.consul", "A")) == ["10.22.0.1"]
    assert addresses(resolver.resolve(f"{node}.node.dc1.consul", "A")) == ["10.22.0.1"]
    assert addresses(resolver.resolve(f"{other}.node.dc2.consul", "A")) == ["10.22.0.2"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve(f"{other}.node.consul", "A")

    assert addresses(resolver.resolve(f"{name}.service.consul", "A")) == ["10.22.0.1"]
    assert addresses(resolver.resolve(f"{name}.service.dc1.consul", "A")) == ["10.22.0.1"]
    assert addresses(resolver.resolve(f"{name}.service.dc2.consul", "A")) == ["10.22.0.2"]
    srv = resolver.resolve(f"_{name}._tcp.service.dc2.consul", "SRV")
    assert [r.target.to_text() for r in srv] == [f"{other}.node.dc2.consul."]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve(f"{name}.service.dc9.consul", "A")


def test_it_answers_nxdomain_with_the_soa_for_unknown_names(ask, unique):
    for name in (f"{unique('dns')}.service.consul", f"{unique('n')}.node.consul", "what.consul"):
        msg = ask(name)
        assert msg.rcode() == dns.rcode.NXDOMAIN
        assert msg.flags & dns.flags.AA
        [soa_set] = msg.authority
        soa = soa_set[0]
        assert soa_set.name.to_text() == "consul."
        assert (soa.mname.to_text(), soa.rname.to_text()) == ("ns.consul.", "hostmaster.consul.")
        assert (soa.refresh, soa.retry, soa.expire, soa.minimum) == (3600, 600, 86400, 0)
        assert soa.serial > 1_600_000_000


def test_it_refuses_names_outside_its_domain(ask):
    assert ask("example.com").rcode() == dns.rcode.REFUSED
    assert ask("example.com", tcp=True).rcode() == dns.rcode.REFUSED


def test_it_drops_an_instance_while_its_check_is_critical(http, resolver, unique):
    name = unique("dns")
    register(http, name, f"{name}-1", 8001, address="10.23.0.1")
    register(http, name, f"{name}-2", 8002, address="10.23.0.2")
    with pytest.raises(dns.resolver.NXDOMAIN):  # TTL checks start critical
        resolver.resolve(f"{name}.service.consul", "A")
    set_check(http, f"{name}-1", "pass")
    set_check(http, f"{name}-2", "warn")
    assert addresses(resolver.resolve(f"{name}.service.consul", "A")) == [
        "10.23.0.1",
        "10.23.0.2",
    ]

    set_check(http, f"{name}-2", "fail")
    assert addresses(resolver.resolve(f"{name}.service.consul", "A")) == ["10.23.0.1"]
    set_check(http, f"{name}-1", "fail")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve(f"{name}.service.consul", "A")

    set_check(http, f"{name}-2", "pass")
    assert addresses(resolver.resolve(f"{name}.service.consul", "A")) == ["10.23.0.2"]


def test_it_drops_an_instance_in_maintenance(http, resolver, unique):
    name = unique("dns")
    register(http, name, f"{name}-1", 8001, address="10.24.0.1")
    register(http, name, f"{name}-2", 8002, address="10.24.0.2")
    set_check(http, f"{name}-1", "pass")
    set_check(http, f"{name}-2", "pass")
    r = http.put(f"/v1/agent/service/maintenance/{name}-2", params={"enable": "true"})
    assert r.status_code == 200
    assert addresses(resolver.resolve(f"{name}.service.consul", "A")) == ["10.24.0.1"]
    http.put(f"/v1/agent/service/maintenance/{name}-2", params={"enable": "false"})
    assert len(resolver.resolve(f"{name}.service.consul", "A")) == 2


def test_it_weighs_srv_records_by_health(http, resolver, unique):
    name = unique("dns")
    body = {
        "Name": name,
        "ID": name,
        "Port": 8000,
        "Weights": {"Passing": 10, "Warning": 3},
        "Check": {"TTL": "60s"},
    }
    assert http.put("/v1/agent/service/register", json=body).status_code == 200
    set_check(http, name, "pass")
    assert [r.weight for r in resolver.resolve(f"{name}.service.consul", "SRV")] == [10]
    set_check(http, name, "warn")
    assert [r.weight for r in resolver.resolve(f"{name}.service.consul", "SRV")] == [3]


def test_it_truncates_over_udp_and_answers_in_full_over_tcp(http, ask, resolver, unique):
    name = unique("dns")
    for i in range(40):
        catalog_node(
            http, f"{name}-n{i}", f"10.25.0.{i + 1}", service={"Service": name, "Port": 9000 + i}
        )
    udp = ask(f"{name}.service.consul", "SRV")
    assert udp.flags & dns.flags.TC
    assert len(udp.to_wire()) <= 512
    assert 0 < len(udp.answer[0]) < 40

    big = ask(f"{name}.service.consul", "SRV", use_edns=0, payload=4096)
    assert not big.flags & dns.flags.TC
    assert len(big.answer[0]) == 40

    tcp = ask(f"{name}.service.consul", "SRV", tcp=True)
    assert not tcp.flags & dns.flags.TC
    assert sorted(r.port for r in tcp.answer[0]) == list(range(9000, 9040))
    assert len(tcp.additional) == 40
    # A stub resolver retries a truncated answer over TCP on its own.
    assert len(resolver.resolve(f"{name}.service.consul", "A")) == 40


def test_it_survives_garbage_packets(server, ask):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        for junk in (b"", b"\x00", b"\xff" * 11, b"\x12\x34" + b"\x00" * 4 + b"\xff" * 40):
            s.sendto(junk, ("127.0.0.1", server.dns_port))
        # A header with a garbled question gets FORMERR for its id.
        s.sendto(
            b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07garb",
            ("127.0.0.1", server.dns_port),
        )
        # The other garbled query (id 0x1234) gets one too; none of the noise does.
        replies = {r[:2]: r for r in (s.recv(512), s.recv(512))}
        assert set(replies) == {b"\xab\xcd", b"\x12\x34"}
        assert all(r[3] & 0x0F == dns.rcode.FORMERR for r in replies.values())
    with socket.create_connection(("127.0.0.1", server.dns_port), timeout=TIMEOUT) as c:
        c.sendall(b"\x00\x05hello")
        c.recv(512)
    assert ask("example.com").rcode() == dns.rcode.REFUSED
    assert ask("nothing.service.consul", tcp=True).rcode() == dns.rcode.NXDOMAIN


def test_it_answers_several_queries_on_one_tcp_connection(server, unique):
    q1 = dns.message.make_query("example.com", "A")
    q2 = dns.message.make_query(f"{unique('dns')}.service.consul", "A")
    with socket.create_connection(("127.0.0.1", server.dns_port), timeout=TIMEOUT) as c:
        for q in (q1, q2):
            dns.query.send_tcp(c, q)
        r1, _ = dns.query.receive_tcp(c)
        r2, _ = dns.query.receive_tcp(c)
    assert (r1.id, r1.rcode()) == (q1.id, dns.rcode.REFUSED)
    assert (r2.id, r2.rcode()) == (q2.id, dns.rcode.NXDOMAIN)


def test_anonymous_dns_sees_nothing_when_acls_deny_by_default(acl_server, unique):
    name = unique("dns")
    with acl_server.client() as http:
        body = {"Name": name, "ID": name, "Port": 80, "Address": "10.26.0.1"}
        assert http.put("/v1/agent/service/register", json=body).status_code == 200
        assert http.get(f"/v1/catalog/service/{name}").json()[0]["ServiceAddress"] == "10.26.0.1"
    q = dns.message.make_query(f"{name}.service.consul", "A")
    msg = dns.query.udp(q, "127.0.0.1", port=acl_server.dns_port, timeout=TIMEOUT)
    assert msg.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed")
def test_dig_reads_srv_answers(server, http, unique):
    name = unique("dns")
    register(http, name, name, 8443, address="10.27.0.1")
    set_check(http, name, "pass")
    out = subprocess.run(
        [
            "dig",
            "@127.0.0.1",
            "-p",
            str(server.dns_port),
            f"{name}.service.consul",
            "SRV",
            "+short",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert out.split() == ["1", "1", "8443", "0a1b0001.addr.dc1.consul."]


def test_a_service_lookup_reads_the_catalog_in_two_queries(db, settings, django_assert_num_queries):
    from registry.dns import data
    from registry.dns.names import NodeLookup, ServiceLookup
    from registry.domain.catalog import catalog_register

    settings.MESH_ACL_ENABLED = False
    for i in range(5):
        catalog_register(
            {
                "Node": f"n{i}",
                "Address": f"10.30.0.{i}",
                "Service": {"Name": "Web", "Port": 80, "Tags": ["v1"]},
                "Check": {"CheckID": f"c{i}", "Name": "c", "ServiceID": "Web", "Status": "passing"},
            }
        )
    with django_assert_num_queries(2):
        endpoints = data.service_endpoints(ServiceLookup("web", "", settings.MESH_DC))
    assert sorted(e.node.address for e in endpoints) == [f"10.30.0.{i}" for i in range(5)]
    assert {(e.status, e.tags, e.port) for e in endpoints} == {("passing", ("v1",), 80)}
    with django_assert_num_queries(1):
        assert data.node_info(NodeLookup("N3", settings.MESH_DC)).address == "10.30.0.3"


def test_a_server_that_bootstraps_itself_answers_dns_with_its_read_only_dns_token(tmp_path, unique):
    from tests.support.servers import make_server

    srv = make_server(
        tmp_path / "auto", acl=True, extra_env={"MESH_ACL_INITIAL_MANAGEMENT_TOKEN": ""}
    )
    try:
        srv.token = (tmp_path / "auto" / "bootstrap-token").read_text().strip()
        name = unique("dns")
        with srv.client() as http:
            body = {"Name": name, "ID": name, "Port": 80, "Address": "10.28.0.1"}
            assert http.put("/v1/agent/service/register", json=body).status_code == 200
            # The DNS token reads services and nodes, nothing more.
            dns_secret = (tmp_path / "auto" / "dns-token").read_text().strip()
            r = http.put("/v1/kv/x", content=b"y", headers={"X-Consul-Token": dns_secret})
            assert r.status_code == 403
        q = dns.message.make_query(f"{name}.service.consul", "A")
        msg = dns.query.udp(q, "127.0.0.1", port=srv.dns_port, timeout=TIMEOUT)
        assert [str(r) for rrset in msg.answer for r in rrset] == ["10.28.0.1"]
    finally:
        srv.close()
