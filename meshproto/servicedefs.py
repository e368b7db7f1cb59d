"""Service and check definition files (JSON, YAML, HCL) with Consul's field names.

One loader for everyone who reads them: `mesh services register FILE` and the
per-host agent's config dir (`mesh agent -config-dir`). Django-free.

A file holds `{"service": {...}}`, `{"services": [...]}`, `{"check": {...}}`,
`{"checks": [...]}` (any mix) or one bare service definition. Field names may
be Consul's API spelling (`Name`, `LocalBindPort`) or the config files' snake
case (`local_bind_port`): both are matched with case and `_` ignored, as the
server decodes them. `canonical_service` / `canonical_check` rewrite a
definition into Consul's API spelling, with durations as Go strings ("10s"),
keeping the keys of user maps (`Meta`, `Header`, `Config`) exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshproto.durations import format_duration, parse_duration

# Bookkeeping keys python-hcl2 adds to what it parses; never service content.
_HCL_META_KEYS = frozenset(
    {"__is_block__", "__comments__", "__inline_comments__", "__start_line__", "__end_line__"}
)
# Service-definition fields that are lists of blocks (everything else is one block).
_HCL_LIST_FIELDS = frozenset({"services", "checks", "upstreams", "paths"})
# File names the config-dir loader reads; others (editor backups, READMEs) are skipped.
CONFIG_SUFFIXES = (".json", ".yaml", ".yml", ".hcl")


class DefinitionError(ValueError):
    """A definition file that cannot be read or does not hold valid definitions.

    The message names the file (and the field, where one is at fault).
    """


def field(definition: dict, name: str) -> Any:
    """A definition's field, matched as the server matches it (case and `_` ignored)."""
    want = _fold(name)
    for key, value in definition.items():
        if _fold(str(key)) == want:
            return value
    return None


def _fold(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


# --- files --------------------------------------------------------------------------


def _load_hcl(text: str) -> Any:
    import hcl2

    kwargs: dict[str, Any] = {}
    options_cls = getattr(hcl2, "SerializationOptions", None)
    if options_cls is not None:
        # python-hcl2 8.x keeps string quotes and comments unless told otherwise.
        known = {f.name for f in dataclasses.fields(options_cls)}
        wanted = {"strip_string_quotes": True, "with_comments": False, "preserve_heredocs": False}
        kwargs["serialization_options"] = options_cls(
            **{k: v for k, v in wanted.items() if k in known}
        )
    return _hcl_blocks(hcl2.loads(text, **kwargs))


def _hcl_blocks(value: Any, key: str = "") -> Any:
    """HCL's `check { ... }` parses as a one-element list of blocks: make it the block."""
    if isinstance(value, dict):
        return {k: _hcl_blocks(v, k) for k, v in value.items() if k not in _HCL_META_KEYS}
    if isinstance(value, list):
        items = [_hcl_blocks(v) for v in value]
        is_blocks = value and all(isinstance(v, dict) and v.get("__is_block__") for v in value)
        if is_blocks and len(items) == 1 and key.lower() not in _HCL_LIST_FIELDS:
            return items[0]
        return items
    return value


def load_file(path: str | Path) -> Any:
    """Parse one file by its suffix: .json, .yaml/.yml, .hcl (others: JSON, then HCL)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise DefinitionError(f"Failed to read file {path}: {reason}") from None
    suffix = Path(path).suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".hcl":
            return _load_hcl(text)
        try:
            return json.loads(text)
        except ValueError:
            return _load_hcl(text)
    except Exception as exc:  # json, yaml and lark raise many types; all mean "bad file"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DefinitionError(f"Failed to decode {path}: {detail}") from None


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def load_definition_file(path: str | Path) -> list[dict]:
    """The service definitions in a file (at least one), as Consul's config files hold them."""
    data = load_file(path)
    if not isinstance(data, dict):
        raise DefinitionError(f"{path}: expected a service definition (an object)")
    service, services = field(data, "service"), field(data, "services")
    if service is not None:
        found = _as_list(service)
    elif services is not None:
        found = _as_list(services)
    elif field(data, "name") is not None:
        found = [data]
    else:
        found = []
    if not found:
        raise DefinitionError(f"{path} does not define a service")
    for definition in found:
        if not isinstance(definition, dict):
            raise DefinitionError(f"{path}: each service must be an object")
    return found


@dataclass(frozen=True)
class ConfigFile:
    """What one config-dir file defines, in canonical form."""

    path: str
    services: tuple[dict, ...] = ()
    checks: tuple[dict, ...] = ()


def load_config_file(path: str | Path) -> ConfigFile:
    """Services and node-level checks of one config-dir file, canonical and validated.

    An empty file (or one with neither) defines nothing; anything malformed
    raises DefinitionError naming the file and the field.
    """
    data = load_file(path)
    if data is None:
        return ConfigFile(str(path))
    if not isinstance(data, dict):
        raise DefinitionError(f"{path}: expected an object at the top level")
    raw_services = _as_list(field(data, "service")) + _as_list(field(data, "services"))
    raw_checks = _as_list(field(data, "check")) + _as_list(field(data, "checks"))
    if not raw_services and not raw_checks and field(data, "name") is not None:
        raw_services = [data]
    services = tuple(
        canonical_service(s, f"{path}: service[{i}]") for i, s in enumerate(raw_services)
    )
    checks = tuple(canonical_check(c, f"{path}: check[{i}]") for i, c in enumerate(raw_checks))
    return ConfigFile(str(path), services, checks)


def config_dir_files(directory: str | Path) -> list[Path]:
    """The definition files of a config dir, in name order (as Consul reads them)."""
    d = Path(directory)
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in CONFIG_SUFFIXES)


# --- canonical form -----------------------------------------------------------------

Conv = Callable[[Any, str], Any]


def _bad(where: str, expected: str, value: Any) -> DefinitionError:
    got = type(value).__name__ if value is not None else "null"
    return DefinitionError(f"{where}: expected {expected}, got {got}")


def _str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(where, "a string", value)
    return value


def _int(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, str) and value.strip().isdigit():  # YAML/HCL users quote numbers
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(where, "an integer", value)
    if isinstance(value, float) and not value.is_integer():
        raise _bad(where, "an integer", value)
    return int(value)


def _bool(value: Any, where: str) -> bool:
    if value is None:
        return False
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise _bad(where, "a boolean", value)
    return value


def _duration(value: Any, where: str) -> str:
    try:
        return format_duration(parse_duration(value))
    except ValueError as exc:
        raise DefinitionError(f"{where}: {exc}") from None


def _any(value: Any, where: str) -> Any:
    return value


def _list_of(item: Conv) -> Conv:
    def conv(value: Any, where: str) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]

    return conv


def _map_of(item: Conv) -> Conv:
    def conv(value: Any, where: str) -> dict:
        if value is None:
            return {}
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            merged: dict = {}  # HCL blocks: meta { a = "b" } can parse as a list of maps
            for v in value:
                merged.update(v)
            value = merged
        if not isinstance(value, dict):
            raise _bad(where, "an object", value)
        return {str(k): item(v, f"{where}.{k}") for k, v in value.items()}

    return conv


class _Struct:
    """Canonical field names; unknown fields are dropped (as Go's decoder ignores them)."""

    def __init__(self, fields: dict[str, Conv | Callable[[], Conv]], **aliases: str) -> None:
        self.fields = fields
        self.by_fold = {_fold(k): k for k in fields}
        for alias, target in aliases.items():
            self.by_fold[_fold(alias)] = target

    def __call__(self, value: Any, where: str) -> dict:
        if value is None:
            return {}
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
            value = value[0]  # an HCL block given as a one-element list
        if not isinstance(value, dict):
            raise _bad(where, "an object", value)
        out: dict[str, Any] = {}
        for key, raw in value.items():
            name = self.by_fold.get(_fold(str(key)))
            if name is not None:
                out[name] = self.fields[name](raw, f"{where}.{name}")
        return out


def _lazy(factory: Callable[[], Conv]) -> Conv:
    return lambda value, where: factory()(value, where)


CHECK = _Struct(
    {
        "CheckID": _str,
        "Name": _str,
        "Notes": _str,
        "Status": _str,
        "ServiceID": _str,
        "HTTP": _str,
        "Method": _str,
        "Header": _map_of(_list_of(_str)),
        "Body": _str,
        "TCP": _str,
        "GRPC": _str,
        "GRPCUseTLS": _bool,
        "TLSServerName": _str,
        "TLSSkipVerify": _bool,
        "TTL": _duration,
        "Interval": _duration,
        "Timeout": _duration,
        "DeregisterCriticalServiceAfter": _duration,
        "SuccessBeforePassing": _int,
        "FailuresBeforeCritical": _int,
        "ScriptArgs": _list_of(_str),
        "AliasService": _str,
        "AliasNode": _str,
        "OutputMaxSize": _int,
    },
    ID="CheckID",
    Args="ScriptArgs",
)
UPSTREAM = _Struct(
    {
        "DestinationType": _str,
        "DestinationNamespace": _str,
        "DestinationName": _str,
        "Datacenter": _str,
        "LocalBindAddress": _str,
        "LocalBindPort": _int,
        "Config": _any,
        "MeshGateway": _any,
    }
)
PROXY = _Struct(
    {
        "DestinationServiceName": _str,
        "DestinationServiceID": _str,
        "LocalServiceAddress": _str,
        "LocalServicePort": _int,
        "Mode": _str,
        "Config": _any,
        "Upstreams": _list_of(UPSTREAM),
        "MeshGateway": _any,
        "Expose": _any,
        "TransparentProxy": _any,
    }
)
SERVICE = _Struct(
    {
        "ID": _str,
        "Name": _str,
        "Kind": _str,
        "Tags": _list_of(_str),
        "Address": _str,
        "TaggedAddresses": _map_of(_Struct({"Address": _str, "Port": _int})),
        "Meta": _map_of(_str),
        "Port": _int,
        "SocketPath": _str,
        "EnableTagOverride": _bool,
        "Weights": _Struct({"Passing": _int, "Warning": _int}),
        "Proxy": PROXY,
        "Connect": _lazy(lambda: CONNECT),
        "Check": CHECK,
        "Checks": _list_of(CHECK),
        "Namespace": _str,
    },
    Service="Name",
)
CONNECT = _Struct({"Native": _bool, "SidecarService": SERVICE})

CHECK_KINDS = ("http", "tcp", "grpc", "ttl", "alias")
SERVICE_KINDS = (
    "",
    "typical",
    "connect-proxy",
    "mesh-gateway",
    "terminating-gateway",
    "ingress-gateway",
)


def check_kind(check: dict) -> str:
    """The one way a canonical check is run (http, tcp, grpc, ttl, alias), or ""."""
    kinds = [
        k
        for k, present in (
            ("http", check.get("HTTP")),
            ("tcp", check.get("TCP")),
            ("grpc", check.get("GRPC")),
            ("ttl", check.get("TTL") not in (None, "", "0s")),
            ("alias", check.get("AliasService") or check.get("AliasNode")),
            ("script", check.get("ScriptArgs")),
        )
        if present
    ]
    if len(kinds) != 1:
        return "" if not kinds else "+".join(kinds)
    return kinds[0]


def validate_check(check: dict, where: str) -> str:
    """The check's kind; raises DefinitionError when it cannot be run as Consul would refuse it."""
    kind = check_kind(check)
    if kind == "script":
        raise DefinitionError(
            f"{where}: script checks are not supported (use HTTP, TCP, GRPC or TTL)"
        )
    if kind not in CHECK_KINDS:
        if not kind:
            raise DefinitionError(
                f"{where}: must provide one of HTTP, TCP, GRPC, TTL or AliasService"
            )
        raise DefinitionError(f"{where}: only one of HTTP, TCP, GRPC, TTL, alias may be set")
    if kind in ("http", "tcp", "grpc") and check.get("Interval") in (None, "", "0s"):
        raise DefinitionError(f"{where}: {kind.upper()} checks must have an Interval")
    if kind == "http" and not check["HTTP"].startswith(("http://", "https://")):
        raise DefinitionError(f"{where}: HTTP must be an http:// or https:// URL")
    if kind == "tcp" and ":" not in check["TCP"]:
        raise DefinitionError(f"{where}: TCP must be host:port")
    status = check.get("Status", "")
    if status and status not in ("passing", "warning", "critical"):
        raise DefinitionError(f"{where}: invalid Status {status!r}")
    return kind


def canonical_check(raw: Any, where: str = "check") -> dict:
    """A check definition in Consul's spelling, validated."""
    check = CHECK(raw, where)
    validate_check(check, where)
    return check


def canonical_service(raw: Any, where: str = "service") -> dict:
    """A service definition in Consul's spelling, validated (checks included)."""
    svc = SERVICE(raw, where)
    if not svc.get("Name"):
        raise DefinitionError(f"{where}: missing service name")
    if svc.get("Kind", "") not in SERVICE_KINDS:
        raise DefinitionError(
            f"{where}.Kind: {svc['Kind']!r} is not a service kind ({', '.join(SERVICE_KINDS[1:])})"
        )
    weights = svc.get("Weights") or {}
    if weights and weights.get("Passing", 1) < 1:
        raise DefinitionError(f"{where}.Weights.Passing: must be greater than 0")
    if not 0 <= svc.get("Port", 0) <= 65535:
        raise DefinitionError(f"{where}.Port: {svc['Port']} is not a port")
    checks = ([svc["Check"]] if svc.get("Check") else []) + list(svc.get("Checks") or [])
    for i, c in enumerate(checks):
        validate_check(c, f"{where}.Checks[{i}]")
    sidecar = (svc.get("Connect") or {}).get("SidecarService")
    if sidecar is not None:
        if svc.get("Kind") not in (None, "", "typical"):
            raise DefinitionError(
                f"{where}: a sidecar can only be registered for a typical service"
            )
        for i, up in enumerate((sidecar.get("Proxy") or {}).get("Upstreams") or []):
            if not up.get("DestinationName"):
                raise DefinitionError(
                    f"{where}.Connect.SidecarService.Proxy.Upstreams[{i}]: missing DestinationName"
                )
            if not up.get("LocalBindPort"):
                raise DefinitionError(
                    f"{where}.Connect.SidecarService.Proxy.Upstreams[{i}]: missing LocalBindPort"
                )
    return svc
