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


# --- round-trip estimate ---------------------------------------------------------------
#
# `/v1/catalog/datacenters` lists datacenters nearest first, as Consul sorts them by
# the median round trip from the agent's datacenter. Until network coordinates are
# measured, the distance is estimated from what the catalog knows of each datacenter
# (see docs/gateways.md, "Datacenter order"):
#
#   same datacenter                                  0 ms
#   same provider, same region                       2 ms
#   same provider, same geography, other region     30 ms
#   other provider, same geography                  40 ms
#   same provider, other geography                 120 ms
#   anything else (or a region unknown)            150 ms
#
# Geography is read from the region's leading word (`us-east-1`, `europe-west1`,
# `westeurope`, ...). Ties are broken by name.

_GEOGRAPHIES = {
    "na": ("us", "usgov", "ca", "northamerica", "eastus", "westus", "centralus", "canada"),
    "eu": ("eu", "europe", "westeurope", "northeurope", "uk", "france", "germany", "swiss"),
    "ap": ("ap", "asia", "australia", "japan", "korea", "india", "southeastasia", "eastasia"),
    "sa": ("sa", "southamerica", "brazil"),
    "me": ("me", "middleeast", "uae", "il"),
    "af": ("af", "africa", "southafrica"),
}
_WORD_GEO = {word: geo for geo, words in _GEOGRAPHIES.items() for word in words}


def geography(region: str) -> str:
    """The continent-level area a region is in ("" when it cannot be told)."""
    word = re.split(r"[-_\d\s]", (region or "").lower(), maxsplit=1)[0]
    if word in _WORD_GEO:
        return _WORD_GEO[word]
    for prefix, geo in sorted(_WORD_GEO.items(), key=lambda kv: -len(kv[0])):
        if len(prefix) > 3 and word.startswith(prefix):
            return geo
    return ""


def rtt_estimate_ms(a: Datacenter, b: Datacenter) -> float:
    """The estimated round trip between two datacenters, in milliseconds (table above)."""
    if a.name == b.name:
        return 0.0
    same_provider = a.provider == b.provider
    if same_provider and a.region and a.region == b.region:
        return 2.0
    geo_a, geo_b = geography(a.region), geography(b.region)
    same_geo = bool(geo_a) and geo_a == geo_b
    if same_geo:
        return 30.0 if same_provider else 40.0
    if same_provider and geo_a and geo_b:
        return 120.0
    return 150.0


def by_distance(origin: str) -> list[tuple[str, float]]:
    """Every datacenter's name and estimated round trip from `origin`, nearest first."""
    rows = list(Datacenter.objects.all())
    here = next((d for d in rows if d.name == origin), None) or Datacenter(name=origin)
    ranked = [(d.name, rtt_estimate_ms(here, d)) for d in rows]
    return sorted(ranked, key=lambda item: (item[1], item[0]))
