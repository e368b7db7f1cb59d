"""The mesh at a glance for the web UI's overview: what is unhealthy and where.

Plain reads restricted to what the caller's token may see, each answering
one question an operator asks first: which datacenters and services are
unhealthy, which checks fail and why, which certificates expire soon, which
agents went quiet, which sidecars refused the config they were sent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.utils import timezone

from registry.acl_rules import Authorizer
from registry.domain import connect_status, inventory
from registry.models import CARoot, Check, Datacenter, Node, ServiceInstance
from registry.models.agents import NodeEnrollment

ROOT_EXPIRY_WARNING = dt.timedelta(days=30)


@dataclass(frozen=True)
class DatacenterHealth:
    name: str
    provider: str
    region: str
    nodes: int
    health: dict[str, int]  # instances by health


def datacenters(authz: Authorizer) -> list[DatacenterHealth]:
    """Every datacenter with its (visible) node count and instances by health."""
    instances = inventory.visible_instances(authz, ServiceInstance.objects.all())
    counts = inventory.instance_status_counts(instances, "node__datacenter__name")
    nodes = inventory.visible_nodes(authz, Node.objects.all())
    per_dc: dict[str, int] = {}
    for name in nodes.values_list("datacenter__name", flat=True):
        per_dc[name] = per_dc.get(name, 0) + 1
    return [
        DatacenterHealth(
            dc.name,
            dc.provider,
            dc.region,
            per_dc.get(dc.name, 0),
            counts.get(dc.name, dict.fromkeys(inventory.HEALTH_STATES, 0)),
        )
        for dc in Datacenter.objects.order_by("name")
    ]


def services_by_health(authz: Authorizer) -> dict[str, list[str]]:
    """Service names (visible, sidecars left out) grouped by their worst instance health."""
    qs = inventory.visible_instances(authz, ServiceInstance.objects.exclude(kind="connect-proxy"))
    out: dict[str, list[str]] = {s: [] for s in inventory.HEALTH_STATES}
    for name, status in sorted(inventory.worst_status_by_name(qs).items()):
        out[status].append(name)
    return out


def failing_checks(authz: Authorizer, limit: int = 50) -> tuple[list[Check], int]:
    """Critical then warning checks (with their output), and how many there are."""
    qs = inventory.visible_checks(
        authz, Check.objects.exclude(status=Check.PASSING).select_related("node")
    )
    rows = sorted(qs, key=lambda c: (c.status != Check.CRITICAL, c.node.name, c.check_id))
    return rows[:limit], len(rows)


def expiring_roots(authz: Authorizer, now: dt.datetime | None = None) -> list[CARoot]:
    """CA roots still trusted that expire within `ROOT_EXPIRY_WARNING` (operator:read)."""
    if not authz.operator_read():
        return []
    now = now or timezone.now()
    return list(
        CARoot.objects.filter(not_after__lte=now + ROOT_EXPIRY_WARNING, rotated_out_at=None)
    )


@dataclass(frozen=True)
class QuietAgent:
    node: str
    last_seen_at: dt.datetime
    down: bool


def quiet_agents(authz: Authorizer, now: dt.datetime | None = None) -> list[QuietAgent]:
    """Joined agents not heard from within the liveness timeout, or marked down."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.MESH_NODE_LIVENESS_TIMEOUT)
    rows = NodeEnrollment.objects.filter(revoked_at=None).order_by("last_seen_at")
    return [
        QuietAgent(r.node, r.last_seen_at, r.down)
        for r in rows
        if (r.down or r.last_seen_at < cutoff) and authz.node_read(r.node)
    ]


def refused_configs(
    authz: Authorizer, streams: Mapping[tuple[str, str], Any], connected: Collection[str]
) -> list[dict[str, Any]]:
    """Sidecars whose last pushed config their agent refused (nacked), with the error.

    The streams' memory says which proxies refused something; only their
    services' status is read (the whole mesh's would cost a snapshot per sidecar).
    """
    refused = {key for key, s in streams.items() if getattr(s, "nacked_version", 0) or s.last_error}
    if not refused:
        return []
    services = set(
        ServiceInstance.objects.filter(
            kind="connect-proxy",
            node__name__in={node for node, _ in refused},
            service_id__in={pid for _, pid in refused},
        ).values_list("destination_name", flat=True)
    )
    out = []
    for service in sorted(services):
        status = connect_status.connect_status(authz, streams, connected, service=service)
        for svc in status["services"]:
            for proxy in svc["proxies"]:
                config = proxy.get("config") or {}
                if config.get("nacked_version") or config.get("error"):
                    out.append({"service": svc["service"], **proxy})
    return out


@dataclass(frozen=True)
class RotationProgress:
    """How far the mesh has moved to the active root: the services and agents
    holding an unexpired leaf, and how many of them have one from the active root."""

    holders: int
    on_active: int

    @property
    def done(self) -> bool:
        return self.on_active >= self.holders


def rotation_progress(now: dt.datetime | None = None) -> RotationProgress:
    from registry.models import IssuedCert

    now = now or timezone.now()
    live = IssuedCert.objects.filter(not_after__gt=now)
    holders = set(live.values_list("kind", "name").distinct())
    active = set(live.filter(root__active=True).values_list("kind", "name").distinct())
    return RotationProgress(len(holders), len(active & holders))
