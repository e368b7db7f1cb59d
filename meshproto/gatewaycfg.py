"""The compiled mesh-gateway configuration: one gateway's routing table.

The control plane builds it (`registry.domain.proxycfg.compile_gateway`) and
sends it down the same gRPC config stream as a sidecar's config; the agent
hands it to its `mesh-gateway` process. Like `meshproto.proxycfg`, one schema
as frozen dataclasses with a strict JSON form.

The routing table is explicit, so that other producers (peerings) can add to
it: a TLS stream whose ClientHello names `sni`

1. matching a `routes` entry exactly goes where that entry says —
   `kind="local"`: one of `endpoints`, healthy sidecars (or Connect-native
   instances) in this datacenter; `kind="remote"`: one of `endpoints`, mesh
   gateways of another datacenter (or of a peer, `peer` set);
2. else ending in a `datacenters` entry's `sni_suffix`
   (`.<dc>.internal.<trust-domain>`) goes to that datacenter's gateways;
3. else it is refused (`unknown_sni`).

A gateway holds no key: it never terminates TLS, so nothing here is secret.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from meshproto.proxycfg import Endpoint, _dump, _load

SCHEMA_VERSION = 1
LOCAL, REMOTE = "local", "remote"
ROUTE_KINDS = (LOCAL, REMOTE)


@dataclass(frozen=True)
class GatewayRoute:
    """Streams whose SNI is exactly `sni` go to one of `endpoints`."""

    sni: str
    kind: str  # local | remote
    service: str
    datacenter: str
    namespace: str = "default"
    subset: str = ""
    peer: str = ""  # set when the destination is another control plane's (a peering)
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class RemoteDatacenter:
    """Streams for any service of datacenter `datacenter` go to its gateways."""

    datacenter: str
    sni_suffix: str  # `.<dc>.internal.<trust-domain>`
    gateways: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class GatewayConfig:
    """Everything one mesh gateway enforces, at one version."""

    version: int
    proxy_id: str  # the gateway's service ID
    service: str  # its service name (`mesh-gateway`)
    node: str
    datacenter: str
    trust_domain: str
    bind_address: str  # its LAN address (where local sidecars dial it)
    port: int
    routes: tuple[GatewayRoute, ...] = ()
    datacenters: tuple[RemoteDatacenter, ...] = ()
    connect_timeout_s: float = 5.0
    # Its WAN address when it differs (where other datacenters' gateways dial it):
    # the gateway listens on both.
    wan_address: str = ""
    wan_port: int = 0
    schema: int = SCHEMA_VERSION

    def listen_addresses(self) -> list[tuple[str, int]]:
        """Where the gateway listens: its LAN address and, if another, its WAN one."""
        out = [(self.bind_address or "0.0.0.0", self.port)]
        wan = (self.wan_address, self.wan_port or self.port)
        if self.wan_address and wan not in out and out[0][0] not in ("0.0.0.0", "::"):
            out.append(wan)
        return out

    def to_json(self) -> dict[str, Any]:
        return _dump(self)

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GatewayConfig:
        """Rebuild from JSON; raises ValueError on anything malformed."""
        if not isinstance(data, dict):
            raise ValueError("gateway config must be a JSON object")
        if data.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"unsupported gateway config schema {data.get('schema')!r}")
        config = _load(cls, data, "config")
        for route in config.routes:
            if route.kind not in ROUTE_KINDS:
                raise ValueError(f"route {route.sni!r}: kind must be local or remote")
            if not route.sni:
                raise ValueError("a route needs an sni")
        for dc in config.datacenters:
            if not dc.sni_suffix.startswith("."):
                raise ValueError(f"datacenter {dc.datacenter!r}: sni_suffix must start with '.'")
        return config

    @classmethod
    def loads(cls, raw: bytes | str) -> GatewayConfig:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"gateway config is not JSON: {exc}") from None
        return cls.from_json(data)


def is_gateway_config(data: Any) -> bool:
    """Whether a config's JSON is a gateway's (it has a routing table, not an inbound)."""
    return isinstance(data, dict) and "routes" in data and "inbound" not in data
