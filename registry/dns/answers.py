"""DNS answers built from plain data: no database, no socket.

`answer(question, lookup, data, config, now=..., rng=...)` returns a `Reply`
(rcode and the records of each section) and `render(query, reply, max_size)`
turns it into a response message that fits `max_size` bytes, truncating with
TC set when it does not. What goes in follows Consul's DNS interface:

- service lookups answer instances that are not critical (passing and warning;
  maintenance is a critical check), in random order; A/AAAA/ANY give the
  service address or else the node address, SRV gives priority 1, the weight
  for the instance's state (Weights.Passing / Weights.Warning), the port and a
  target whose address rides in the additional section: `<node>.node.<dc>.<domain>.`
  for an instance on its node's address, `<hex-ip>.addr.<dc>.<domain>.` for one
  with its own address, the host name itself for one whose address is a name.
  A service address that is a host name is answered as a CNAME (the first one,
  and only when no instance has an address of the asked family).
- node lookups answer the node's address (CNAME for a host name) and its
  metadata as TXT records (RFC 1464 `key=value`; keys `rfc1035-*` give the
  value alone): in the answer for TXT/ANY, in the additional section otherwise.
- unknown names, unknown services and services with no healthy instance are
  NXDOMAIN; a known name without records of the asked type is NODATA
  (NOERROR, empty answer); both carry the zone's SOA in the authority section.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.NS import NS
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.SRV import SRV

from registry.dns.names import (
    AddrLookup,
    Lookup,
    NodeLookup,
    NotFound,
    PtrLookup,
    QueryLookup,
    ServiceLookup,
    ZoneLookup,
    hex_ip,
)

IN = dns.rdataclass.IN
T = dns.rdatatype
PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
# Payload size we advertise in EDNS answers (what we accept is a query's business).
OUR_PAYLOAD = 4096
UDP_MIN, UDP_MAX, TCP_MAX = 512, 65507, 65535


@dataclass(frozen=True)
class DNSConfig:
    """How answers are shaped: the domain, the local dc, TTLs and the SOA's timers."""

    domain: dns.name.Name
    dc: str
    service_ttl: int = 0
    node_ttl: int = 0
    soa_refresh: int = 3600
    soa_retry: int = 600
    soa_expire: int = 86400
    soa_min_ttl: int = 0

    @classmethod
    def make(cls, domain: str, dc: str, service_ttl: int = 0) -> DNSConfig:
        return cls(dns.name.from_text(domain.strip(".").lower() + "."), dc, service_ttl)


@dataclass(frozen=True)
class NodeInfo:
    """A node as DNS needs it."""

    name: str
    address: str
    dc: str
    meta: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Endpoint:
    """One service instance with its node and its aggregated health."""

    node: NodeInfo
    address: str  # the service's own address; "" means the node's
    port: int
    tags: tuple[str, ...] = ()
    status: str = PASSING  # passing | warning | critical (maintenance is critical)
    weight_passing: int = 1
    weight_warning: int = 1


@dataclass(frozen=True)
class PtrName:
    """What an address is known as: a node, or else a service instance."""

    kind: str  # "node" | "service"
    name: str
    dc: str


@dataclass(frozen=True)
class QueryAnswer:
    """What a prepared query selected: its instances, the datacenter that served
    them (after any failover) and the query's own DNS TTL (None: the default)."""

    endpoints: list[Endpoint]
    dc: str
    ttl: int | None = None


Record = tuple[dns.name.Name, int, dns.rdata.Rdata]


@dataclass
class Reply:
    """An answer before it is put on the wire."""

    rcode: int = dns.rcode.NOERROR
    answer: list[Record] = field(default_factory=list)
    authority: list[Record] = field(default_factory=list)
    additional: list[Record] = field(default_factory=list)


# --- small builders ----------------------------------------------------------------


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _ip_rdata(ip, qtype: int) -> dns.rdata.Rdata | None:
    """An A or AAAA for `ip` if the question's type asks for that family."""
    if ip.version == 4:
        return A(IN, T.A, str(ip)) if qtype in (T.A, T.ANY, T.SRV) else None
    return AAAA(IN, T.AAAA, str(ip)) if qtype in (T.AAAA, T.ANY, T.SRV) else None


def _name(labels: list[str], origin: dns.name.Name) -> dns.name.Name | None:
    """An absolute name from text labels, or None when DNS cannot carry it."""
    try:
        return dns.name.Name([lab.encode() for lab in labels] + list(origin.labels))
    except (dns.exception.DNSException, UnicodeError):
        return None


def _hostname(text: str) -> dns.name.Name | None:
    try:
        name = dns.name.from_text(text.rstrip(".") + ".")
    except (dns.exception.DNSException, UnicodeError):
        return None
    return None if name == dns.name.root else name


def node_fqdn(node: str, dc: str, cfg: DNSConfig) -> dns.name.Name | None:
    """`<node>.node.<dc>.<domain>.` (dots in a node name are labels, as in Consul)."""
    return _name([*node.split("."), "node", dc], cfg.domain)


def soa_record(cfg: DNSConfig, now: float) -> Record:
    """Consul's SOA: ns.<domain>., hostmaster.<domain>., serial = now."""
    rd = SOA(
        IN,
        T.SOA,
        dns.name.Name([b"ns", *cfg.domain.labels]),
        dns.name.Name([b"hostmaster", *cfg.domain.labels]),
        int(now) & 0xFFFFFFFF,
        cfg.soa_refresh,
        cfg.soa_retry,
        cfg.soa_expire,
        cfg.soa_min_ttl,
    )
    return (cfg.domain, cfg.soa_min_ttl, rd)


def negative(cfg: DNSConfig, now: float, rcode: int = dns.rcode.NXDOMAIN) -> Reply:
    """NXDOMAIN (or NODATA with NOERROR) with the SOA in the authority section."""
    return Reply(rcode=rcode, authority=[soa_record(cfg, now)])


def _rfc1464(key: str, value: str) -> str:
    if key.lower().startswith("rfc1035-"):
        return value
    key = key.replace("`", "``").replace("=", "`=")
    stripped = key.lstrip(" ")
    key = "` " * (len(key) - len(stripped)) + stripped
    stripped = key.rstrip(" ")
    key = stripped + "` " * (len(key) - len(stripped))
    return f"{key}={value.replace('`', '``')}"


def _txt(text: str) -> TXT:
    raw = text.encode()
    # One TXT string holds 255 bytes; longer values span several strings.
    return TXT(IN, T.TXT, [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""])


# --- answers per lookup --------------------------------------------------------


def answer(
    question: dns.rrset.RRset,
    lookup: Lookup,
    data: object,
    cfg: DNSConfig,
    *,
    now: float,
    rng: random.Random | None = None,
) -> Reply:
    """The reply to `question` given what was read for `lookup`."""
    qname, qtype = question.name, question.rdtype
    if isinstance(lookup, ServiceLookup):
        return answer_service(qname, qtype, lookup, data, cfg, now=now, rng=rng)  # type: ignore[arg-type]
    if isinstance(lookup, QueryLookup):
        return answer_query(qname, qtype, data, cfg, now=now, rng=rng)  # type: ignore[arg-type]
    if isinstance(lookup, NodeLookup):
        return answer_node(qname, qtype, data, cfg, now=now)  # type: ignore[arg-type]
    if isinstance(lookup, AddrLookup):
        return answer_addr(qname, qtype, lookup.ip, cfg, now=now)
    if isinstance(lookup, PtrLookup):
        return answer_ptr(qname, qtype, data, cfg, now=now)  # type: ignore[arg-type]
    if isinstance(lookup, ZoneLookup):
        return answer_zone(qtype, data, cfg, now=now)  # type: ignore[arg-type]
    assert isinstance(lookup, NotFound)
    return negative(cfg, now)


def healthy(endpoints: list[Endpoint], tag: str) -> list[Endpoint]:
    """Instances DNS answers: not critical, carrying `tag` (case-insensitive) if given."""
    tag = tag.lower()
    return [
        e
        for e in endpoints
        if e.status != CRITICAL and (not tag or any(t.lower() == tag for t in e.tags))
    ]


def answer_service(
    qname: dns.name.Name,
    qtype: int,
    lookup: ServiceLookup,
    endpoints: list[Endpoint],
    cfg: DNSConfig,
    *,
    now: float,
    rng: random.Random | None = None,
) -> Reply:
    chosen = healthy(endpoints, lookup.tag)
    if not chosen:
        return negative(cfg, now)
    (rng or random).shuffle(chosen)  # spread load, as Consul does
    ttl = cfg.service_ttl
    if qtype == T.SRV:
        reply = _srv_records(qname, lookup.dc, chosen, cfg, ttl)
    elif qtype in (T.A, T.AAAA, T.ANY):
        reply = Reply(answer=_address_records(qname, qtype, chosen, ttl))
    else:
        reply = Reply()
    return reply if reply.answer else negative(cfg, now, dns.rcode.NOERROR)


def answer_query(
    qname: dns.name.Name,
    qtype: int,
    found: QueryAnswer | None,
    cfg: DNSConfig,
    *,
    now: float,
    rng: random.Random | None = None,
) -> Reply:
    """A prepared query's answer: as a service's, from the datacenter that served it."""
    if found is None:
        return negative(cfg, now)
    if found.ttl is not None:
        cfg = dataclasses.replace(cfg, service_ttl=found.ttl)
    return answer_service(
        qname, qtype, ServiceLookup("", "", found.dc), found.endpoints, cfg, now=now, rng=rng
    )


def _address_records(
    qname: dns.name.Name, qtype: int, endpoints: list[Endpoint], ttl: int
) -> list[Record]:
    out: list[Record] = []
    seen: set = set()
    cname: Record | None = None
    for e in endpoints:
        addr = e.address or e.node.address
        ip = _ip(addr)
        if ip is None and e.address and _hostname(e.address) == qname:
            # A service address naming the question itself means "the node".
            ip = _ip(e.node.address)
        if ip is None:
            target = _hostname(addr)
            if cname is None and target is not None:
                cname = (qname, ttl, CNAME(IN, T.CNAME, target))
            continue
        rd = _ip_rdata(ip, qtype)
        if rd is not None and ip not in seen:
            seen.add(ip)
            out.append((qname, ttl, rd))
    # Several CNAMEs for one name are illegal, and a CNAME beside addresses too.
    return out if out or cname is None else [cname]


def _srv_records(
    qname: dns.name.Name, dc: str, endpoints: list[Endpoint], cfg: DNSConfig, ttl: int
) -> Reply:
    reply = Reply()
    seen: set[tuple[str, str, int]] = set()
    glue: dict[dns.name.Name, Record] = {}
    for e in endpoints:
        key = (e.node.name, e.address, e.port)
        if key in seen:
            continue
        seen.add(key)
        target, ip = None, None
        service_ip, node_ip = _ip(e.address), _ip(e.node.address)
        if service_ip is not None:
            target, ip = _name([hex_ip(e.address), "addr", dc], cfg.domain), service_ip
        elif not e.address or (_hostname(e.address) == qname and node_ip is not None):
            if node_ip is not None:
                target, ip = node_fqdn(e.node.name, dc, cfg), node_ip
            else:
                target = _hostname(e.node.address)
        else:
            target = _hostname(e.address)
        if target is None:
            continue
        weight = e.weight_warning if e.status == WARNING else e.weight_passing
        srv = SRV(IN, T.SRV, 1, max(0, min(65535, weight)), e.port & 0xFFFF, target)
        reply.answer.append((qname, ttl, srv))
        if ip is not None and target not in glue:
            glue[target] = (target, ttl, _ip_rdata(ip, T.SRV))
    reply.additional = list(glue.values())
    return reply


def answer_node(
    qname: dns.name.Name, qtype: int, node: NodeInfo | None, cfg: DNSConfig, *, now: float
) -> Reply:
    if node is None:
        return negative(cfg, now)
    if qtype not in (T.A, T.AAAA, T.ANY, T.TXT):
        return negative(cfg, now, dns.rcode.NOERROR)
    reply = Reply()
    ttl = cfg.node_ttl
    if qtype != T.TXT:
        ip = _ip(node.address)
        if ip is not None:
            rd = _ip_rdata(ip, qtype)
            if rd is not None:
                reply.answer.append((qname, ttl, rd))
        elif (target := _hostname(node.address)) is not None:
            reply.answer.append((qname, ttl, CNAME(IN, T.CNAME, target)))
    txt = [(qname, ttl, _txt(_rfc1464(k, v))) for k, v in node.meta]
    if qtype in (T.TXT, T.ANY):
        reply.answer.extend(txt)
    elif reply.answer:
        reply.additional.extend(txt)
    return reply if reply.answer else negative(cfg, now, dns.rcode.NOERROR)


def answer_addr(
    qname: dns.name.Name, qtype: int, ip_text: str, cfg: DNSConfig, *, now: float
) -> Reply:
    ip = _ip(ip_text)
    rd = _ip_rdata(ip, qtype) if ip is not None and qtype != T.SRV else None
    if rd is None:
        return negative(cfg, now, dns.rcode.NOERROR)
    return Reply(answer=[(qname, cfg.node_ttl, rd)])


def answer_ptr(
    qname: dns.name.Name, qtype: int, names: list[PtrName], cfg: DNSConfig, *, now: float
) -> Reply:
    if not names:
        return negative(cfg, now)
    if qtype not in (T.PTR, T.ANY):
        return negative(cfg, now, dns.rcode.NOERROR)
    first = names[0]  # Consul answers the first node, else the first service
    target = (
        node_fqdn(first.name, first.dc, cfg)
        if first.kind == "node"
        else _name([first.name, "service", first.dc], cfg.domain)
    )
    if target is None:
        return negative(cfg, now)
    return Reply(answer=[(qname, 0, PTR(IN, T.PTR, target))])


def answer_zone(qtype: int, servers: list[NodeInfo], cfg: DNSConfig, *, now: float) -> Reply:
    """SOA and NS of the zone: the servers are `<node>.node.<dc>.<domain>.` with glue."""
    ns: list[Record] = []
    glue: list[Record] = []
    for server in servers[:3]:
        target, ip = node_fqdn(server.name, server.dc, cfg), _ip(server.address)
        if target is None:
            continue
        ns.append((cfg.domain, cfg.node_ttl, NS(IN, T.NS, target)))
        if ip is not None:
            glue.append((target, cfg.node_ttl, _ip_rdata(ip, T.ANY)))
    if qtype == T.SOA:
        return Reply(answer=[soa_record(cfg, now)], authority=ns, additional=glue)
    return Reply(answer=ns, additional=glue)


# --- on the wire --------------------------------------------------------------------


def max_payload(query: dns.message.Message, *, tcp: bool) -> int:
    """Bytes a response may take: 64 KiB on TCP; 512 or the EDNS payload size on UDP."""
    if tcp:
        return TCP_MAX
    size = query.payload if query.edns >= 0 else UDP_MIN
    return max(UDP_MIN, min(size, UDP_MAX))


def _add(section: list, records: list[Record]) -> None:
    """Group records into RRsets in first-seen order (the shuffled order survives)."""
    sets: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
    for name, ttl, rd in records:
        rrset = sets.get((name, rd.rdtype))
        if rrset is None:
            rrset = sets[(name, rd.rdtype)] = dns.rrset.RRset(name, IN, rd.rdtype)
            section.append(rrset)
        rrset.add(rd, ttl)


def _message(
    query: dns.message.Message,
    rcode: int,
    answer: list[Record],
    authority: list[Record],
    additional: list[Record],
) -> dns.message.Message:
    msg = dns.message.make_response(query, our_payload=OUR_PAYLOAD)
    if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        msg.flags |= dns.flags.AA  # authoritative for the domain; not for refusals
    msg.set_rcode(rcode)
    _add(msg.answer, answer)
    _add(msg.authority, authority)
    _add(msg.additional, additional)
    return msg


def wire_size(msg: dns.message.Message) -> int:
    try:
        return len(msg.to_wire(max_size=TCP_MAX))
    except dns.exception.TooBig:
        return TCP_MAX + 1


def _glue_for(answer: list[Record], additional: list[Record]) -> list[Record]:
    """The additional records still needed by the SRV targets left in `answer`."""
    targets = {rd.target for _, _, rd in answer if rd.rdtype == T.SRV}
    return [r for r in additional if r[0] in targets]


def render(query: dns.message.Message, reply: Reply, max_size: int) -> dns.message.Message:
    """The response message, cut to `max_size` bytes with TC set if answers had to go.

    Cutting drops the authority section first, then answers from the end (they
    are shuffled, so which ones go is random), keeping only the glue the
    remaining SRV records need.
    """
    msg = _message(query, reply.rcode, reply.answer, reply.authority, reply.additional)
    if wire_size(msg) <= max_size:
        return msg

    def cut(k: int) -> dns.message.Message:
        kept = reply.answer[:k]
        return _message(query, reply.rcode, kept, [], _glue_for(kept, reply.additional))

    lo, hi = 0, len(reply.answer)
    best = cut(hi)
    if wire_size(best) <= max_size:
        return best  # the authority section was all that did not fit
    best = cut(0)
    # Invariant: cut(lo) fits (or nothing does), cut(hi) does not.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = cut(mid)
        if wire_size(candidate) <= max_size:
            lo, best = mid, candidate
        else:
            hi = mid
    best.flags |= dns.flags.TC
    return best
