"""What a DNS question asks for: Consul's name grammar, parsed without data.

`classify(query, domain, default_dc)` turns a parsed query into either a
lookup (what to read from the catalog) or an rcode to answer at once. The
grammar follows Consul's DNS interface:

    [<tag>.]<service>.service[.<dc>[.dc]].<domain>
    _<service>._<tag|tcp>[.service][.<dc>[.dc]].<domain>     (RFC 2782, SRV)
    <service>.connect[.<dc>[.dc]].<domain>
    <node>.node[.<dc>[.dc]].<domain>
    <hex-ip>.addr[.<dc>[.dc]].<domain>
    <reversed-ip>.in-addr.arpa / .ip6.arpa                       (PTR)

Names compare case-insensitively; everything is lowered here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename

_KINDS = ("service", "connect", "virtual", "ingress", "node", "query", "addr")
_ARPA = (dns.name.from_text("in-addr.arpa."), dns.name.from_text("ip6.arpa."))


@dataclass(frozen=True)
class ServiceLookup:
    """Instances of `service` (tag-filtered unless `tag` is empty) in `dc`."""

    service: str
    tag: str
    dc: str
    connect: bool = False


@dataclass(frozen=True)
class QueryLookup:
    """`<query>.query[.<dc>].<domain>`: a prepared query by name (or ID), run in `dc`."""

    name: str
    dc: str


@dataclass(frozen=True)
class NodeLookup:
    node: str
    dc: str


@dataclass(frozen=True)
class AddrLookup:
    """`<hex>.addr.<dc>.<domain>`: the address spelled in the name (no data needed)."""

    ip: str


@dataclass(frozen=True)
class PtrLookup:
    """A reverse lookup of `ip` among node and service addresses."""

    ip: str


@dataclass(frozen=True)
class ZoneLookup:
    """SOA or NS asked of any name in the domain: the zone's own records."""


@dataclass(frozen=True)
class NotFound:
    """A name in the domain that cannot exist (bad grammar, prepared queries, ...)."""

    reason: str


Lookup = ServiceLookup | QueryLookup | NodeLookup | AddrLookup | PtrLookup | ZoneLookup | NotFound


def _text(label: bytes) -> str:
    # Labels are bytes on the wire; anything not ASCII cannot name a catalog
    # entry that DNS could answer, so it may as well not match.
    return label.decode("ascii", "replace").lower()


def _locality(suffixes: list[str], default_dc: str) -> str | None:
    """The datacenter from the labels after the kind: none, `<dc>`, or `<dc>.dc`."""
    if not suffixes:
        return default_dc
    if len(suffixes) == 1:
        return suffixes[0]
    if len(suffixes) == 2 and suffixes[1] == "dc":
        return suffixes[0]
    return None  # namespaces, partitions, peers: not served here


def classify(query: dns.message.Message, domain: dns.name.Name, default_dc: str) -> Lookup | int:
    """The lookup a query asks for, or the rcode to answer without one."""
    if query.opcode() != dns.opcode.QUERY:
        return dns.rcode.NOTIMP
    if len(query.question) != 1:
        return dns.rcode.FORMERR
    q = query.question[0]
    if q.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
        return dns.rcode.REFUSED
    if any(q.name.is_subdomain(arpa) for arpa in _ARPA):
        try:
            return PtrLookup(dns.reversename.to_address(q.name))
        except (dns.exception.SyntaxError, ValueError):
            return NotFound("not a reversed address")
    if not q.name.is_subdomain(domain):
        return dns.rcode.REFUSED
    if q.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
        return dns.rcode.NOTIMP
    if q.rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS):
        return ZoneLookup()
    labels = [_text(label) for label in q.name.relativize(domain).labels]
    return parse_labels(labels, q.rdtype, default_dc)


def parse_labels(labels: list[str], qtype: int, default_dc: str) -> Lookup:
    """Consul's dispatch: find the kind label from the right, then read either side."""
    kind, parts, suffixes = "", [], []
    for i in range(len(labels) - 1, -1, -1):
        if labels[i] in _KINDS:
            kind, parts, suffixes = labels[i], labels[:i], labels[i + 1 :]
            break
        if qtype == dns.rdatatype.SRV and labels[i].startswith("_"):
            # RFC 2782 names may leave out the `service` label.
            kind, parts, suffixes = "service", labels[: i + 1], labels[i + 1 :]
            break
    if not kind or not parts:
        return NotFound("no lookup kind")
    dc = _locality(suffixes, default_dc)
    if dc is None:
        return NotFound("unsupported locality")

    if kind == "service":
        if len(parts) == 2 and parts[0].startswith("_") and parts[1].startswith("_"):
            tag = parts[1][1:]
            return ServiceLookup(parts[0][1:], "" if tag == "tcp" else tag, dc)
        return ServiceLookup(parts[-1], ".".join(parts[:-1]), dc)
    if kind == "connect":
        return ServiceLookup(parts[-1], "", dc, connect=True)
    if kind == "node":
        return NodeLookup(".".join(parts), dc)
    if kind == "query":
        return QueryLookup(".".join(parts), dc)
    if kind == "addr":
        ip = _hex_ip(parts)
        return AddrLookup(ip) if ip else NotFound("bad address")
    return NotFound(f"{kind} lookups are not served")


def _hex_ip(parts: list[str]) -> str | None:
    if len(parts) != 1 or len(parts[0]) not in (8, 32):
        return None
    try:
        raw = bytes.fromhex(parts[0])
    except ValueError:
        return None
    return str(ipaddress.ip_address(raw))


def hex_ip(ip: str) -> str:
    """The `.addr.` label for an address (Consul's encoding: the bytes in hex)."""
    return ipaddress.ip_address(ip).packed.hex()
