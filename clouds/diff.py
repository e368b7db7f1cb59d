"""The cloud-sync diff: what to create, update and remove, on plain data.

Pure functions (no database, no cloud): the engine gathers both sides into
these shapes, and applies what comes out. Nothing here ever plans "remove
all, register all": an unchanged item appears in no list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from clouds.providers.base import (
    ExportedInstance,
    ExportPlan,
    FirewallPlan,
    ImportedInstance,
    IngressRule,
)


@dataclass(frozen=True)
class StoredInstance:
    """An imported instance as the catalog holds it now."""

    service_id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: dict[str, str]
    health: str | None  # its check's status (None: the check is missing)
    health_output: str


@dataclass(frozen=True)
class ImportPlan:
    create: tuple[ImportedInstance, ...] = ()
    update: tuple[ImportedInstance, ...] = ()
    remove: tuple[str, ...] = ()  # service IDs

    @property
    def empty(self) -> bool:
        return not (self.create or self.update or self.remove)


def import_plan(
    wanted: Iterable[ImportedInstance],
    stored: Mapping[str, StoredInstance],
    keep: Iterable[str] = (),
) -> ImportPlan:
    """Bring `stored` to `wanted`. Stored instances named in `keep` (items the cloud
    listed but that could not be read this time) are left as they are."""
    create, update = [], []
    seen = set(keep)
    for w in wanted:
        seen.add(w.service_id)
        s = stored.get(w.service_id)
        if s is None:
            create.append(w)
        elif (s.name, s.address, s.port, tuple(s.tags), s.meta, s.health, s.health_output) != (
            w.name,
            w.address,
            w.port,
            tuple(w.tags),
            w.meta,
            w.health,
            w.health_output,
        ):
            update.append(w)
    remove = sorted(sid for sid in stored if sid not in seen)
    return ImportPlan(tuple(create), tuple(update), tuple(remove))


def export_plan(
    wanted: Iterable[ExportedInstance], current: Mapping[str, ExportedInstance]
) -> ExportPlan:
    """Bring the account's exported instances (`current`, by `service/instance_id`) to `wanted`.

    Changed attributes are a new registration (the cloud replaces the instance);
    a health change alone is a health update.
    """
    register, health = [], []
    seen: set[str] = set()
    for w in wanted:
        key = f"{w.service}/{w.instance_id}"
        seen.add(key)
        c = current.get(key)
        if c is None or c.attributes != w.attributes:
            register.append(w)
        elif c.health != w.health:
            health.append(w)
    gone = [current[k] for k in sorted(current) if k not in seen]
    return ExportPlan(tuple(register), tuple(health), tuple(gone))


# Rules meshweb manages carry descriptions starting with this; others are never touched.
RULE_PREFIX = "meshweb gateway"


def firewall_plan(
    group: str, wanted: Iterable[IngressRule], current: Iterable[IngressRule]
) -> FirewallPlan:
    """Add the wanted rules that are missing; remove the rules meshweb added earlier
    that are no longer wanted (a rule someone else made stays)."""
    wanted_set = set(wanted)
    current_list = list(current)
    current_set = set(current_list)
    add = tuple(sorted(r for r in wanted_set if r not in current_set))
    remove = tuple(
        sorted(
            {
                r
                for r in current_list
                if r not in wanted_set and r.description.startswith(RULE_PREFIX)
            }
        )
    )
    return FirewallPlan(group, add, remove)
