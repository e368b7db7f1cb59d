"""The agent's local state: the services and checks of this host.

This is the source of truth for the node (anti-entropy makes the catalog
equal to it). Services come from two places: the config dir (replaced whole
on every reload) and the local HTTP API (kept in `<data-dir>/local.json`, so
a restart keeps them). Sidecars are expanded here by the control plane's own
rules (`meshproto.registration.rules`: `<id>-sidecar-proxy`, a port from
21000-21255 that stays the same across reloads and restarts,
LocalServicePort = the service's port), so the control plane receives
plain, fully specified registrations.

Pure bookkeeping: no sockets, no tasks. The agent calls it from its event
loop only (one thread), so no locks.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshproto.durations import parse_duration
from meshproto.probes import CRITICAL
from meshproto.registration import rules
from meshproto.registration.rules import RuleError


class StateError(ValueError):
    """A registration the local state refuses (Consul's 400s)."""


class UnknownError(LookupError):
    """A service or check ID this agent does not have (Consul's 404s)."""


@dataclass
class CheckState:
    """One check on this host: its definition and its latest result."""

    check_id: str
    name: str
    definition: dict[str, Any]  # canonical Consul fields (HTTP, Interval, TTL, ...)
    service_id: str = ""
    service_name: str = ""
    service_tags: list[str] = field(default_factory=list)
    notes: str = ""
    status: str = CRITICAL
    output: str = ""
    source: str = "config"  # config | api | maintenance
    inline: bool = False  # declared inside its service's definition (Check/Checks)
    modify_index: int = 0

    @property
    def kind(self) -> str:
        return rules.check_kind(self.definition) if self.source != "maintenance" else "maintenance"

    @property
    def interval(self) -> float:
        return parse_duration(self.definition.get("Interval"))

    @property
    def timeout(self) -> float:
        return parse_duration(self.definition.get("Timeout"))

    @property
    def ttl(self) -> float:
        return parse_duration(self.definition.get("TTL"))

    def inline_definition(self) -> dict[str, Any]:
        """The check inside its service's `Checks` (definition only; status reported apart)."""
        out = {k: v for k, v in self.definition.items() if k not in ("CheckID", "ServiceID")}
        out.update({"CheckID": self.check_id, "Name": self.name})
        if self.notes:
            out["Notes"] = self.notes
        return out

    def wire(self) -> dict[str, Any]:
        """The check in SyncNode's `checks_json`: a status report for an inline check,
        else its whole definition with its status (Consul's field names)."""
        if self.inline:
            return {"CheckID": self.check_id, "Status": self.status, "Output": self.output}
        out = {k: v for k, v in self.definition.items() if k not in ("CheckID", "ServiceID")}
        out.update(
            {
                "CheckID": self.check_id,
                "Name": self.name,
                "Notes": self.notes,
                "ServiceID": self.service_id,
                "Status": self.status,
                "Output": self.output,
            }
        )
        return out


@dataclass
class ServiceState:
    """One service on this host (a sidecar proxy is one too)."""

    definition: dict[str, Any]  # canonical, with ID set and no inline checks or SidecarService
    source: str = "config"  # config | api
    parent_id: str = ""  # the service a sidecar was declared in
    modify_index: int = 0

    @property
    def id(self) -> str:
        return self.definition["ID"]

    @property
    def name(self) -> str:
        return self.definition["Name"]

    @property
    def kind(self) -> str:
        return self.definition.get("Kind") or ""

    @property
    def port(self) -> int:
        return int(self.definition.get("Port") or 0)

    def wire(self) -> dict[str, Any]:
        return copy.deepcopy(self.definition)


@dataclass
class Registration:
    """What one declared service expands to: itself, its sidecar, and their checks."""

    services: list[ServiceState]
    checks: list[CheckState]


class LocalState:
    """Services and checks of this node, with Consul's agent-side rules.

    `version` increases on every change that the control plane must see
    (the agent syncs when it moves); `check_version` on every check result.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "local.json"
        self.services: dict[str, ServiceState] = {}
        self.checks: dict[str, CheckState] = {}
        self.sidecar_ports: dict[str, int] = {}
        self.api_definitions: dict[str, dict] = {}  # service ID -> declared definition
        self.api_checks: dict[str, dict] = {}  # check ID -> declared definition
        self.config_definitions: list[dict] = []
        self.config_checks: list[dict] = []
        self.maintenance: dict[str, str] = {}  # service ID (or "" for the node) -> reason
        self.version = 0
        self._load()

    # --- persistence -------------------------------------------------------------

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            # A torn or hand-edited file must not stop the agent: start clean, say so.
            import logging

            logging.getLogger(__name__).error("ignoring unreadable %s", self.path)
            return
        self.sidecar_ports = {str(k): int(v) for k, v in (data.get("sidecar_ports") or {}).items()}
        self.api_definitions = dict(data.get("services") or {})
        self.api_checks = dict(data.get("checks") or {})
        self.maintenance = dict(data.get("maintenance") or {})
        # Last results, so a restart does not flap passing checks to critical.
        self._saved_results = dict(data.get("results") or {})

    def save(self) -> None:
        """Write what the local API registered (0600, atomically)."""
        data = {
            "services": self.api_definitions,
            "checks": self.api_checks,
            "sidecar_ports": self.sidecar_ports,
            "maintenance": self.maintenance,
            "results": {c.check_id: [c.status, c.output] for c in self.checks.values()},
        }
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    # --- building --------------------------------------------------------------

    def _sidecar_port(self, sidecar_id: str, reserved: dict[str, int], used: set[int]) -> int:
        """The sidecar's remembered port, else the first free one in 21000-21255."""
        port = reserved.get(sidecar_id)
        if port and port not in used:
            return port
        with _refusals():
            return rules.free_sidecar_port(set(reserved.values()) | used)

    def expand(
        self, spec: dict, source: str, reserved: dict[str, int], used: set[int]
    ) -> Registration:
        """A declared definition as Consul's agent registers it (checks and sidecar)."""
        with _refusals():
            rules.validate_service(spec)
            spec = dict(copy.deepcopy(spec), ID=rules.service_id(spec))
            sidecar = None
            sidecar_id = rules.sidecar_id(spec)
            if sidecar_id is not None:
                port = spec["Connect"]["SidecarService"].get("Port") or self._sidecar_port(
                    sidecar_id, reserved, used
                )
                sidecar = rules.expand_sidecar(spec, port)
                used.add(sidecar["Port"])
            svc = ServiceState(_declared(spec), source=source)
            out = Registration([svc], self._service_checks(svc, spec, source))
            if sidecar is not None:
                sc = ServiceState(_declared(sidecar), source=source, parent_id=spec["ID"])
                out.services.append(sc)
                out.checks += self._service_checks(sc, sidecar, source)
        return out

    def _service_checks(self, svc: ServiceState, spec: dict, source: str) -> list[CheckState]:
        return [
            CheckState(
                check_id=c.check_id,
                name=c.name,
                definition={
                    k: v for k, v in c.spec.items() if k not in ("Status", "Name", "Notes")
                },
                service_id=svc.id,
                service_name=svc.name,
                service_tags=list(svc.definition.get("Tags") or []),
                notes=c.spec.get("Notes", ""),
                status=rules.check_status(c.spec.get("Status")),
                source=source,
                inline=True,
            )
            for c in rules.service_checks(svc.id, svc.name, spec)
        ]

    def _node_check(self, c: dict, source: str) -> CheckState:
        check_id = c.get("CheckID") or c.get("Name") or ""
        if not check_id:
            raise StateError("Missing check name")
        sid = c.get("ServiceID") or ""
        svc = self.services.get(sid) if sid else None
        if sid and svc is None:
            raise UnknownError(f'ServiceID "{sid}" does not exist')
        with _refusals():
            status = rules.check_status(c.get("Status"))
        return CheckState(
            check_id=check_id,
            name=c.get("Name") or check_id,
            definition={k: v for k, v in c.items() if k not in ("Status", "Name", "Notes")},
            service_id=sid,
            service_name=svc.name if svc else "",
            service_tags=list(svc.definition.get("Tags") or []) if svc else [],
            notes=c.get("Notes", ""),
            status=status,
            source=source,
        )

    def rebuild(self, config_services: list[dict], config_checks: list[dict]) -> None:
        """Recompute services and checks from the config dir plus the API registrations.

        Raises StateError (nothing changed) when the declarations conflict.
        Results of checks whose definition is unchanged are kept.
        """
        services: dict[str, ServiceState] = {}
        checks: dict[str, CheckState] = {}
        declared = [(d, "config") for d in config_services] + [
            (d, "api") for d in self.api_definitions.values()
        ]
        # Remembered ports stay with their sidecars; a new sidecar never takes one.
        sidecar_ids = {rules.sidecar_id(d) for d, _ in declared} - {None}
        reserved = {sid: p for sid, p in self.sidecar_ports.items() if sid in sidecar_ids}
        used: set[int] = set()
        for spec, source in declared:
            reg = self.expand(spec, source, reserved, used)
            for s in reg.services:
                if s.id in services:
                    raise StateError(f"service ID {s.id!r} is defined twice")
                services[s.id] = s
            for c in reg.checks:
                if c.check_id in checks:
                    raise StateError(f"check ID {c.check_id!r} is defined twice")
                checks[c.check_id] = c
        old_services, self.services = self.services, services
        try:
            for c in config_checks:
                nc = self._node_check(c, "config")
                if nc.check_id in checks:
                    raise StateError(f"check ID {nc.check_id!r} is defined twice")
                checks[nc.check_id] = nc
            for c in self.api_checks.values():
                try:
                    nc = self._node_check(c, "api")
                except UnknownError:
                    continue  # its service is gone; the check went with it
                if nc.check_id in checks:
                    raise StateError(f"check ID {nc.check_id!r} is defined twice")
                checks[nc.check_id] = nc
        except (StateError, UnknownError):
            self.services = old_services
            raise
        for sid, reason in self.maintenance.items():
            if sid and sid not in services:
                continue
            mc = self._maintenance_check(sid, reason)
            checks[mc.check_id] = mc
        # Keep what is known about checks whose definition did not change.
        saved = getattr(self, "_saved_results", {})
        for cid, c in checks.items():
            old = self.checks.get(cid)
            if old is not None and old.definition == c.definition and c.source != "maintenance":
                c.status, c.output = old.status, old.output
            elif cid in saved and c.source != "maintenance":
                c.status, c.output = saved[cid]
        self._saved_results = {}
        self.config_definitions, self.config_checks = list(config_services), list(config_checks)
        self.checks = checks
        # Forget the ports of sidecars that are gone (a later one may take them).
        self.sidecar_ports = {s.id: s.port for s in services.values() if s.kind == "connect-proxy"}
        self.version += 1

    def _maintenance_check(self, service_id: str, reason: str) -> CheckState:
        spec = rules.maintenance_check(service_id, reason)
        svc = self.services[service_id] if service_id else None
        return CheckState(
            check_id=spec["CheckID"],
            name=spec["Name"],
            definition={},
            service_id=service_id,
            service_name=svc.name if svc else "",
            service_tags=list(svc.definition.get("Tags") or []) if svc else [],
            notes=spec["Notes"],
            status=spec["Status"],
            source="maintenance",
        )

    # --- the local API's writes ---------------------------------------------------

    def register_service(self, spec: dict, *, replace_existing_checks: bool = False) -> None:
        """`PUT /v1/agent/service/register` (validated by the caller into canonical form).

        The definition's inline checks replace the ones it had before; checks
        registered apart (`check/register` with its ServiceID) stay unless
        `replace_existing_checks`."""
        sid = spec.get("ID") or spec.get("Name")
        existing = self.services.get(sid or "")
        if existing is not None and existing.source == "config":
            raise StateError(f"service {sid!r} is defined in the config dir; edit the file instead")
        previous = self.api_definitions.get(sid)
        self.api_definitions[sid] = spec
        try:
            self.rebuild(self.config_definitions, self.config_checks)
        except (StateError, UnknownError):
            if previous is None:
                self.api_definitions.pop(sid, None)
            else:
                self.api_definitions[sid] = previous
            raise
        if replace_existing_checks:
            # Consul: checks of this service that the new definition does not declare go.
            self.api_checks = {
                k: v for k, v in self.api_checks.items() if v.get("ServiceID") != sid
            }
            self.rebuild(self.config_definitions, self.config_checks)
        self.save()

    def deregister_service(self, service_id: str) -> None:
        svc = self.services.get(service_id)
        if svc is None:
            raise UnknownError(
                f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.'
            )
        if svc.source == "config" or (
            svc.parent_id and self.services[svc.parent_id].source == "config"
        ):
            raise StateError(
                f"service {service_id!r} is defined in the config dir; remove the file instead"
            )
        if svc.parent_id:
            raise StateError(f"service {service_id!r} is a sidecar; deregister {svc.parent_id!r}")
        self.api_definitions.pop(service_id, None)
        self.maintenance.pop(service_id, None)
        self.api_checks = {
            k: v for k, v in self.api_checks.items() if v.get("ServiceID") != service_id
        }
        self.rebuild(self.config_definitions, self.config_checks)
        self.save()

    def set_maintenance(self, service_id: str, enable: bool, reason: str) -> None:
        if service_id and service_id not in self.services:
            raise UnknownError(
                f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.'
            )
        if enable:
            self.maintenance[service_id] = reason
        else:
            self.maintenance.pop(service_id, None)
        self.rebuild(self.config_definitions, self.config_checks)
        self.save()

    def register_check(self, spec: dict) -> None:
        cid = spec.get("CheckID") or spec.get("Name") or ""
        existing = self.checks.get(cid)
        if existing is not None and existing.source == "config":
            raise StateError(f"check {cid!r} is defined in the config dir; edit the file instead")
        self._node_check(spec, "api")  # validates ServiceID
        spec = dict(spec, CheckID=cid)
        previous = self.api_checks.get(cid)
        self.api_checks[cid] = spec
        try:
            self.rebuild(self.config_definitions, self.config_checks)
        except (StateError, UnknownError):
            if previous is None:
                del self.api_checks[cid]
            else:
                self.api_checks[cid] = previous
            raise
        if spec.get("Status"):
            self.checks[cid].status = spec["Status"]
        self.save()

    def deregister_check(self, check_id: str) -> None:
        check = self.checks.get(check_id)
        if check is None:
            raise UnknownError(
                f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        if check_id not in self.api_checks:
            raise StateError(f"check {check_id!r} belongs to a definition; change that instead")
        del self.api_checks[check_id]
        self.rebuild(self.config_definitions, self.config_checks)
        self.save()

    def set_result(self, check_id: str, status: str, output: str) -> bool:
        """Record a check result; True when status or output changed."""
        check = self.checks.get(check_id)
        if check is None:
            return False
        if (check.status, check.output) == (status, output):
            return False
        check.status, check.output = status, output
        check.modify_index = int(time.time() * 1000)
        return True

    def wire_services(self) -> list[dict[str, Any]]:
        """SyncNode's `services_json`: each declared service with its inline checks and
        its sidecar (fully expanded: ID, port, proxy, checks) as `Connect.SidecarService`."""
        out = []
        for svc in sorted(self.services.values(), key=lambda s: s.id):
            if svc.parent_id:
                continue
            d = self._with_checks(svc)
            for sc in self.services.values():
                if sc.parent_id == svc.id:
                    d["Connect"] = {
                        **(d.get("Connect") or {}),
                        "SidecarService": self._with_checks(sc),
                    }
            out.append(d)
        return out

    def _with_checks(self, svc: ServiceState) -> dict[str, Any]:
        d = svc.wire()
        inline = sorted(
            (c for c in self.checks.values() if c.service_id == svc.id and c.inline),
            key=lambda c: c.check_id,
        )
        if inline:
            d["Checks"] = [c.inline_definition() for c in inline]
        return d

    # --- reads --------------------------------------------------------------------

    def proxies(self) -> list[ServiceState]:
        return [s for s in self.services.values() if s.kind == "connect-proxy"]

    def gateways(self) -> list[ServiceState]:
        """The mesh gateways defined here (the agent runs one process each)."""
        return [s for s in self.services.values() if s.kind == "mesh-gateway"]

    def service_checks(self, service_id: str) -> Iterable[CheckState]:
        return (c for c in self.checks.values() if c.service_id == service_id)

    def node_checks(self) -> Iterable[CheckState]:
        return (c for c in self.checks.values() if not c.service_id)


def _declared(spec: dict) -> dict:
    """A service's own definition: its inline checks and sidecar are registered apart."""
    out = {k: v for k, v in spec.items() if k not in ("Check", "Checks")}
    connect = {k: v for k, v in (spec.get("Connect") or {}).items() if k != "SidecarService"}
    if connect:
        out["Connect"] = connect
    else:
        out.pop("Connect", None)
    return out


class _refusals:
    """The registration rules' refusals, as the state's own (the local API maps them)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, RuleError):
            raise StateError(str(exc)) from None
        return False
