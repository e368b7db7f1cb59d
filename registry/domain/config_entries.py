"""Config entries: Consul's `/v1/config` kinds, stored as validated canonical JSON.

Single-entry rules (field names, types, values) live in the pure
`meshproto.config_entries`; this module holds the rules that need the
database: CAS, cross-entry validation, the `service-intentions` view over
the Intention rows, auditing and the topics blocking reads wait on.
"""

from __future__ import annotations

from registry.models import ConfigEntry

HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc"})


def service_protocol(name: str) -> str:
    """The protocol `name` speaks: its service-defaults `Protocol`, else the
    proxy-defaults `Config.protocol`, else "tcp" (Consul's order)."""
    row = (
        ConfigEntry.objects.filter(kind="service-defaults", name=name)
        .values_list("data", flat=True)
        .first()
    )
    if row and row.get("Protocol"):
        return str(row["Protocol"]).lower()
    proxy = (
        ConfigEntry.objects.filter(kind="proxy-defaults", name="global")
        .values_list("data", flat=True)
        .first()
    )
    if proxy:
        proto = (proxy.get("Config") or {}).get("protocol")
        if isinstance(proto, str) and proto:
            return proto.lower()
    return "tcp"
