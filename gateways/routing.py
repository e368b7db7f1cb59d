"""A gateway's routing table, built from a `GatewayConfig`: SNI -> where to splice.

Built once per config (the gateway swaps the whole table atomically) and read
once per connection. Exact SNI routes first, then the remote datacenters'
SNI suffixes (longest first), as `meshproto.gatewaycfg` describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshproto.gatewaycfg import LOCAL, REMOTE, GatewayConfig

Address = tuple[str, int]


@dataclass
class Target:
    """Where one SNI leads, with its endpoints' round-robin cursor."""

    kind: str  # local | remote
    service: str  # "" for a whole remote datacenter
    datacenter: str
    peer: str = ""
    endpoints: tuple[Address, ...] = ()
    _next: int = field(default=0, repr=False)

    def order(self) -> list[Address]:
        """The endpoints to try for one connection, starting at the next in turn."""
        n = len(self.endpoints)
        if not n:
            return []
        start = self._next % n
        self._next = start + 1
        return [*self.endpoints[start:], *self.endpoints[:start]]


class RoutingTable:
    """SNI -> Target for one config version."""

    def __init__(self, config: GatewayConfig | None = None) -> None:
        self.version = 0
        self.datacenter = ""
        self.exact: dict[str, Target] = {}
        self.suffixes: list[tuple[str, Target]] = []
        # Remote gateways' addresses -> their datacenter (a stream's source dc).
        self.gateway_dcs: dict[str, str] = {}
        if config is not None:
            self._build(config)

    def _build(self, config: GatewayConfig) -> None:
        self.version = config.version
        self.datacenter = config.datacenter
        for r in config.routes:
            self.exact[r.sni.lower()] = Target(
                kind=r.kind,
                service=r.service,
                datacenter=r.datacenter,
                peer=r.peer,
                endpoints=tuple((e.address, e.port) for e in r.endpoints),
            )
            if r.kind == REMOTE:
                for e in r.endpoints:
                    self.gateway_dcs.setdefault(e.address, r.peer or r.datacenter)
        for dc in sorted(config.datacenters, key=lambda d: -len(d.sni_suffix)):
            if dc.datacenter == config.datacenter:
                continue  # our own datacenter's services are exact routes
            self.suffixes.append(
                (
                    dc.sni_suffix.lower(),
                    Target(
                        kind=REMOTE,
                        service="",
                        datacenter=dc.datacenter,
                        endpoints=tuple((e.address, e.port) for e in dc.gateways),
                    ),
                )
            )
            for e in dc.gateways:
                self.gateway_dcs.setdefault(e.address, dc.datacenter)

    def lookup(self, sni: str) -> Target | None:
        target = self.exact.get(sni)
        if target is not None:
            return target
        for suffix, target in self.suffixes:
            if sni.endswith(suffix) and len(sni) > len(suffix):
                return target
        return None

    def source_dc(self, peer_ip: str) -> str:
        """The datacenter a stream comes from: a remote gateway's, else ours."""
        return self.gateway_dcs.get(peer_ip, self.datacenter)

    def describe(self) -> list[dict]:
        """The table as rows (for logs and `mesh gateway routes`)."""
        rows = [
            {"match": sni, "kind": t.kind, "service": t.service, "datacenter": t.datacenter}
            | {"endpoints": [f"{a}:{p}" for a, p in t.endpoints]}
            for sni, t in sorted(self.exact.items())
        ]
        rows += [
            {"match": "*" + s, "kind": t.kind, "service": "*", "datacenter": t.datacenter}
            | {"endpoints": [f"{a}:{p}" for a, p in t.endpoints]}
            for s, t in self.suffixes
        ]
        return rows


__all__ = ["LOCAL", "REMOTE", "RoutingTable", "Target"]
