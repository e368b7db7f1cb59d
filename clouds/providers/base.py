"""The cloud provider interface: what the sync engine asks of a cloud.

A provider talks to one cloud account with plain data in and out (no Django,
no database): the engine gathers the catalog's side, hands both sides to the
pure diff (`clouds.diff`) and gives the provider the plan to apply. A new
cloud (GCP, Azure) is one more module implementing `Provider`, named in
`clouds.providers.PROVIDERS`; the engine does not change.

Every method that calls the cloud raises `ProviderError` for a failure of the
whole call (bad credentials, an unknown region, throttling that outlasted the
retries); problems with single items are returned as `ItemError`s.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

# The check status an imported instance's health maps to.
PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
# Exported instances' health as Cloud Map (and most clouds) say it.
HEALTHY, UNHEALTHY = "HEALTHY", "UNHEALTHY"


class ProviderError(Exception):
    """A cloud call failed as a whole; the message says which call and why (never a secret)."""


@dataclass(frozen=True)
class AccountSpec:
    """What a provider needs to know about an account (decrypted credentials included:
    never log or show this object)."""

    name: str
    regions: tuple[str, ...]
    endpoint_url: str = ""
    credentials: dict[str, str] | None = None  # None: the environment / instance role
    import_config: dict[str, Any] = field(default_factory=dict)
    export_config: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # never print the credentials by accident
        return f"AccountSpec(name={self.name!r}, regions={self.regions!r})"


@dataclass(frozen=True)
class ItemError:
    """One cloud item that could not be imported or exported (the rest go ahead)."""

    ref: str  # what it is: "cloudmap:us-east-1/ns/svc/i-3", "ec2:us-east-1/i-0abc"
    message: str
    service_id: str = ""  # the catalog ID it has or would have (kept as it was)


@dataclass(frozen=True)
class ImportedInstance:
    """One cloud endpoint as a catalog service instance of the account's node."""

    service_id: str  # unique within the account, stable across syncs
    name: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: dict[str, str]
    health: str  # PASSING | WARNING | CRITICAL
    health_output: str


@dataclass(frozen=True)
class Inventory:
    """Everything the account's cloud has to import, and what could not be read."""

    instances: tuple[ImportedInstance, ...]
    errors: tuple[ItemError, ...] = ()


@dataclass(frozen=True)
class ExportedInstance:
    """One mesh service instance as registered in the cloud's registry."""

    service: str
    instance_id: str
    attributes: dict[str, str]
    health: str  # HEALTHY | UNHEALTHY


@dataclass(frozen=True)
class MeshInstance:
    """A mesh service instance chosen for export."""

    service: str
    node: str
    service_id: str
    address: str
    port: int
    healthy: bool


@dataclass(frozen=True)
class ExportPlan:
    """What to register, update (attributes and/or health) and deregister."""

    register: tuple[ExportedInstance, ...] = ()
    update_health: tuple[ExportedInstance, ...] = ()
    deregister: tuple[ExportedInstance, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.register or self.update_health or self.deregister)


@dataclass(frozen=True, order=True)
class IngressRule:
    """One firewall ingress rule: TCP `port` from `cidr`."""

    protocol: str
    port: int
    cidr: str
    description: str = field(default="", compare=False)


@dataclass(frozen=True)
class FirewallPlan:
    group: str
    add: tuple[IngressRule, ...] = ()
    remove: tuple[IngressRule, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove)


@dataclass
class ApiStats:
    """API calls made (each operation once, whatever its retries) and retries taken."""

    calls: int = 0
    retries: int = 0
    notes: list[str] = field(default_factory=list)


class Provider(abc.ABC):
    """One cloud account's registry and firewall, seen through its API.

    Implementations keep `stats` current for every call they make and bound
    every call's retries; none of them writes anything in `inventory` or the
    `*_state` reads.
    """

    name: str = ""

    def __init__(self, account: AccountSpec) -> None:
        self.account = account
        self.stats = ApiStats()

    @classmethod
    @abc.abstractmethod
    def validate(cls, regions: list[str], credentials: dict[str, str] | None) -> None:
        """Refuse (ValueError with a message) regions or credentials this cloud cannot take."""

    @abc.abstractmethod
    def inventory(self) -> Inventory:
        """Everything to import per `account.import_config`, read whole (all pages).

        Instances this meshweb exported are left out (never imported back).
        """

    @abc.abstractmethod
    def export_item(self, mesh: MeshInstance) -> ExportedInstance:
        """How a mesh instance looks registered in this cloud (pure: no call)."""

    @abc.abstractmethod
    def export_state(self, services: list[str]) -> dict[str, ExportedInstance]:
        """The instances this account exported earlier (by `<service>/<instance_id>`),
        creating the target namespace and services first when the config asks for it."""

    @abc.abstractmethod
    def apply_export(self, plan: ExportPlan) -> list[ItemError]:
        """Register, update and deregister as planned; each item's failure is returned."""

    @abc.abstractmethod
    def firewall_state(self, group: str) -> list[IngressRule]:
        """The ingress rules of `group` (a security group) as they are now."""

    @abc.abstractmethod
    def apply_firewall(self, plan: FirewallPlan) -> None:
        """Add and remove ingress rules; adding a rule that exists is not an error."""
