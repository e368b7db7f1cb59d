"""What a joined node may claim: the service scope of its join token.

Pure functions shared by the control plane (which enforces the scope on
every sync and leaf) and the agent (which refuses an out-of-scope local
registration up front instead of having its whole sync refused).

A scope is a list of patterns: a service name (`web`, which also allows its
sidecar `web-sidecar-proxy`), a prefix ending in `*` (`api-*`), or `*` (any).
An empty scope allows no service at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

SIDECAR_SUFFIX = "-sidecar-proxy"


def allows(patterns: Iterable[str] | None, service: str) -> bool:
    """Whether a scope allows the service name."""
    for p in patterns or ():
        if p.endswith("*"):
            if service.startswith(p[:-1]):
                return True
        elif service == p or service == p + SIDECAR_SUFFIX:
            return True
    return False


def claimed_names(spec: Mapping[str, Any]) -> list[str]:
    """The service names a service definition claims an identity for (and so leaves of):
    its name, a proxy's destination, an explicitly named sidecar."""
    names = [spec.get("Name") or ""]
    if spec.get("Kind") == "connect-proxy":
        names.append((spec.get("Proxy") or {}).get("DestinationServiceName") or "")
    sidecar = (spec.get("Connect") or {}).get("SidecarService")
    if isinstance(sidecar, Mapping) and sidecar.get("Name"):
        names.append(sidecar["Name"])
    return [n for n in names if isinstance(n, str) and n]


def refused(patterns: Iterable[str] | None, spec: Mapping[str, Any]) -> str | None:
    """The first name in `spec` the scope does not allow, or None."""
    return next((n for n in claimed_names(spec) if not allows(patterns, n)), None)


def describe(patterns: Iterable[str] | None) -> str:
    """The scope as error messages show it."""
    listed = list(patterns or ())
    return ", ".join(listed) if listed else "no services"
