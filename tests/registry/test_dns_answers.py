"""DNS answers from plain data: name parsing, record building and truncation, no sockets."""

from __future__ import annotations

import asyncio
import random

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype as T
import pytest

from registry.dns.answers import (
    DNSConfig,
    Endpoint,
    NodeInfo,
    PtrName,
    answer,
    max_payload,
    render,
)
from registry.dns.names import (
    AddrLookup,
    NodeLookup,
    NotFound,
    PtrLookup,
    QueryLookup,
    ServiceLookup,
    ZoneLookup,
    classify,
)
from registry.dns.server import Resolver

CFG = DNSConfig.make("consul", "dc1")
NOW = 1_700_000_000
WEB1 = NodeInfo("web1", "10.0.0.1", "dc1", (("zone", "a"),))
WEB2 = NodeInfo("web2", "10.0.0.2", "dc1")


def query(name: str, qtype: str = "A", **kw) -> dns.message.Message:
    return dns.message.make_query(name, qtype, **kw)


def lookup_of(name: str, qtype: str = "A", cfg: DNSConfig = CFG):
    return classify(query(name, qtype), cfg.domain, cfg.dc)


def reply_for(name: str, qtype: str, data, *, cfg: DNSConfig = CFG, seed: int = 1):
    q = query(name, qtype)
    lookup = classify(q, cfg.domain, cfg.dc)
    return answer(q.question[0], lookup, data, cfg, now=NOW, rng=random.Random(seed))


def texts(records) -> list[str]:
    return [rd.to_text() for _, _, rd in records]


# --- names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "qtype", "expected"),
    [
        ("web.service.consul", "A", ServiceLookup("web", "", "dc1")),
        ("v1.web.service.consul", "A", ServiceLookup("web", "v1", "dc1")),
        ("a.b.web.service.consul", "SRV", ServiceLookup("web", "a.b", "dc1")),
        ("web.service.dc2.consul", "A", ServiceLookup("web", "", "dc2")),
        ("web.service.dc2.dc.consul", "A", ServiceLookup("web", "", "dc2")),
        ("WEB.Service.CONSUL", "A", ServiceLookup("web", "", "dc1")),
        ("_web._tcp.service.consul", "SRV", ServiceLookup("web", "", "dc1")),
        ("_web._v1.service.dc2.consul", "SRV", ServiceLookup("web", "v1", "dc2")),
        ("_web._tcp.consul", "SRV", ServiceLookup("web", "", "dc1")),
        ("_web._tcp.dc2.consul", "SRV", ServiceLookup("web", "", "dc2")),
        ("web.connect.consul", "A", ServiceLookup("web", "", "dc1", connect=True)),
        ("web1.node.consul", "A", NodeLookup("web1", "dc1")),
        ("geo-db.query.consul", "A", QueryLookup("geo-db", "dc1")),
        ("geo-db.query.dc2.consul", "SRV", QueryLookup("geo-db", "dc2")),
        ("host.example.node.dc2.consul", "A", NodeLookup("host.example", "dc2")),
        ("0a000002.addr.dc1.consul", "A", AddrLookup("10.0.0.2")),
        ("4.3.2.1.in-addr.arpa", "PTR", PtrLookup("1.2.3.4")),
        ("consul", "SOA", ZoneLookup()),
        ("web.service.consul", "NS", ZoneLookup()),
    ],
)
def test_it_parses_consul_names(name, qtype, expected):
    assert lookup_of(name, qtype) == expected


@pytest.mark.parametrize(
    "name",
    [
        "consul",
        "service.consul",
        "web.consul",
        "web.service.ns1.ns.dc1.dc.consul",
        "zz.addr.consul",
        "0a0000.addr.consul",
    ],
)
def test_it_finds_no_lookup_in_names_outside_the_grammar(name):
    assert isinstance(lookup_of(name), NotFound)


def test_it_refuses_names_outside_the_domain_and_zone_transfers():
    assert lookup_of("example.com") == dns.rcode.REFUSED
    assert lookup_of("web.service.consul.example.com") == dns.rcode.REFUSED
    assert lookup_of("consul", "AXFR") == dns.rcode.NOTIMP


def test_it_serves_the_configured_domain_only():
    cfg = DNSConfig.make("mesh.internal.", "east")
    assert lookup_of("web.service.mesh.internal", cfg=cfg) == ServiceLookup("web", "", "east")
    assert lookup_of("web.service.consul", cfg=cfg) == dns.rcode.REFUSED


# --- services ------------------------------------------------------------------------


def test_it_answers_a_records_of_instances_that_are_not_critical():
    endpoints = [
        Endpoint(WEB1, "", 80, status="passing"),
        Endpoint(WEB2, "", 80, status="warning"),
        Endpoint(NodeInfo("web3", "10.0.0.3", "dc1"), "", 80, status="critical"),
    ]
    reply = reply_for("web.service.consul", "A", endpoints)
    assert reply.rcode == dns.rcode.NOERROR
    assert sorted(texts(reply.answer)) == ["10.0.0.1", "10.0.0.2"]
    assert all(ttl == 0 for _, ttl, _ in reply.answer)


def test_it_answers_nxdomain_with_consuls_soa_when_no_instance_is_healthy():
    endpoints = [Endpoint(WEB1, "", 80, status="critical")]
    for data in (endpoints, []):
        reply = reply_for("web.service.consul", "A", data)
        assert reply.rcode == dns.rcode.NXDOMAIN
        assert reply.answer == []
        [(owner, ttl, soa)] = reply.authority
        assert owner == dns.name.from_text("consul.")
        assert ttl == 0
        assert soa.to_text() == f"ns.consul. hostmaster.consul. {NOW} 3600 600 86400 0"


def test_it_filters_by_tag_case_insensitively():
    endpoints = [
        Endpoint(WEB1, "", 80, tags=("Primary",)),
        Endpoint(WEB2, "", 80, tags=("secondary",)),
    ]
    reply = reply_for("primary.web.service.consul", "A", endpoints)
    assert texts(reply.answer) == ["10.0.0.1"]
    assert reply_for("other.web.service.consul", "A", endpoints).rcode == dns.rcode.NXDOMAIN


def test_it_prefers_the_service_address_over_the_node_address():
    reply = reply_for("web.service.consul", "A", [Endpoint(WEB1, "192.168.1.5", 80)])
    assert texts(reply.answer) == ["192.168.1.5"]


def test_it_answers_each_address_once():
    endpoints = [Endpoint(WEB1, "", 80), Endpoint(WEB1, "", 81)]
    assert texts(reply_for("web.service.consul", "A", endpoints).answer) == ["10.0.0.1"]


def test_it_answers_the_asked_address_family_and_both_for_any():
    endpoints = [Endpoint(WEB1, "", 80), Endpoint(WEB2, "2001:db8::2", 80)]
    assert texts(reply_for("web.service.consul", "A", endpoints).answer) == ["10.0.0.1"]
    assert texts(reply_for("web.service.consul", "AAAA", endpoints).answer) == ["2001:db8::2"]
    assert sorted(texts(reply_for("web.service.consul", "ANY", endpoints).answer)) == [
        "10.0.0.1",
        "2001:db8::2",
    ]


def test_it_answers_nodata_for_a_type_a_service_does_not_have():
    reply = reply_for("web.service.consul", "MX", [Endpoint(WEB1, "", 80)])
    assert reply.rcode == dns.rcode.NOERROR
    assert reply.answer == []
    assert [rd.rdtype for _, _, rd in reply.authority] == [T.SOA]
    reply = reply_for("web.service.consul", "AAAA", [Endpoint(WEB1, "", 80)])
    assert (reply.rcode, reply.answer) == (dns.rcode.NOERROR, [])


def test_it_answers_a_host_name_service_address_as_one_cname():
    endpoints = [Endpoint(WEB1, "db.example.com", 80), Endpoint(WEB2, "db2.example.com", 80)]
    reply = reply_for("db.service.consul", "A", endpoints)
    assert len(reply.answer) == 1
    assert reply.answer[0][2].rdtype == T.CNAME
    assert texts(reply.answer)[0] in ("db.example.com.", "db2.example.com.")


def test_it_prefers_addresses_over_a_cname():
    endpoints = [Endpoint(WEB1, "db.example.com", 80), Endpoint(WEB2, "", 80)]
    assert texts(reply_for("db.service.consul", "A", endpoints).answer) == ["10.0.0.2"]


def test_it_answers_srv_with_node_targets_and_glue():
    endpoints = [Endpoint(WEB1, "", 8080)]
    reply = reply_for("web.service.consul", "SRV", endpoints)
    assert texts(reply.answer) == ["1 1 8080 web1.node.dc1.consul."]
    [(owner, _, glue)] = reply.additional
    assert owner.to_text() == "web1.node.dc1.consul."
    assert glue.to_text() == "10.0.0.1"


def test_it_answers_srv_for_a_service_address_with_an_addr_target():
    reply = reply_for("web.service.consul", "SRV", [Endpoint(WEB1, "192.168.1.5", 9000)])
    assert texts(reply.answer) == ["1 1 9000 c0a80105.addr.dc1.consul."]
    assert [(o.to_text(), rd.to_text()) for o, _, rd in reply.additional] == [
        ("c0a80105.addr.dc1.consul.", "192.168.1.5")
    ]


def test_it_answers_srv_for_a_host_name_address_with_that_target_and_no_glue():
    reply = reply_for("db.service.consul", "SRV", [Endpoint(WEB1, "db.example.com", 5432)])
    assert texts(reply.answer) == ["1 1 5432 db.example.com."]
    assert reply.additional == []


def test_it_weighs_srv_records_by_the_instances_state():
    endpoints = [
        Endpoint(WEB1, "", 80, status="passing", weight_passing=10, weight_warning=2),
        Endpoint(WEB2, "", 80, status="warning", weight_passing=10, weight_warning=2),
    ]
    reply = reply_for("web.service.consul", "SRV", endpoints)
    weights = {rd.target.to_text(): rd.weight for _, _, rd in reply.answer}
    assert weights == {"web1.node.dc1.consul.": 10, "web2.node.dc1.consul.": 2}


def test_it_uses_the_asked_datacenter_in_srv_targets():
    node = NodeInfo("web1", "10.0.0.1", "dc2")
    reply = reply_for("web.service.dc2.consul", "SRV", [Endpoint(node, "", 80)])
    assert texts(reply.answer) == ["1 1 80 web1.node.dc2.consul."]


def test_it_shuffles_answers():
    endpoints = [Endpoint(NodeInfo(f"n{i}", f"10.0.1.{i}", "dc1"), "", 80) for i in range(8)]
    orders = {
        tuple(texts(reply_for("web.service.consul", "A", list(endpoints), seed=s).answer))
        for s in range(10)
    }
    assert len(orders) > 1
    assert all(sorted(o) == sorted(f"10.0.1.{i}" for i in range(8)) for o in orders)


def test_it_uses_the_configured_service_ttl():
    cfg = DNSConfig.make("consul", "dc1", service_ttl=30)
    reply = reply_for("web.service.consul", "SRV", [Endpoint(WEB1, "", 80)], cfg=cfg)
    assert {ttl for _, ttl, _ in reply.answer + reply.additional} == {30}


# --- nodes, addresses, PTR, zone -----------------------------------------------------


def test_it_answers_a_node_with_its_address_and_meta_as_additional_txt():
    reply = reply_for("web1.node.consul", "A", WEB1)
    assert texts(reply.answer) == ["10.0.0.1"]
    assert texts(reply.additional) == ['"zone=a"']
    reply = reply_for("web1.node.consul", "TXT", WEB1)
    assert texts(reply.answer) == ['"zone=a"']


def test_it_encodes_node_meta_as_rfc1464():
    node = NodeInfo("n", "10.0.0.1", "dc1", (("a=b", "x`y"), (" k ", "v"), ("rfc1035-raw", "v=1")))
    assert texts(reply_for("n.node.consul", "TXT", node).answer) == [
        '"a`=b=x``y"',
        '"` k` =v"',
        '"v=1"',
    ]


def test_it_answers_a_node_with_a_host_name_address_as_a_cname():
    node = NodeInfo("ext", "db.example.com", "dc1")
    reply = reply_for("ext.node.consul", "A", node)
    assert [(rd.rdtype, rd.to_text()) for _, _, rd in reply.answer] == [
        (T.CNAME, "db.example.com.")
    ]


def test_it_answers_nxdomain_for_an_unknown_node_and_nodata_for_other_types():
    assert reply_for("nope.node.consul", "A", None).rcode == dns.rcode.NXDOMAIN
    reply = reply_for("web1.node.consul", "MX", WEB1)
    assert (reply.rcode, reply.answer) == (dns.rcode.NOERROR, [])


def test_it_answers_addr_names_with_the_address_they_spell():
    assert texts(reply_for("0a000002.addr.dc1.consul", "A", None).answer) == ["10.0.0.2"]
    name = "20010db8000000000000000000000002.addr.dc1.consul"
    assert texts(reply_for(name, "AAAA", None).answer) == ["2001:db8::2"]


def test_it_answers_ptr_with_the_node_or_service_name():
    reply = reply_for("1.0.0.10.in-addr.arpa", "PTR", [PtrName("node", "web1", "dc1")])
    assert texts(reply.answer) == ["web1.node.dc1.consul."]
    reply = reply_for("1.0.0.10.in-addr.arpa", "PTR", [PtrName("service", "web", "dc1")])
    assert texts(reply.answer) == ["web.service.dc1.consul."]
    assert reply_for("9.0.0.10.in-addr.arpa", "PTR", []).rcode == dns.rcode.NXDOMAIN


def test_it_answers_soa_and_ns_with_the_server_nodes():
    servers = [NodeInfo("mesh-server", "127.0.0.1", "dc1")]
    reply = reply_for("consul", "SOA", servers)
    assert [rd.rdtype for _, _, rd in reply.answer] == [T.SOA]
    assert texts(reply.authority) == ["mesh-server.node.dc1.consul."]
    assert texts(reply.additional) == ["127.0.0.1"]
    reply = reply_for("consul", "NS", servers)
    assert texts(reply.answer) == ["mesh-server.node.dc1.consul."]


# --- on the wire -------------------------------------------------------------------------


def many(n: int) -> list[Endpoint]:
    return [
        Endpoint(NodeInfo(f"node-{i:03d}", f"10.1.{i // 250}.{i % 250}", "dc1"), "", 80 + i)
        for i in range(n)
    ]


def test_it_truncates_a_udp_answer_to_512_bytes_with_tc():
    q = query("web.service.consul", "SRV")
    reply = answer(q.question[0], lookup_of("web.service.consul", "SRV"), many(50), CFG, now=NOW)
    msg = render(q, reply, 512)
    wire = msg.to_wire()
    assert len(wire) <= 512
    assert msg.flags & dns.flags.TC
    assert 0 < len(msg.answer[0]) < 50
    targets = {rd.target for rd in msg.answer[0]}
    # The glue covers exactly the SRV records that were kept.
    assert {rrset.name for rrset in msg.additional} == targets


def test_it_keeps_a_full_answer_within_the_size_asked():
    q = query("web.service.consul", "SRV")
    reply = answer(q.question[0], lookup_of("web.service.consul", "SRV"), many(50), CFG, now=NOW)
    msg = render(q, reply, 65535)
    assert not msg.flags & dns.flags.TC
    assert len(msg.answer[0]) == 50
    assert msg.flags & dns.flags.AA


def test_it_honours_the_edns_payload_size_of_the_query():
    q = query("web.service.consul", "A", use_edns=0, payload=1232)
    reply = answer(q.question[0], lookup_of("web.service.consul"), many(200), CFG, now=NOW)
    assert max_payload(q, tcp=False) == 1232
    msg = render(q, reply, max_payload(q, tcp=False))
    assert 512 < len(msg.to_wire()) <= 1232
    assert msg.flags & dns.flags.TC
    assert msg.edns == 0


def test_it_does_not_claim_authority_in_a_refusal():
    resolver = Resolver(CFG)
    out = asyncio.run(resolver.handle(query("example.com").to_wire(), tcp=False))
    msg = dns.message.from_wire(out)
    assert msg.rcode() == dns.rcode.REFUSED
    assert not msg.flags & dns.flags.AA


def test_it_answers_formerr_to_a_garbled_query_and_nothing_to_noise():
    resolver = Resolver(CFG)
    garbled = query("web.service.consul").to_wire()[:20]
    out = asyncio.run(resolver.handle(garbled, tcp=False))
    assert out is not None
    assert out[:2] == garbled[:2]
    assert out[3] & 0x0F == dns.rcode.FORMERR
    assert asyncio.run(resolver.handle(b"\x00\x01", tcp=False)) is None
    response = dns.message.make_response(query("web.service.consul")).to_wire()
    assert asyncio.run(resolver.handle(response, tcp=False)) is None


def test_it_answers_badvers_to_an_unknown_edns_version():
    out = asyncio.run(Resolver(CFG).handle(query("x.consul", use_edns=1).to_wire(), tcp=False))
    assert dns.message.from_wire(out).rcode() == dns.rcode.BADVERS
