"""Failovers that can never trigger, flagged where they are configured.

A `service-resolver`'s `Failover` that names a datacenter no node or gateway
can ever be in (no such datacenter), or a target that is the resolver's own
(its service, subset and namespace, with no other datacenter or peer), is
accepted as Consul accepts it, but would be silently inert: `warnings` says
so, and `PUT /v1/config`, `PUT /api/config-entries/...` and `mesh config
write`/`read` pass the warnings on (the `X-Mesh-Warning` header, the CLI's
stderr).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

WARNING_HEADER = "X-Mesh-Warning"


def warnings(entry: Mapping[str, Any]) -> list[str]:
    """Why parts of a decoded config entry can never take effect (empty: none)."""
    if entry.get("Kind") != "service-resolver":
        return []
    from registry.models import Datacenter

    known = set(Datacenter.objects.values_list("name", flat=True))
    return failover_warnings(entry, known)


def failover_warnings(entry: Mapping[str, Any], datacenters: Iterable[str]) -> list[str]:
    """The rule itself (pure): `datacenters` are the ones that exist."""
    known = set(datacenters)
    name = entry.get("Name", "")
    ns = entry.get("Namespace") or "default"
    out: list[str] = []
    for key, policy in sorted((entry.get("Failover") or {}).items()):
        where = f'Failover["{key}"]'
        own_subset = "" if key == "*" else key
        for dc in policy.get("Datacenters") or ():
            if dc not in known:
                out.append(
                    f'{where}.Datacenters names "{dc}", which is not a datacenter of this '
                    "mesh: that failover can never trigger"
                )
        for i, target in enumerate(policy.get("Targets") or ()):
            dc = target.get("Datacenter") or ""
            if dc and dc not in known:
                out.append(
                    f'{where}.Targets[{i}] names datacenter "{dc}", which is not a datacenter '
                    "of this mesh: that failover can never trigger"
                )
            elif not dc and not target.get("Peer") and _is_self(target, name, own_subset, ns):
                out.append(
                    f"{where}.Targets[{i}] is {name}'s own target: failing over to itself "
                    "can never help"
                )
        if (
            not policy.get("Datacenters")
            and not policy.get("Targets")
            and _is_self(policy, name, own_subset, ns)
        ):
            out.append(f"{where} fails over to {name}'s own target: it can never help")
    return out


def _is_self(target: Mapping[str, Any], name: str, subset: str, ns: str) -> bool:
    return (
        (target.get("Service") or name) == name
        and (target.get("ServiceSubset") or "") == subset
        and (target.get("Namespace") or ns) == ns
    )


def header(entry: Mapping[str, Any]) -> dict[str, str]:
    """The warnings as a response header (none: no header)."""
    found = warnings(entry)
    return {WARNING_HEADER: " | ".join(found)} if found else {}
