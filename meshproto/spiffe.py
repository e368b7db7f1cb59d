"""SPIFFE IDs and mesh-gateway SNI names (pure functions).

Service identity: `spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<service>`.
Agent identity:   `spiffe://<trust-domain>/agent/client/dc/<dc>/id/<node>`.
Gateway SNI:      `<service>.<ns>.<dc>.internal.<trust-domain>` (Consul's format).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")


class SpiffeError(ValueError):
    """A malformed SPIFFE ID or name part."""


@dataclass(frozen=True)
class ServiceID:
    trust_domain: str
    namespace: str
    datacenter: str
    service: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/dc/{self.datacenter}/svc/{self.service}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class AgentID:
    trust_domain: str
    datacenter: str
    node: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/agent/client/dc/{self.datacenter}/id/{self.node}"

    def __str__(self) -> str:
        return self.uri


def _check(part: str, what: str) -> str:
    if not part or not _LABEL.match(part):
        raise SpiffeError(f"invalid {what} {part!r} in SPIFFE ID")
    return part


def check_trust_domain(domain: str) -> str:
    if not _TRUST_DOMAIN.match(domain or ""):
        raise SpiffeError(f"invalid trust domain {domain!r}")
    return domain


def service_id(trust_domain: str, service: str, dc: str, namespace: str = "default") -> ServiceID:
    return ServiceID(
        check_trust_domain(trust_domain),
        _check(namespace, "namespace"),
        _check(dc, "datacenter"),
        _check(service, "service"),
    )


def agent_id(trust_domain: str, node: str, dc: str) -> AgentID:
    return AgentID(check_trust_domain(trust_domain), _check(dc, "datacenter"), _check(node, "node"))


def parse(uri: str) -> ServiceID | AgentID:
    """Parse a service or agent SPIFFE ID; anything else raises SpiffeError."""
    if not isinstance(uri, str) or not uri.startswith("spiffe://"):
        raise SpiffeError(f"not a SPIFFE ID: {uri!r}")
    rest = uri[len("spiffe://") :]
    domain, _, path = rest.partition("/")
    check_trust_domain(domain)
    parts = path.split("/")
    if len(parts) == 6 and parts[0] == "ns" and parts[2] == "dc" and parts[4] == "svc":
        return service_id(domain, parts[5], parts[3], parts[1])
    if len(parts) == 6 and parts[:3] == ["agent", "client", "dc"] and parts[4] == "id":
        return agent_id(domain, parts[5], parts[3])
    raise SpiffeError(f"not a SPIFFE ID meshweb issues: {uri!r}")


def gateway_sni(service: str, namespace: str, dc: str, trust_domain: str) -> str:
    """The SNI a client sends so that a mesh gateway can route by ClientHello alone."""
    return f"{service}.{namespace}.{dc}.internal.{trust_domain}"


def parse_sni(sni: str, trust_domain: str) -> tuple[str, str, str] | None:
    """(service, namespace, dc) from a gateway SNI in this trust domain, else None."""
    suffix = f".internal.{trust_domain}"
    if not sni.endswith(suffix):
        return None
    parts = sni[: -len(suffix)].split(".")
    if len(parts) != 3 or not all(parts):
        return None
    service, namespace, dc = parts
    return service, namespace, dc
