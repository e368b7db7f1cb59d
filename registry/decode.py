"""Decode request bodies as Consul's HTTP API does.

Struct field names are matched case-insensitively and with underscores
ignored (`service_id`, `ServiceID` and `serviceid` are one field), while the
keys of user maps (`Meta`, `Header`, ...) are kept exactly. Values are
type-checked against a small spec, so a wrong type is a 400 naming the field
instead of a 500 deep in the ORM. Unknown struct fields are ignored, as Go's
JSON decoder does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from meshproto.durations import format_duration, parse_duration  # noqa: F401 - re-exported
from registry.errors import BadRequest

Decoder = Callable[[Any, str], Any]


def _fail(path: str, expected: str, value: Any) -> BadRequest:
    got = type(value).__name__ if value is not None else "null"
    return BadRequest(f"Request decode failed: {path or 'body'}: expected {expected}, got {got}")


def Str(value: Any, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(path, "string", value)
    return value


def Int(value: Any, path: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, "integer", value)
    if isinstance(value, float) and not value.is_integer():
        raise _fail(path, "integer", value)
    return int(value)


def Bool(value: Any, path: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _fail(path, "boolean", value)
    return value


def Anything(value: Any, path: str) -> Any:
    return value


def Duration(value: Any, path: str) -> float:
    """A duration as a Go string ("10s") or integer nanoseconds; returned in seconds."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | type(None)):
        raise _fail(path, "duration", value)
    try:
        return parse_duration(value)
    except ValueError as exc:
        message = (
            "duration must not be negative"
            if "negative" in str(exc)
            else f"invalid duration {value!r}"
        )
        raise BadRequest(f"Request decode failed: {path}: {message}") from None


def ListOf(item: Decoder) -> Decoder:
    def decode(value: Any, path: str) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise _fail(path, "list", value)
        return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]

    return decode


def MapOf(item: Decoder) -> Decoder:
    """A user map: keys kept as sent, values decoded."""

    def decode(value: Any, path: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _fail(path, "object", value)
        return {str(k): item(v, f"{path}.{k}") for k, v in value.items()}

    return decode


def _fold(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


class Struct:
    """A struct with canonical field names; decodes to a dict holding only
    the fields that were present (so callers can tell absent from empty)."""

    def __init__(self, fields: dict[str, Decoder | Callable[[], Decoder]], **aliases: str) -> None:
        self.fields = fields
        self._by_fold = {_fold(k): k for k in fields}
        for alias, target in aliases.items():
            self._by_fold[_fold(alias)] = target

    def __call__(self, value: Any, path: str = "") -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _fail(path, "object", value)
        out: dict[str, Any] = {}
        for key, raw in value.items():
            name = self._by_fold.get(_fold(str(key)))
            if name is None:
                continue
            decoder = self.fields[name]
            sub = f"{path}.{name}" if path else name
            out[name] = decoder(raw, sub)
        return out


def Lazy(factory: Callable[[], Decoder]) -> Decoder:
    """For recursive specs (a sidecar service is a service)."""

    def decode(value: Any, path: str) -> Any:
        return factory()(value, path)

    return decode


MAX_JSON_DEPTH = 64  # Consul's deepest bodies (config entries) nest about 8 levels
MAX_JSON_INTEGER = 2**64 - 1  # no Go integer field holds more (uint64); less than -2**63 neither
MIN_JSON_INTEGER = -(2**63)


class JSONError(ValueError):
    """A body that is not JSON meshweb accepts; str(e) names the field when it can.

    `field` is the field's path ("Policies[0].ID", "body" for the whole body, ""
    for a syntax error) and `reason` the message without it.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field, self.reason = field, reason


class _BadNumber:
    """Stands in for a number no field can hold, until its path is known."""

    __slots__ = ("text", "why")

    def __init__(self, text: str, why: str) -> None:
        self.text, self.why = text, why


def _parse_int(text: str) -> Any:
    if len(text) > 40:  # far past 2**64; int() of a huge digit string costs (and may refuse)
        return _BadNumber(text[:20] + "...", "is out of range")
    value = int(text)
    if not MIN_JSON_INTEGER <= value <= MAX_JSON_INTEGER:
        return _BadNumber(text, "is out of range")
    return value


def _parse_float(text: str) -> Any:
    value = float(text)
    if value in (math.inf, -math.inf):
        return _BadNumber(text if len(text) <= 40 else text[:20] + "...", "is out of range")
    return value


def _parse_constant(text: str) -> Any:
    return _BadNumber(text, "is not a JSON number (NaN and Infinity are not JSON)")


def _check_tree(value: Any) -> None:
    """Refuse nesting past MAX_JSON_DEPTH and the numbers the parser set aside.

    Iterative (never recursive): the point is to refuse what would make later,
    recursive code (decoders, serializers, the audit log) overflow the stack.
    """
    stack: list[tuple[Any, int, tuple]] = [(value, 0, ())]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict):
            children = node.items()
        elif isinstance(node, list):
            children = enumerate(node)
        elif isinstance(node, _BadNumber):
            raise JSONError(_path_text(path), f"number {node.text} {node.why}")
        else:
            continue
        if depth >= MAX_JSON_DEPTH:
            raise JSONError(_path_text(path), f"nested more than {MAX_JSON_DEPTH} levels deep")
        for key, child in children:
            if isinstance(child, (dict, list, _BadNumber)):
                stack.append((child, depth + 1, (*path, key)))


def _path_text(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def load_json(text: str) -> Any:
    """Parse JSON text as every body (and JSON policy rules) must be parsed.

    Refuses, with a JSONError naming the field where it can: invalid syntax,
    nesting deeper than MAX_JSON_DEPTH (instead of a RecursionError later),
    NaN/Infinity, integers no Go field could hold, and NUL characters in
    strings (PostgreSQL text cannot hold them). The one home for these
    rules: `/v1` bodies, the `/api` DRF parser and ACL rules all call it.
    """
    import json

    try:
        data = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except RecursionError:
        raise JSONError("body", f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except json.JSONDecodeError as exc:
        raise JSONError("", f"invalid JSON: {exc}") from None
    except ValueError as exc:  # a number Python refuses to convert
        raise JSONError("", f"invalid JSON: {exc}") from None
    _check_tree(data)
    if "\\u0000" in text:  # in JSON text a NUL can only be written as this escape
        _refuse_nul(data)
    return data


def _refuse_nul(value: Any) -> None:
    """Refuse NUL characters in strings and keys: PostgreSQL cannot store them in
    text, so they would fail deep in a write (a 500) instead of here (a 400)."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                raise JSONError(_path_text(path), "NUL characters (\\u0000) are not allowed")
        elif isinstance(node, dict):
            for key, child in node.items():
                if "\x00" in key:
                    raise JSONError(
                        _path_text(path), "NUL characters (\\u0000) are not allowed in keys"
                    )
                stack.append((child, (*path, key)))
        elif isinstance(node, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(node))


def parse_body_json(body: bytes) -> Any:
    """Parse a JSON body with a clear 400 on bad bytes, syntax, depth or numbers."""
    if not body or not body.strip():
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("Request decode failed: body is not valid UTF-8") from None
    try:
        return load_json(text)
    except JSONError as exc:
        raise BadRequest(f"Request decode failed: {exc}") from None


# --- Consul's structures -----------------------------------------------------

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
    "SuccessBeforePassing": Int,
    "FailuresBeforeCritical": Int,
    "ScriptArgs": ListOf(Str),
    "AliasService": Str,
    "AliasNode": Str,
    "OutputMaxSize": Int,
}

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
        "DestinationName": Str,
        "Datacenter": Str,
        "LocalBindAddress": Str,
        "LocalBindPort": Int,
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
        "LocalServicePort": Int,
        "LocalServiceSocketPath": Str,
        "Mode": Str,
        "Config": Anything,
        "Upstreams": ListOf(UPSTREAM),
        "MeshGateway": Anything,
        "Expose": Anything,
        "TransparentProxy": Anything,
    }
)

SERVICE_ADDRESS = Struct({"Address": Str, "Port": Int})
WEIGHTS = Struct({"Passing": Int, "Warning": Int})


def _service_fields() -> dict[str, Decoder]:
    return {
        "ID": Str,
        "Name": Str,
        "Kind": Str,
        "Tags": ListOf(Str),
        "Address": Str,
        "TaggedAddresses": MapOf(SERVICE_ADDRESS),
        "Meta": MapOf(Str),
        "Port": Int,
        "SocketPath": Str,
        "EnableTagOverride": Bool,
        "Weights": WEIGHTS,
        "Proxy": PROXY,
        "Connect": CONNECT,
        "Check": AGENT_CHECK,
        "Checks": ListOf(AGENT_CHECK),
        "Namespace": Str,
    }


CONNECT = Struct(
    {"Native": Bool, "SidecarService": Lazy(lambda: AGENT_SERVICE)},
)
AGENT_SERVICE = Struct(_service_fields(), Service="Name")

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

CATALOG_SERVICE = Struct(_service_fields(), Service="Name")

CATALOG_REGISTER = Struct(
    {
        "ID": Str,
        "Node": Str,
        "Address": Str,
        "Datacenter": Str,
        "TaggedAddresses": MapOf(Str),
        "NodeMeta": MapOf(Str),
        "Service": CATALOG_SERVICE,
        "Check": CATALOG_CHECK,
        "Checks": ListOf(CATALOG_CHECK),
        "SkipNodeUpdate": Bool,
    }
)

CATALOG_DEREGISTER = Struct(
    {"Node": Str, "Datacenter": Str, "CheckID": Str, "ServiceID": Str, "Namespace": Str}
)

CHECK_UPDATE = Struct({"Status": Str, "Output": Str})
