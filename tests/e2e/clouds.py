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

import secrets
from dataclasses import dataclass, field

from tests.e2e.netns import Host, _free_subnet, _ip, _kill_all


@dataclass
class Clouds:
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    subnets: dict[str, int] = field(default_factory=dict)  # "c1", "c2", "wan" -> third octet
    hosts: dict[str, Host] = field(default_factory=dict)
    wan: dict[str, str] = field(default_factory=dict)  # "G1"/"G2" -> WAN address
    wan_ifaces: dict[str, str] = field(default_factory=dict)  # "G1"/"G2" -> interface name
    _made: list[tuple[str, str]] = field(default_factory=list)

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
                _ip("link", "add", bridge, "type", "bridge")
                self._made.append(("link", bridge))
                root = f"10.201.{self.subnets[cloud]}.1"
                _ip("addr", "add", f"{root}/24", "dev", bridge)
                _ip("link", "set", bridge, "up")
                for i, label in enumerate(labels):
                    ns = f"mw{label}-{self.suffix}"
                    _ip("netns", "add", ns)
                    self._made.append(("netns", ns))
                    outer = f"mw{label.lower()}-{self.suffix}"
                    inner = f"{outer}-p"
                    _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                    self._made.append(("link", outer))
                    _ip("link", "set", inner, "netns", ns)
                    _ip("link", "set", outer, "master", bridge)
                    _ip("link", "set", outer, "up")
                    address = f"10.201.{self.subnets[cloud]}.{i + 2}"
                    _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
                    _ip("-n", ns, "link", "set", inner, "up")
                    _ip("-n", ns, "link", "set", "lo", "up")
                    if cloud == "c2":  # the control plane's address, answered by the root
                        _ip("-n", ns, "route", "add", f"{self.gateway}/32", "via", root)
                    self.hosts[label] = Host(ns, address)
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

    def close(self) -> None:
        for host in self.hosts.values():
            _kill_all(host)
        for kind, name in reversed(self._made):
            if kind == "netns":
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)
        self._made.clear()

    def leftovers(self) -> list[str]:
        left = [n for n in _ip("netns", "list").stdout.split() if n.endswith(self.suffix)]
        links = _ip("-o", "link", "show").stdout
        left += [
            w for w in links.replace(":", " ").replace("@", " ").split() if w.endswith(self.suffix)
        ]
        return left
