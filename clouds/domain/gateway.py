"""Cloud gateway config: what a datacenter's mesh gateway needs, and its firewall.

Gathered from the catalog (every `mesh-gateway` service, whoever registered
it), then shaped by pure functions: the gateway's service definition, the
peer gateways (their WAN addresses and the SNI domains they route), the agent
command, and the cloud firewall rules (for AWS: security-group ingress on the
gateway's port from each peer gateway's address). `apply_firewall` brings a
security group to those rules through the datacenter's cloud account: it
plans with `clouds.diff.firewall_plan`, so a second apply changes nothing.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from clouds import diff
from clouds.domain.accounts import CredentialsError, spec_of
from clouds.models import CloudAccount
from clouds.providers import open_provider
from clouds.providers.base import IngressRule, ProviderError
from registry import topics as topic
from registry.domain import connect_ca, datacenters
from registry.errors import BadRequest, MeshError
from registry.models import ServiceInstance
from registry.txn import Change

GATEWAY_KIND = "mesh-gateway"
DEFAULT_PORT = 8443  # Consul's default mesh gateway port


class CloudError(MeshError):
    """The cloud refused or failed a call (502: the fault is upstream of us)."""

    status = 502


@dataclass(frozen=True)
class Gateway:
    datacenter: str
    node: str
    service_id: str
    address: str  # the WAN address peers reach it at
    port: int


def _wan(svc: ServiceInstance) -> tuple[str, int]:
    tagged = svc.tagged_addresses or {}
    for key in ("wan", "wan_ipv4"):
        wan = tagged.get(key)
        if isinstance(wan, dict) and wan.get("Address"):
            return wan["Address"], int(wan.get("Port") or svc.port)
    return svc.address or svc.node.address, svc.port


def gateways() -> list[Gateway]:
    """Every mesh gateway the catalog holds, with its WAN address."""
    rows = ServiceInstance.objects.select_related("node__datacenter").filter(kind=GATEWAY_KIND)
    out = []
    for svc in rows.order_by("node__datacenter__name", "node__name", "service_id"):
        address, port = _wan(svc)
        out.append(Gateway(svc.node.datacenter.name, svc.node.name, svc.service_id, address, port))
    return out


def ingress_rules(port: int, peers: list[Gateway]) -> tuple[list[IngressRule], list[str]]:
    """The ingress rules for `port` from each peer gateway's address (pure), and notes
    for the peers no rule can be written for."""
    rules, notes = set(), []
    for p in peers:
        try:
            ip = ipaddress.ip_address(p.address)
        except ValueError:
            notes.append(
                f"peer gateway {p.node} ({p.datacenter}) has address {p.address!r}, not an IP: add its rule by hand"
            )
            continue
        if ip.version != 4:
            notes.append(f"peer gateway {p.node} ({p.datacenter}): IPv6 {ip} is not managed yet")
            continue
        rules.add(
            IngressRule("tcp", port, f"{ip}/32", f"{diff.RULE_PREFIX} {p.datacenter}/{p.node}")
        )
    return sorted(rules), notes


def _account(dc: str) -> CloudAccount | None:
    return (
        CloudAccount.objects.filter(datacenter=dc)
        .exclude(gateway_security_group="")
        .order_by("name")
        .first()
    )


def _rule_json(r: IngressRule) -> dict[str, Any]:
    return {"protocol": r.protocol, "port": r.port, "cidr": r.cidr, "description": r.description}


def gateway_config(dc_name: str, *, agent_command: str = "") -> dict[str, Any]:
    """What a mesh gateway of datacenter `dc_name` needs (404 for an unknown one)."""
    dc = datacenters.get_datacenter(dc_name)
    trust_domain = connect_ca.trust_domain()
    every = gateways()
    local = [g for g in every if g.datacenter == dc.name]
    peers = [g for g in every if g.datacenter != dc.name]
    port = local[0].port if local else DEFAULT_PORT
    rules, notes = ingress_rules(port, peers)
    account = _account(dc.name)
    definition = {
        "service": {
            "name": GATEWAY_KIND,
            "kind": GATEWAY_KIND,
            "port": port,
            "tagged_addresses": {
                "lan": {"address": "<this host's address>", "port": port},
                "wan": {
                    "address": local[0].address if local else "<this gateway's public address>",
                    "port": port,
                },
            },
            "meta": {"datacenter": dc.name},
        }
    }
    return {
        "datacenter": dc.name,
        "provider": dc.provider,
        "region": dc.region,
        "sni_domain": f"{dc.name}.internal.{trust_domain}",
        "port": port,
        "gateways": [_gateway_json(g, trust_domain) for g in local],
        "service_definition": definition,
        "peers": [_gateway_json(g, trust_domain) for g in peers],
        "agent_command": agent_command,
        "firewall": {
            "provider": dc.provider,
            "account": account.name if account else None,
            "security_group": account.gateway_security_group if account else None,
            "ingress": [_rule_json(r) for r in rules],
            "notes": notes,
        },
    }


def _gateway_json(g: Gateway, trust_domain: str) -> dict[str, Any]:
    return {
        "datacenter": g.datacenter,
        "node": g.node,
        "service_id": g.service_id,
        "address": g.address,
        "port": g.port,
        "sni_domain": f"{g.datacenter}.internal.{trust_domain}",
    }


def apply_firewall(dc_name: str, *, dry_run: bool = False) -> dict[str, Any]:
    """Bring the datacenter's gateway security group to the rules; returns the plan
    and whether it was applied. A second apply finds nothing to do."""
    config = gateway_config(dc_name)
    account = _account(config["datacenter"])
    if account is None:
        raise BadRequest(
            f'No cloud account with a gateway_security_group is attached to datacenter "{dc_name}"'
        )
    group = account.gateway_security_group
    wanted = [IngressRule(**r) for r in config["firewall"]["ingress"]]
    try:
        provider = open_provider(account.provider, spec_of(account))
        plan = diff.firewall_plan(group, wanted, provider.firewall_state(group))
        if not dry_run and not plan.empty:
            provider.apply_firewall(plan)
    except (ProviderError, CredentialsError) as exc:
        raise CloudError(f"cloud account {account.name}: {exc}") from None
    applied = not dry_run and not plan.empty
    if applied:
        with Change() as change:
            change.touch(topic.CLOUDS)
            change.audit(
                "cloud.firewall.apply",
                "security-group",
                f"{account.name}/{group}",
                None,
                {
                    "add": [_rule_json(r) for r in plan.add],
                    "remove": [_rule_json(r) for r in plan.remove],
                },
            )
    return {
        "datacenter": config["datacenter"],
        "account": account.name,
        "security_group": group,
        "add": [_rule_json(r) for r in plan.add],
        "remove": [_rule_json(r) for r in plan.remove],
        "unchanged": plan.empty,
        "applied": applied,
        "dry_run": dry_run,
        "notes": config["firewall"]["notes"],
    }
