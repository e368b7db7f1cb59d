"""Service and check definition files (JSON, YAML, HCL) with Consul's field names.

One loader for everyone who reads them: `mesh services register FILE` and the
per-host agent's config dir (`mesh agent -config-dir`). Django-free.

A file holds `{"service": {...}}`, `{"services": [...]}`, `{"check": {...}}`,
`{"checks": [...]}` (any mix) or one bare service definition. Field names may
be Consul's API spelling (`Name`, `LocalBindPort`) or the config files' snake
case (`local_bind_port`): both are matched with case and `_` ignored, as the
server decodes them: `canonical_service` / `canonical_check` decode with
`meshproto.registration` (the one decoder, in its lenient mode, and the one
set of rules), so Consul's API spelling comes out, durations as Go strings
("10s"), the keys of user maps (`Meta`, `Header`, `Config`) kept exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshproto.registration import rules
from meshproto.registration.decode import AGENT_CHECK, AGENT_SERVICE, LENIENT, DecodeError, fold
from meshproto.registration.rules import RuleError

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
    want = fold(name)
    for key, value in definition.items():
        if fold(str(key)) == want:
            return value
    return None


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
# The decoder (lenient mode) and the rules are `meshproto.registration`'s, shared with
# the control plane and the agent's API; here their refusals are made to name the file.


def _definition_error(where: str, exc: DecodeError | RuleError) -> DefinitionError:
    if isinstance(exc, DecodeError):
        return DefinitionError(
            f"{where}.{exc.path}: {exc.message}" if exc.path else f"{where}: {exc.message}"
        )
    return DefinitionError(f"{where}: {exc}")


def canonical_check(raw: Any, where: str = "check") -> dict:
    """A check definition in Consul's spelling, validated."""
    try:
        check = AGENT_CHECK(raw, "", LENIENT)
        rules.require_check_kind(check)
        rules.check_status(check.get("Status"))
    except (DecodeError, RuleError) as exc:
        raise _definition_error(where, exc) from None
    return check


def canonical_service(raw: Any, where: str = "service") -> dict:
    """A service definition in Consul's spelling, validated (checks included)."""
    try:
        svc = AGENT_SERVICE(raw, "", LENIENT)
        rules.validate_service(svc)
    except (DecodeError, RuleError) as exc:
        raise _definition_error(where, exc) from None
    return svc
