"""Consul's registration structures and the one decoder for them.

Every service, check and catalog registration is decoded here, whoever
receives it: the control plane's `/v1` and `/api`, the agent's local API, the
agent's definition files (JSON, YAML, HCL) and the agent protocol's
`SyncNode`. A field added to a table below is therefore understood by all of
them at once.

As Consul's decoder does, struct field names are matched with case, `_` and
`-` ignored (`service_id`, `ServiceID`, `serviceid`), the keys of user maps
(`Meta`, `Header`, `Config`) are kept exactly, and unknown struct fields are
ignored. A decoded struct holds only the fields that were given, so callers
can tell absent from empty. Durations come out as the Go string they stand
for ("10s"), so decoding what was decoded changes nothing (the agent sends its
decoded definitions over the wire and the control plane decodes them again).

Two modes:
- `STRICT` (the HTTP APIs): JSON types only; a wrong type is an error.
- `LENIENT` (definition files): also what YAML and HCL hand over: numbers
  and booleans as text, a lone value for a list, an HCL block as a
  one-element list, a map given as a list of blocks.

Bounds hold in both: nesting deeper than `MAX_DEPTH`, integers outside Go's
int64 (or a field's own range), NaN or Infinity, and durations Go could not
hold are refused. Errors are `DecodeError` naming the field; the adapters
map it (a 400 on the control plane and the agent's API, a message naming
the file for definition files).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshproto import durations

MAX_DEPTH = 64
INT64 = (-(2**63), 2**63 - 1)
UINT64_MAX = 2**64 - 1  # no Go integer field holds more


class DecodeError(ValueError):
    """A value the decoder refuses; `path` names the field ("" for the whole body)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path or 'body'}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Mode:
    """How forgiving the decoder is (see the module's docstring)."""

    lenient: bool

    def expected(self, what: str) -> str:
        # The API's messages read as Go's ("expected integer"), the files' as prose
        # ("expected an integer"); clients and people already match on both.
        if not self.lenient:
            return what
        return ("an " if what[0] in "aeiou" else "a ") + what


STRICT = Mode(lenient=False)
LENIENT = Mode(lenient=True)

Decoder = Callable[[Any, str, Mode], Any]


def _fail(path: str, what: str, value: Any, mode: Mode) -> DecodeError:
    got = type(value).__name__ if value is not None else "null"
    return DecodeError(path, f"expected {mode.expected(what)}, got {got}")


# --- bounds -----------------------------------------------------------------------


def check_depth(value: Any, path: str = "", limit: int = MAX_DEPTH, *, finite: bool = True) -> None:
    """Refuse objects and lists nested deeper than `limit` (iteratively: a deep
    value cannot exhaust the stack here) and, with `finite`, NaN/Infinity in them."""
    if not isinstance(value, dict | list):
        if finite and isinstance(value, float) and not math.isfinite(value):
            raise DecodeError(path, "NaN and Infinity are not numbers JSON allows")
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise DecodeError(path, f"nested deeper than {limit} levels")
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
            elif finite and isinstance(child, float) and not math.isfinite(child):
                raise DecodeError(path, "NaN and Infinity are not numbers JSON allows")


class _BadNumber:
    """Stands in for a number no field can hold, until its path is known."""

    __slots__ = ("text", "why")

    def __init__(self, text: str, why: str) -> None:
        self.text, self.why = text, why


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:20] + "..."


def _parse_int(text: str) -> Any:
    if len(text) > 40:  # far past 2**64; int() of a huge digit string costs (and may refuse)
        return _BadNumber(_short(text), "is out of range")
    value = int(text)
    if not INT64[0] <= value <= UINT64_MAX:
        return _BadNumber(text, "is out of range")
    return value


def _parse_float(text: str) -> Any:
    value = float(text)
    if math.isinf(value):
        return _BadNumber(_short(text), "is out of range")
    return value


def _parse_constant(text: str) -> Any:
    return _BadNumber(text, "is not valid JSON (NaN and Infinity are not JSON numbers)")


def _path_text(base: str, path: tuple) -> str:
    out = base
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _check_tree(value: Any, base: str) -> None:
    """Refuse nesting past MAX_DEPTH and the numbers the parser set aside, naming
    the field. Iterative: what it refuses would overflow recursive code later."""
    stack: list[tuple[Any, int, tuple]] = [(value, 0, ())]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict):
            children: Any = node.items()
        elif isinstance(node, list):
            children = enumerate(node)
        elif isinstance(node, _BadNumber):
            raise DecodeError(_path_text(base, path), f"number {node.text} {node.why}")
        else:
            continue
        if depth >= MAX_DEPTH:
            raise DecodeError(_path_text(base, path), f"nested deeper than {MAX_DEPTH} levels")
        for key, child in children:
            if isinstance(child, dict | list | _BadNumber):
                stack.append((child, depth + 1, (*path, key)))


def _refuse_nul(value: Any, base: str) -> None:
    """Refuse NUL characters in strings and keys: PostgreSQL cannot store them in
    text, so they would fail deep in a write (a 500) instead of here (a 400)."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                raise DecodeError(
                    _path_text(base, path), "NUL characters (\\u0000) are not allowed"
                )
        elif isinstance(node, dict):
            for key, child in node.items():
                if "\x00" in key:
                    raise DecodeError(
                        _path_text(base, path), "NUL characters (\\u0000) are not allowed in keys"
                    )
                stack.append((child, (*path, key)))
        elif isinstance(node, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(node))


def parse_json(data: bytes | str, path: str = "") -> Any:
    """JSON text to Python values, as every body (and JSON policy rules) must be parsed.

    None for an empty body. Refused as a DecodeError naming the field where it
    can: invalid syntax or UTF-8, nesting deeper than `MAX_DEPTH` (instead of a
    RecursionError later), NaN/Infinity, integers no Go field could hold, and
    NUL characters in strings (PostgreSQL text cannot hold them).
    """
    if isinstance(data, bytes):
        if not data.strip():
            return None
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(path, "not valid UTF-8") from None
    elif not data.strip():
        return None
    try:
        value = json.loads(
            data, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
        )
    except RecursionError:
        raise DecodeError(path, f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # syntax, or a number Python refuses to convert
        raise DecodeError(path, f"invalid JSON: {exc}") from None
    _check_tree(value, path)
    if "\\u0000" in data:  # in JSON text a NUL can only be written as this escape
        _refuse_nul(value, path)
    return value


# --- field decoders -----------------------------------------------------------------
# Each carries `kind` (and `item` / `factory` for containers) so that a table can be
# walked field by field (the tests do, to prove every field works on every path).


def _kind(kind: str, **info: Any) -> Callable[[Decoder], Decoder]:
    def mark(fn: Decoder) -> Decoder:
        fn.kind = kind  # type: ignore[attr-defined]
        for k, v in info.items():
            setattr(fn, k, v)
        return fn

    return mark


@_kind("str")
def Str(value: Any, path: str, mode: Mode) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(path, "string", value, mode)
    return value


def IntIn(lo: int, hi: int) -> Decoder:
    """An integer between `lo` and `hi` (a float that is a whole number counts)."""

    @_kind("int", lo=lo, hi=hi)
    def decode(value: Any, path: str, mode: Mode) -> int:
        if value is None:
            return 0
        if mode.lenient and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)  # YAML/HCL users quote numbers
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(path, "integer", value, mode)
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise _fail(path, "integer", value, mode)
        if not lo <= value <= hi:
            raise DecodeError(path, f"{value:g} is out of range ({lo} to {hi})")
        return int(value)

    return decode


Int = IntIn(*INT64)


@_kind("bool")
def Bool(value: Any, path: str, mode: Mode) -> bool:
    if value is None:
        return False
    if mode.lenient and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise _fail(path, "boolean", value, mode)
    return value


@_kind("any")
def Anything(value: Any, path: str, mode: Mode) -> Any:
    """Opaque content (proxy `Config`, ...): kept as given, within the bounds."""
    check_depth(value, path)
    return value


@_kind("duration")
def Duration(value: Any, path: str, mode: Mode) -> str:
    """A Go duration string or integer nanoseconds, as the Go string ("10s")."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | type(None)):
        raise _fail(path, "duration", value, mode)
    try:
        return durations.canonical(value)
    except durations.DurationError as exc:
        message = str(exc)
        if "negative" in message:
            message = "duration must not be negative"
        raise DecodeError(path, message) from None


@_kind("duration")
def Seconds(value: Any, path: str, mode: Mode) -> float:
    """A duration as `Duration` reads it, in seconds (for callers that compute with it)."""
    return durations.parse_duration(Duration(value, path, mode))


def ListOf(item: Decoder) -> Decoder:
    @_kind("list", item=item)
    def decode(value: Any, path: str, mode: Mode) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            if not mode.lenient:
                raise _fail(path, "list", value, mode)
            value = [value]  # YAML/HCL: a lone value for a list of one
        return [item(v, f"{path}[{i}]", mode) for i, v in enumerate(value)]

    return decode


def MapOf(item: Decoder) -> Decoder:
    """A user map: keys kept as sent, values decoded."""

    @_kind("map", item=item)
    def decode(value: Any, path: str, mode: Mode) -> dict:
        if value is None:
            return {}
        if mode.lenient and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            merged: dict = {}  # HCL: `meta { a = "b" }` can parse as a list of maps
            for v in value:
                merged.update(v)
            value = merged
        if not isinstance(value, dict):
            raise _fail(path, "object", value, mode)
        return {str(k): item(v, f"{path}.{k}", mode) for k, v in value.items()}

    return decode


def fold(name: str) -> str:
    """How Consul's decoder compares struct keys: case and `_`/`-` ignored."""
    return name.replace("_", "").replace("-", "").lower()


class Struct:
    """A struct with canonical field names; decodes to a dict holding only the
    fields that were present. Calling it decodes a whole value; nested structs
    decode through `decode`. The decoder only descends as deep as the table
    does; opaque content (`Anything`) has its depth checked where it is."""

    def __init__(self, fields: dict[str, Decoder | Struct], **aliases: str) -> None:
        self.fields: dict[str, Decoder] = {
            k: (v.decode if isinstance(v, Struct) else v) for k, v in fields.items()
        }
        self._by_fold = {fold(k): k for k in fields}
        for alias, target in aliases.items():
            self._by_fold[fold(alias)] = target

    def __call__(self, value: Any, path: str = "", mode: Mode = STRICT) -> dict:
        return self.decode(value, path, mode)

    def decode(self, value: Any, path: str, mode: Mode) -> dict:
        if value is None:
            return {}
        if mode.lenient and isinstance(value, list) and len(value) == 1:
            value = value[0]  # an HCL block given as a one-element list
        if not isinstance(value, dict):
            raise _fail(path, "object", value, mode)
        out: dict[str, Any] = {}
        for key, raw in value.items():
            name = self._by_fold.get(fold(str(key)))
            if name is None:
                continue
            out[name] = self.fields[name](raw, f"{path}.{name}" if path else name, mode)
        return out


def Lazy(factory: Callable[[], Struct]) -> Decoder:
    """For recursive tables (a sidecar service is a service)."""

    @_kind("lazy", factory=factory)
    def decode(value: Any, path: str, mode: Mode) -> Any:
        return factory().decode(value, path, mode)

    return decode


# --- Consul's structures --------------------------------------------------------------

Port = IntIn(0, 65535)

CHECK_DEFINITION_FIELDS: dict[str, Decoder] = {
    "HTTP": Str,
    "Method": Str,
    "Header": MapOf(ListOf(Str)),
    "Body": Str,
    "TCP": Str,
    "GRPC": Str,
    "GRPCUseTLS": Bool,
    "TLSServerName": Str,
    "TLSSkipVerify": Bool,
    "TTL": Duration,
    "Interval": Duration,
    "Timeout": Duration,
    "DeregisterCriticalServiceAfter": Duration,
    "SuccessBeforePassing": IntIn(0, 2**31 - 1),
    "FailuresBeforeCritical": IntIn(0, 2**31 - 1),
    "ScriptArgs": ListOf(Str),
    "AliasService": Str,
    "AliasNode": Str,
    "OutputMaxSize": IntIn(0, 2**31 - 1),
}
# The fields of a check that say how it runs (what `Definition` shows).
DEFINITION_KEYS = tuple(CHECK_DEFINITION_FIELDS)

AGENT_CHECK = Struct(
    {
        "CheckID": Str,
        "Name": Str,
        "Notes": Str,
        "Status": Str,
        "ServiceID": Str,
        **CHECK_DEFINITION_FIELDS,
    },
    ID="CheckID",
    Args="ScriptArgs",
)

UPSTREAM = Struct(
    {
        "DestinationType": Str,
        "DestinationNamespace": Str,
        "DestinationPartition": Str,
        "DestinationPeer": Str,
        "DestinationName": Str,
        "Datacenter": Str,
        "LocalBindAddress": Str,
        "LocalBindPort": Port,
        "LocalBindSocketPath": Str,
        "Config": Anything,
        "MeshGateway": Anything,
    }
)

PROXY = Struct(
    {
        "DestinationServiceName": Str,
        "DestinationServiceID": Str,
        "LocalServiceAddress": Str,
        "LocalServicePort": Port,
        "LocalServiceSocketPath": Str,
        "Mode": Str,
        "Config": Anything,
        "Upstreams": ListOf(UPSTREAM.decode),
        "MeshGateway": Anything,
        "Expose": Anything,
        "TransparentProxy": Anything,
    }
)

SERVICE_ADDRESS = Struct({"Address": Str, "Port": Port})
WEIGHTS = Struct({"Passing": IntIn(0, 2**31 - 1), "Warning": IntIn(0, 2**31 - 1)})


def _service_fields() -> dict[str, Decoder | Struct]:
    return {
        "ID": Str,
        "Name": Str,
        "Kind": Str,
        "Tags": ListOf(Str),
        "Address": Str,
        "TaggedAddresses": MapOf(SERVICE_ADDRESS.decode),
        "Meta": MapOf(Str),
        "Port": Int,  # the port rule answers for 0-65535 with Consul's message
        "SocketPath": Str,
        "EnableTagOverride": Bool,
        "Weights": WEIGHTS,
        "Proxy": PROXY,
        "Connect": CONNECT,
        "Check": AGENT_CHECK,
        "Checks": ListOf(AGENT_CHECK.decode),
        "Namespace": Str,
    }


CONNECT = Struct({"Native": Bool, "SidecarService": Lazy(lambda: AGENT_SERVICE)})
AGENT_SERVICE = Struct(_service_fields(), Service="Name")
"""A service definition: `PUT /v1/agent/service/register`, definition files, SyncNode."""

CATALOG_CHECK = Struct(
    {
        "Node": Str,
        "CheckID": Str,
        "Name": Str,
        "Status": Str,
        "Notes": Str,
        "Output": Str,
        "ServiceID": Str,
        "ServiceName": Str,
        "Type": Str,
        "Definition": Struct(CHECK_DEFINITION_FIELDS),
    },
    ID="CheckID",
)

CATALOG_REGISTER = Struct(
    {
        "ID": Str,
        "Node": Str,
        "Address": Str,
        "Datacenter": Str,
        "TaggedAddresses": MapOf(Str),
        "NodeMeta": MapOf(Str),
        "Service": AGENT_SERVICE,
        "Check": CATALOG_CHECK,
        "Checks": ListOf(CATALOG_CHECK.decode),
        "SkipNodeUpdate": Bool,
    }
)

CATALOG_DEREGISTER = Struct(
    {"Node": Str, "Datacenter": Str, "CheckID": Str, "ServiceID": Str, "Namespace": Str}
)

CHECK_UPDATE = Struct({"Status": Str, "Output": Str})

# A check as the agent reports it over SyncNode: a definition with its current result.
SYNC_CHECK = Struct({**AGENT_CHECK.fields, "Output": Str}, ID="CheckID", Args="ScriptArgs")
