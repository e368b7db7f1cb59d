"""Real `mesh-gateway` processes for tests, fed like the agent feeds them."""

from __future__ import annotations

import sys
from pathlib import Path

from meshproto.gatewaycfg import GatewayConfig, GatewayRoute, RemoteDatacenter
from meshproto.proxycfg import Endpoint
from tests.proxy.support import TRUST_DOMAIN, FedProcess, free_port

GATEWAY = str(Path(sys.executable).with_name("mesh-gateway"))


def sni(service: str, dc: str, subset: str = "") -> str:
    base = f"{service}.default.{dc}.internal.{TRUST_DOMAIN}"
    return f"{subset}.{base}" if subset else base


def gateway_config(
    dc: str,
    port: int,
    *,
    version: int = 1,
    local: dict[str, list[int]] | None = None,
    remote: dict[str, list[int]] | None = None,
) -> dict:
    """A GatewayConfig JSON: local services (SNI -> loopback ports) and remote
    datacenters (dc -> their gateways' loopback ports)."""
    routes = tuple(
        GatewayRoute(
            sni=name if "." in name else sni(name, dc),
            kind="local",
            service=name.split(".")[0],
            datacenter=dc,
            endpoints=tuple(Endpoint("127.0.0.1", p) for p in ports),
        )
        for name, ports in (local or {}).items()
    )
    dcs = tuple(
        RemoteDatacenter(
            datacenter=other,
            sni_suffix=f".{other}.internal.{TRUST_DOMAIN}",
            gateways=tuple(Endpoint("127.0.0.1", p) for p in ports),
        )
        for other, ports in (remote or {}).items()
    )
    return GatewayConfig(
        version=version,
        proxy_id=f"gw-{dc}",
        service="mesh-gateway",
        node=f"gw-{dc}",
        datacenter=dc,
        trust_domain=TRUST_DOMAIN,
        bind_address="127.0.0.1",
        port=port,
        routes=routes,
        datacenters=dcs,
        connect_timeout_s=2.0,
    ).to_json()


class GatewayProcess(FedProcess):
    """A `mesh-gateway` fed over an `AgentSocket` (the agent's end of the protocol)."""

    def __init__(self, tmp: Path, name: str, *extra: str) -> None:
        self.port = free_port()
        super().__init__(GATEWAY, tmp, name, *extra)

    def push(self, config: dict, timeout: float = 10.0) -> dict:
        return self.agent.push({"config": config}, timeout)

    def refused(self, reason: str) -> float:
        return self.metrics().get(f'mesh_gateway_refused_total{{reason="{reason}"}}', 0.0)


def key_needles(key_pem: str) -> list[bytes]:
    """Byte strings by which a process holding this private key would betray it:
    its PEM body lines, and its private scalar big- and little-endian (OpenSSL
    keeps BIGNUMs as little-endian words)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_pem.encode(), None)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    lines = [ln.encode() for ln in key_pem.splitlines() if ln and not ln.startswith("-----")]
    return [scalar, scalar[::-1], *(ln for ln in lines if len(ln) >= 40)]


def memory_holds(pid: int, needles: list[bytes]) -> bool:
    """Whether any readable mapping of process `pid` contains any of `needles` (root)."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split()
            if "r" not in parts[1]:
                continue
            if len(parts) > 5 and parts[5] in ("[vvar]", "[vsyscall]"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            if any(n in data for n in needles):
                found = True
                break
    return found
