"""Hosts as Linux network namespaces, joined by a bridge in the root namespace.

    root namespace:  bridge mwbr-<r>  10.201.<n>.1/24   (the control plane binds here)
    host A:          mwA-<r>, veth    10.201.<n>.2/24   (lo up)
    host B:          mwB-<r>, veth    10.201.<n>.3/24   (lo up)

A and B reach each other over the bridge (layer 2, no routing or forwarding
needed) and the root namespace at the bridge's address. Every name carries a
random suffix and the third octet is one no route on this machine uses, so
two runs side by side do not meet. `close()` kills whatever still runs in the
namespaces (only our processes can be there), then deletes the namespaces
(which deletes their veth ends, and so the pairs) and the bridge; it is safe
to call twice and after a half-made `create()`.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field


class NetnsUnavailable(RuntimeError):
    """This machine cannot make namespaces here (not root, no `ip netns`)."""


def unavailable_reason() -> str:
    """Why namespaces cannot be used, or "" when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and a bridge)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    try:
        probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns list` failed: {exc}"
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def _free_subnet() -> int:
    """A third octet n for 10.201.n.0/24 that no route here covers."""
    for _ in range(50):
        n = random.randint(1, 254)
        routes = _ip("route", "show", "to", "match", f"10.201.{n}.1").stdout.splitlines()
        if not any(r.startswith("10.201.") for r in routes):  # the default route may match
            return n
    raise RuntimeError("no free 10.201.x.0/24 subnet")


@dataclass
class Host:
    """One namespace: its name and its address on the bridge."""

    name: str  # the namespace
    address: str

    def argv(self, *argv: str) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(*argv), capture_output=True, text=True, timeout=timeout, **kw
        )

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in out.stdout.split() if p.isdigit()]


@dataclass
class Namespaces:
    """What every namespace layout shares: its random suffix, its hosts, the
    bridges, namespaces and veths it made (deleted by `close()` in reverse),
    and the check that none is left behind."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, Host] = field(default_factory=dict)
    _made: list[tuple[str, str]] = field(default_factory=list)  # ("netns"|"link", name)

    def _bridge(self, bridge: str, address: str) -> None:
        """A bridge in the root namespace holding `address`/24."""
        _ip("link", "add", bridge, "type", "bridge")
        self._made.append(("link", bridge))
        _ip("addr", "add", f"{address}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")

    def _host(self, label: str, bridge: str, address: str) -> Host:
        """Namespace mw<label>-<suffix>, its veth's outer end on `bridge`, `address`/24 inside."""
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
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.hosts[label] = Host(ns, address)
        return self.hosts[label]

    def close(self) -> None:
        """Kill what runs in the namespaces, delete them, their veths and the bridges."""
        for host in self.hosts.values():
            _kill_all(host)
        for kind, name in reversed(self._made):
            if kind == "netns":
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)
        self._made.clear()

    def leftovers(self) -> list[str]:
        """Namespaces and links of this layout that still exist (for the test of close)."""
        left = [n for n in _ip("netns", "list").stdout.split() if n.endswith(self.suffix)]
        links = _ip("-o", "link", "show").stdout
        left += [
            w for w in links.replace(":", " ").replace("@", " ").split() if w.endswith(self.suffix)
        ]
        return left


@dataclass
class Topology(Namespaces):
    """A bridge in the root namespace and hosts A and B on it."""

    subnet: int = 0
    bridge: str = ""

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (where the control plane listens)."""
        return f"10.201.{self.subnet}.1"

    def create(self, names: tuple[str, ...] = ("A", "B")) -> Topology:
        try:
            self.subnet = _free_subnet()
            self.bridge = f"mwbr-{self.suffix}"
            self._bridge(self.bridge, self.gateway)
            for i, label in enumerate(names):
                self._host(label, self.bridge, f"10.201.{self.subnet}.{i + 2}")
        except Exception:
            self.close()
            raise
        return self


def _kill_all(host: Host) -> None:
    pids = host.pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
