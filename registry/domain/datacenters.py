"""Datacenters: the network regions (cloud regions, on-prem sites) nodes live in.

Nodes create their datacenter by name when they register (`catalog.ensure_datacenter`);
these functions let an operator create one ahead of time and say which cloud
provider and region it is.
"""

from __future__ import annotations

import re

from registry import topics as topic
from registry.errors import BadRequest, Conflict, NotFound
from registry.models import Datacenter
from registry.txn import Change

# Consul's datacenter names: letters, digits, '-' and '_' (they appear in DNS names).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def get_datacenter(name: str) -> Datacenter:
    dc = Datacenter.objects.filter(name=name).first()
    if dc is None:
        raise NotFound(f'Datacenter "{name}" not found')
    return dc


def require_datacenter(name: str) -> Datacenter:
    """A datacenter named in a request body must exist: 400 (not 404) otherwise."""
    dc = Datacenter.objects.filter(name=name).first()
    if dc is None:
        raise BadRequest(f'Unknown datacenter "{name}"')
    return dc


def _validate(provider: str | None, region: str | None) -> None:
    if provider is not None and provider not in Datacenter.PROVIDERS:
        raise BadRequest(
            f"Invalid provider {provider!r} (use one of {', '.join(Datacenter.PROVIDERS)})"
        )
    if region is not None and len(region) > 128:
        raise BadRequest("Invalid region: at most 128 characters")


def create_datacenter(name: str, *, provider: str = "onprem", region: str = "") -> Datacenter:
    """Create a datacenter; 409 if the name is taken."""
    if not _NAME.match(name or ""):
        raise BadRequest(
            f"Invalid datacenter name {name!r}: use letters, digits, '-' and '_' (at most 128)"
        )
    _validate(provider, region)
    with Change() as change:
        if Datacenter.objects.filter(name=name).exists():
            raise Conflict(f'Datacenter "{name}" already exists')
        dc = Datacenter.objects.create(
            name=name,
            provider=provider,
            region=region,
            create_index=change.index,
            modify_index=change.index,
        )
        change.touch(topic.DATACENTERS, topic.datacenter(name))
    return dc


def update_datacenter(
    name: str, *, provider: str | None = None, region: str | None = None
) -> Datacenter:
    """Set a datacenter's provider and/or region (None leaves a field as it is)."""
    _validate(provider, region)
    with Change() as change:
        dc = Datacenter.objects.select_for_update().filter(name=name).first()
        if dc is None:
            raise NotFound(f'Datacenter "{name}" not found')
        if provider is not None:
            dc.provider = provider
        if region is not None:
            dc.region = region
        dc.modify_index = change.index
        dc.save()
        change.touch(topic.DATACENTERS, topic.datacenter(name))
    return dc
