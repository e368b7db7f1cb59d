"""Two "clouds" as network namespaces; only their gateway hosts reach each other.

    root namespace:  bridge mwc1-<r> 10.201.<c1>.1/24   (the control plane binds here)
                     bridge mwc2-<r> 10.201.<c2>.1/24
    cloud 1:         A   10.201.<c1>.2   (an agent: web, api)
                     G1  10.201.<c1>.3   (an agent running the dc1 mesh gateway)
    cloud 2:         B   10.201.<c2>.2   (an agent: api)
                     G2  10.201.<c2>.3   (an agent running the dc2 mesh gateway)
    WAN link:        G1 10.201.<w>.1/24 <-- veth mwwan-<r> --> G2 10.201.<w>.2/24

Each cloud's hosts share a bridge (LAN). Cloud 2's hosts reach the control
plane's address through a host route via their bridge's root address: the
root namespace answers for its own address on any interface without
forwarding (and forwarding is off), so A cannot reach B nor B reach A: the
only path between the clouds is the WAN link between the gateway hosts.
`close()` kills what runs in the namespaces and removes everything made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.e2e.netns import Namespaces, _free_subnet, _ip

# The gateway hosts' mesh gateways listen here (each namespace has its own ports).
GW_PORT = 8443
CHECK = {"interval": "1s", "timeout": "1s"}


def api_service() -> dict:
    """The agent definition of `api` (port 9091, health-checked, sidecar on 21001)."""
    return {
        "service": {
            "name": "api",
            "port": 9091,
            "check": {"http": "http://127.0.0.1:9091/healthz", **CHECK},
            "connect": {"sidecar_service": {"port": 21001}},
        }
    }


@dataclass
class Clouds(Namespaces):
    """Two clouds of two hosts each, joined only by a WAN link between their gateway hosts."""

    subnets: dict[str, int] = field(default_factory=dict)  # "c1", "c2", "wan" -> third octet
    wan: dict[str, str] = field(default_factory=dict)  # "G1"/"G2" -> WAN address
    wan_ifaces: dict[str, str] = field(default_factory=dict)  # "G1"/"G2" -> interface name

    @property
    def gateway(self) -> str:
        """The control plane's address (cloud 1's bridge in the root namespace)."""
        return f"10.201.{self.subnets['c1']}.1"

    def _subnet(self) -> int:
        for _ in range(20):
            n = _free_subnet()
            if n not in self.subnets.values():
                return n
        raise RuntimeError("no free subnet")

    def create(self) -> Clouds:
        try:
            for key in ("c1", "c2", "wan"):
                self.subnets[key] = self._subnet()
            for cloud, labels in (("c1", ("A", "G1")), ("c2", ("B", "G2"))):
                bridge = f"mw{cloud}-{self.suffix}"
                root = f"10.201.{self.subnets[cloud]}.1"
                self._bridge(bridge, root)
                for i, label in enumerate(labels):
                    host = self._host(label, bridge, f"10.201.{self.subnets[cloud]}.{i + 2}")
                    if cloud == "c2":  # the control plane's address, answered by the root
                        _ip("-n", host.name, "route", "add", f"{self.gateway}/32", "via", root)
            # The WAN link: a veth pair straight between the gateway hosts.
            w1, w2 = f"mwwan-{self.suffix}", f"mwwan-{self.suffix}-p"
            _ip("link", "add", w1, "type", "veth", "peer", "name", w2)
            self._made.append(("link", w1))
            for label, iface, octet in (("G1", w1, 1), ("G2", w2, 2)):
                ns = self.hosts[label].name
                _ip("link", "set", iface, "netns", ns)
                address = f"10.201.{self.subnets['wan']}.{octet}"
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", iface)
                _ip("-n", ns, "link", "set", iface, "up")
                self.wan[label] = address
                self.wan_ifaces[label] = iface
        except Exception:
            self.close()
            raise
        return self

    def gateway_service(self, label: str) -> dict:
        """The agent definition that starts gateway host `label`'s ("G1", "G2") mesh
        gateway: LAN address on its cloud's bridge, WAN address on the WAN link."""
        lan = self.hosts[label].address
        return {
            "service": {
                "kind": "mesh-gateway",
                "name": "mesh-gateway",
                "port": GW_PORT,
                "address": lan,
                "tagged_addresses": {
                    "lan": {"address": lan, "port": GW_PORT},
                    "wan": {"address": self.wan[label], "port": GW_PORT},
                },
                "check": {"tcp": f"{lan}:{GW_PORT}", **CHECK},
            }
        }
