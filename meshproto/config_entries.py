"""Consul's config entries: one validating decoder per kind (pure, no Django).

`decode_entry(raw)` turns a request body (JSON or HCL already parsed into
dicts and lists) into the canonical form we store and answer with:
Consul's field names, only the fields that were given, durations as Go
strings ("15s"). Keys are matched as Consul's decoder matches them: case
does not matter and snake_case works (`service_subset` is `ServiceSubset`);
the keys of user maps (`Meta`, `Config`, `Subsets`, header maps) are kept
exactly. A one-element list where an object is expected is taken as the
object, because that is how HCL hands over a block (Consul does the same).

Every rule that one entry can check on its own is checked here, before
anything is stored, and every error names the path of the offending field
(`Routes[0].Match.HTTP.PathRegex: ...`). Unknown fields are refused.
Rules that need other entries (splits naming subsets, protocols, loops)
are checked by `validate_graph`, which compiles the discovery chains the
entries form (see `meshproto.discovery_chain`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from meshproto import durations
from meshproto.registration.decode import fold  # how Consul matches struct keys

KINDS = (
    "proxy-defaults",
    "service-defaults",
    "service-router",
    "service-splitter",
    "service-resolver",
    "service-intentions",
    "mesh",
    "exported-services",
)
# Kinds whose entries shape discovery chains (writing one changes compiled chains).
CHAIN_KINDS = frozenset(
    {"proxy-defaults", "service-defaults", "service-router", "service-splitter", "service-resolver"}
)
PROTOCOLS = ("tcp", "http", "http2", "grpc")
HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc"})
PROXY_DEFAULTS_NAME = "global"
MESH_NAME = "mesh"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE")
DEFAULT_NAMESPACE = "default"


class ConfigEntryError(ValueError):
    """An entry that cannot be stored; `str()` names the field and what is wrong."""


Decoder = Callable[[Any, str], Any]
_DROP = object()  # a field accepted on input and never stored (CreateIndex, Precedence, ...)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def fail(path: str, message: str) -> ConfigEntryError:
    return ConfigEntryError(f"{path}: {message}" if path else message)


def _expected(path: str, what: str, value: Any) -> ConfigEntryError:
    return fail(path, f"expected {what}, got {_type_name(value)}")


# --------------------------------------------------------------------------- durations
# Durations are `meshproto.durations`' (nanoseconds here); the names stay for callers.
parse_duration = durations.parse_ns
format_duration = durations.format_ns


def duration_seconds(text: str | None) -> float:
    """A stored duration ("15s") in seconds; "" or None is 0."""
    return durations.parse_ns(text) / 1e9 if text else 0.0


# --------------------------------------------------------------------------- field decoders


def Str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _expected(path, "a string", value)
    return value


def Bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _expected(path, "a boolean", value)
    return value


def Int(lo: int | None = 0, hi: int | None = 2**32 - 1) -> Decoder:
    def decode(value: Any, path: str) -> int:
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            value = int(value)  # HCL and form posts hand numbers over as text
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _expected(path, "an integer", value)
        if isinstance(value, float) and not value.is_integer():
            raise fail(path, f"expected an integer, got {value}")
        value = int(value)
        if lo is not None and value < lo:
            raise fail(path, f"must be at least {lo}, got {value}")
        if hi is not None and value > hi:
            raise fail(path, f"must be at most {hi}, got {value}")
        return value

    return decode


def Number(lo: float | None = None, hi: float | None = None) -> Decoder:
    def decode(value: Any, path: str) -> int | float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _expected(path, "a number", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _expected(path, "a number", value)
        if math.isnan(value) or math.isinf(value):
            raise fail(path, "must be a finite number")
        if lo is not None and value < lo:
            raise fail(path, f"must be between {lo:g} and {hi:g}, got {value:g}")
        if hi is not None and value > hi:
            raise fail(path, f"must be between {lo:g} and {hi:g}, got {value:g}")
        return int(value) if float(value).is_integer() else float(value)

    return decode


def Duration(value: Any, path: str) -> str:
    """A duration as Go writes it ("15s") or integer nanoseconds; stored as Go prints it."""
    if isinstance(value, bool):
        raise _expected(path, "a duration", value)
    if not isinstance(value, (int, float, str)):
        raise _expected(path, "a duration", value)
    try:
        ns = durations.parse_ns(value, allow_negative=True)
    except durations.DurationError as exc:
        if isinstance(value, str) and "out of range" not in str(exc):
            raise fail(
                path, f'invalid duration "{value}" (use Go\'s form: "5s", "1m30s", "250ms")'
            ) from None
        raise fail(path, str(exc)) from None
    if ns < 0:
        raise fail(path, f"must not be negative, got {value!r}")
    return format_duration(ns)


def Enum(*choices: str, fold: bool = True) -> Decoder:
    def decode(value: Any, path: str) -> str:
        text = Str(value, path)
        canon = text.lower() if fold else text
        if canon not in choices:
            allowed = ", ".join(f'"{c}"' for c in choices if c) or '""'
            raise fail(path, f'invalid value "{text}": must be one of {allowed}')
        return canon

    return decode


def Regex(value: Any, path: str) -> str:
    text = Str(value, path)
    try:
        re.compile(text)
    except re.error as exc:
        raise fail(path, f"invalid regular expression {text!r}: {exc}") from None
    return text


def Ignored(value: Any, path: str) -> object:
    return _DROP


def Anything(value: Any, path: str) -> Any:
    return value


def ListOf(item: Decoder) -> Decoder:
    def decode(value: Any, path: str) -> list:
        if not isinstance(value, list):
            raise _expected(path, "a list", value)
        return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]

    return decode


def MapOf(item: Decoder) -> Decoder:
    """A user map: keys kept exactly as sent."""

    def decode(value: Any, path: str) -> dict:
        value = _unblock(value)
        if not isinstance(value, dict):
            raise _expected(path, "an object", value)
        return {str(k): item(v, f"{path}.{k}") for k, v in value.items()}

    return decode


def _unblock(value: Any) -> Any:
    # HCL hands `block { ... }` over as a one-element list of objects.
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        return value[0]
    return value


class Struct:
    """An object with Consul's field names. Decodes to a dict holding the
    given fields in the spec's order; an unknown field is an error naming it."""

    def __init__(self, fields: dict[str, Decoder | Struct], **aliases: str) -> None:
        self.fields = fields
        self._by_fold = {fold(k): k for k in fields}
        for alias, target in aliases.items():
            self._by_fold[fold(alias)] = target

    def __call__(self, value: Any, path: str = "") -> dict:
        value = _unblock(value)
        if not isinstance(value, dict):
            raise _expected(path, "an object", value)
        found: dict[str, Any] = {}
        for key, raw in value.items():
            name = self._by_fold.get(fold(str(key)))
            sub = f"{path}.{name or key}" if path else str(name or key)
            if name is None:
                raise fail(sub, "unknown field")
            if name in found:
                raise fail(sub, "given more than once")
            if raw is None:
                continue
            decoded = self.fields[name](raw, sub)
            if decoded is not _DROP:
                found[name] = decoded
        return {k: found[k] for k in self.fields if k in found}


def _lazy(factory: Callable[[], Decoder]) -> Decoder:
    return lambda value, path: factory()(value, path)


# --------------------------------------------------------------------------- shared structs

MESH_GATEWAY = Struct({"Mode": Enum("", "none", "local", "remote")})
TRANSPARENT_PROXY = Struct({"OutboundListenerPort": Int(0, 65535), "DialedDirectly": Bool})
EXPOSE = Struct(
    {
        "Checks": Bool,
        "Paths": ListOf(
            Struct(
                {
                    "ListenerPort": Int(0, 65535),
                    "Path": Str,
                    "LocalPathPort": Int(0, 65535),
                    "Protocol": Enum("http", "http2"),
                }
            )
        ),
    }
)
HEADER_MODIFIERS = Struct({"Add": MapOf(Str), "Set": MapOf(Str), "Remove": ListOf(Str)})
HEADER_MATCH = Struct(
    {
        "Name": Str,
        "Present": Bool,
        "Exact": Str,
        "Prefix": Str,
        "Suffix": Str,
        "Regex": Regex,
        "Invert": Bool,
    }
)
QUERY_MATCH = Struct({"Name": Str, "Present": Bool, "Exact": Str, "Regex": Regex})
_COMMON = {
    "Kind": Str,
    "Name": Str,
    "Namespace": Str,
    "Partition": Str,
    "Meta": MapOf(Str),
    # Read back from a GET and sent again: accepted, never stored from input.
    "CreateIndex": Ignored,
    "ModifyIndex": Ignored,
    "Hash": Ignored,
}


def _entry(fields: dict[str, Decoder | Struct]) -> Struct:
    return Struct({**_COMMON, **fields})


# --------------------------------------------------------------------------- kinds

PROXY_DEFAULTS = _entry(
    {
        "Config": MapOf(Anything),
        "Mode": Enum("", "direct", "transparent"),
        "TransparentProxy": TRANSPARENT_PROXY,
        "MutualTLSMode": Enum("", "strict", "permissive"),
        "MeshGateway": MESH_GATEWAY,
        "Expose": EXPOSE,
    }
)

LIMITS = Struct(
    {
        "MaxConnections": Int(0),
        "MaxPendingRequests": Int(0),
        "MaxConcurrentRequests": Int(0),
    }
)
PASSIVE_HEALTH_CHECK = Struct(
    {
        "Interval": Duration,
        "MaxFailures": Int(0),
        "EnforcingConsecutive5xx": Int(0, 100),
        "MaxEjectionPercent": Int(0, 100),
        "BaseEjectionTime": Duration,
    }
)
_UPSTREAM_FIELDS: dict[str, Decoder | Struct] = {
    "Protocol": Enum(*PROTOCOLS),
    "ConnectTimeoutMs": Int(0),
    "Limits": LIMITS,
    "PassiveHealthCheck": PASSIVE_HEALTH_CHECK,
    "MeshGateway": MESH_GATEWAY,
    "BalanceOutboundConnections": Enum("", "exact_balance"),
}
UPSTREAM_CONFIG = Struct(
    {
        "Overrides": ListOf(Struct({"Name": Str, "Namespace": Str, **_UPSTREAM_FIELDS})),
        "Defaults": Struct(_UPSTREAM_FIELDS),
    }
)
RATE_LIMITS = Struct(
    {
        "InstanceLevel": Struct(
            {
                "RequestsPerSecond": Number(0, 1e9),
                "RequestsMaxBurst": Int(0),
                "Routes": ListOf(
                    Struct(
                        {
                            "PathExact": Str,
                            "PathPrefix": Str,
                            "PathRegex": Regex,
                            "RequestsPerSecond": Number(0, 1e9),
                            "RequestsMaxBurst": Int(0),
                        }
                    )
                ),
            }
        )
    }
)
SERVICE_DEFAULTS = _entry(
    {
        "Protocol": Enum(*PROTOCOLS),
        "Mode": Enum("", "direct", "transparent"),
        "TransparentProxy": TRANSPARENT_PROXY,
        "MutualTLSMode": Enum("", "strict", "permissive"),
        "MeshGateway": MESH_GATEWAY,
        "Expose": EXPOSE,
        "ExternalSNI": Str,
        "UpstreamConfig": UPSTREAM_CONFIG,
        "Destination": Struct({"Addresses": ListOf(Str), "Port": Int(0, 65535)}),
        "MaxInboundConnections": Int(0),
        "LocalConnectTimeoutMs": Int(0),
        "LocalRequestTimeoutMs": Int(0),
        "BalanceInboundConnections": Enum("", "exact_balance"),
        "RateLimits": RATE_LIMITS,
    }
)

ROUTE_MATCH_HTTP = Struct(
    {
        "PathExact": Str,
        "PathPrefix": Str,
        "PathRegex": Regex,
        "Header": ListOf(HEADER_MATCH),
        "QueryParam": ListOf(QUERY_MATCH),
        "Methods": ListOf(Str),
    }
)
ROUTE_DESTINATION = Struct(
    {
        "Service": Str,
        "ServiceSubset": Str,
        "Namespace": Str,
        "Partition": Str,
        "PrefixRewrite": Str,
        "RequestTimeout": Duration,
        "IdleTimeout": Duration,
        "NumRetries": Int(0),
        "RetryOnConnectFailure": Bool,
        "RetryOn": ListOf(
            Enum(
                "5xx",
                "gateway-error",
                "reset",
                "connect-failure",
                "envoy-ratelimited",
                "retriable-4xx",
                "refused-stream",
                "cancelled",
                "deadline-exceeded",
                "internal",
                "resource-exhausted",
                "unavailable",
            )
        ),
        "RetryOnStatusCodes": ListOf(Int(100, 599)),
        "RequestHeaders": HEADER_MODIFIERS,
        "ResponseHeaders": HEADER_MODIFIERS,
        # meshweb's extensions (docs/proxy-config.md): per-try timeout, retrying
        # non-idempotent methods, the retry budget, and fault injection.
        "PerTryTimeout": Duration,
        "RetryNonIdempotent": Bool,
        "RetryBudget": Struct({"Percent": Number(0, 100), "MinRetriesPerSecond": Number(0, 1e6)}),
        "Fault": Struct(
            {
                "Delay": Duration,
                "DelayPercent": Number(0, 100),
                "AbortStatus": Int(200, 599),
                "AbortPercent": Number(0, 100),
            }
        ),
    }
)
SERVICE_ROUTER = _entry(
    {
        "Routes": ListOf(
            Struct(
                {
                    "Match": Struct({"HTTP": ROUTE_MATCH_HTTP}),
                    "Destination": ROUTE_DESTINATION,
                }
            )
        )
    }
)

SERVICE_SPLITTER = _entry(
    {
        "Splits": ListOf(
            Struct(
                {
                    "Weight": Number(0, 100),
                    "Service": Str,
                    "ServiceSubset": Str,
                    "Namespace": Str,
                    "Partition": Str,
                    "RequestHeaders": HEADER_MODIFIERS,
                    "ResponseHeaders": HEADER_MODIFIERS,
                }
            )
        )
    }
)

LB_POLICIES = ("", "round_robin", "least_request", "ring_hash", "maglev", "random")
LOAD_BALANCER = Struct(
    {
        "Policy": Enum(*LB_POLICIES),
        "RingHashConfig": Struct(
            {"MinimumRingSize": Int(0, 2**23), "MaximumRingSize": Int(0, 2**23)}
        ),
        "LeastRequestConfig": Struct({"ChoiceCount": Int(2)}),
        "HashPolicies": ListOf(
            Struct(
                {
                    "Field": Enum("header", "cookie", "query_parameter"),
                    "FieldValue": Str,
                    "CookieConfig": Struct({"Session": Bool, "TTL": Duration, "Path": Str}),
                    "SourceIP": Bool,
                    "Terminal": Bool,
                }
            )
        ),
    }
)
FAILOVER_TARGET = Struct(
    {
        "Service": Str,
        "ServiceSubset": Str,
        "Namespace": Str,
        "Partition": Str,
        "Datacenter": Str,
    }
)
SERVICE_RESOLVER = _entry(
    {
        "DefaultSubset": Str,
        "Subsets": MapOf(Struct({"Filter": Str, "OnlyPassing": Bool})),
        "Redirect": Struct(
            {
                "Service": Str,
                "ServiceSubset": Str,
                "Namespace": Str,
                "Partition": Str,
                "Datacenter": Str,
            }
        ),
        "Failover": MapOf(
            Struct(
                {
                    "Service": Str,
                    "ServiceSubset": Str,
                    "Namespace": Str,
                    "Datacenters": ListOf(Str),
                    "Targets": ListOf(FAILOVER_TARGET),
                }
            )
        ),
        "ConnectTimeout": Duration,
        "RequestTimeout": Duration,
        "LoadBalancer": LOAD_BALANCER,
    }
)

PERMISSION_HTTP = Struct(
    {
        "PathExact": Str,
        "PathPrefix": Str,
        "PathRegex": Regex,
        "Header": ListOf(HEADER_MATCH),
        "Methods": ListOf(Str),
    }
)
INTENTION_PERMISSION = Struct({"Action": Enum("allow", "deny"), "HTTP": PERMISSION_HTTP})
INTENTION_SOURCE = Struct(
    {
        "Name": Str,
        "Namespace": Str,
        "Partition": Str,
        "Peer": Str,
        "Action": Enum("allow", "deny"),
        "Permissions": ListOf(INTENTION_PERMISSION),
        "Precedence": Ignored,  # computed, read-only
        "Type": Enum("consul"),
        "Description": Str,
        "LegacyID": Str,
        "LegacyMeta": MapOf(Str),
        "LegacyCreateTime": Ignored,
        "LegacyUpdateTime": Ignored,
    }
)
SERVICE_INTENTIONS = _entry({"Sources": ListOf(INTENTION_SOURCE)})

TLS_VERSIONS = ("", "TLS_AUTO", "TLSv1_0", "TLSv1_1", "TLSv1_2", "TLSv1_3")
_TLS_DIRECTION = Struct(
    {
        "TLSMinVersion": Enum(*TLS_VERSIONS, fold=False),
        "TLSMaxVersion": Enum(*TLS_VERSIONS, fold=False),
        "CipherSuites": ListOf(Str),
    }
)
MESH = _entry(
    {
        "TransparentProxy": Struct({"MeshDestinationsOnly": Bool}),
        "AllowEnablingPermissiveMutualTLS": Bool,
        "TLS": Struct({"Incoming": _TLS_DIRECTION, "Outgoing": _TLS_DIRECTION}),
        "HTTP": Struct({"SanitizeXForwardedClientCert": Bool}),
        "Peering": Struct({"PeerThroughMeshGateways": Bool}),
        # meshweb's own: with no matching intention, allow instead of deny (dev clusters).
        "AllowByDefault": Bool,
    }
)

EXPORTED_SERVICES_NAME = "default"  # the partition's name (one partition: "default")
EXPORTED_SERVICES = _entry(
    {
        "Services": ListOf(
            Struct(
                {
                    "Name": Str,
                    "Namespace": Str,
                    "Consumers": ListOf(
                        Struct({"Peer": Str, "Partition": Str, "SamenessGroup": Str})
                    ),
                }
            )
        )
    }
)

SPECS: dict[str, Struct] = {
    "proxy-defaults": PROXY_DEFAULTS,
    "service-defaults": SERVICE_DEFAULTS,
    "service-router": SERVICE_ROUTER,
    "service-splitter": SERVICE_SPLITTER,
    "service-resolver": SERVICE_RESOLVER,
    "service-intentions": SERVICE_INTENTIONS,
    "mesh": MESH,
    "exported-services": EXPORTED_SERVICES,
}


# --------------------------------------------------------------------------- entry point


def check_kind(kind: Any) -> str:
    """A known kind, else a ConfigEntryError naming it."""
    if not isinstance(kind, str) or kind not in SPECS:
        raise ConfigEntryError(
            f"invalid config entry kind: {kind!r} (known kinds: {', '.join(KINDS)})"
            if kind
            else "Kind is required"
        )
    return kind


def normalize_name(kind: str, name: Any) -> str:
    """The entry's name as stored: `proxy-defaults` is always "global", `mesh` "mesh"."""
    if name is None or name == "":
        if kind == "mesh":
            return MESH_NAME
        raise ConfigEntryError("Name is required")
    if not isinstance(name, str):
        raise _expected("Name", "a string", name)
    if kind == "proxy-defaults" and name != PROXY_DEFAULTS_NAME:
        raise ConfigEntryError(
            f'Name: invalid name "{name}": a proxy-defaults entry must be named "{PROXY_DEFAULTS_NAME}"'
        )
    if kind == "exported-services" and name != EXPORTED_SERVICES_NAME:
        raise ConfigEntryError(
            f'Name: invalid name "{name}": the exported-services entry is named after its '
            f'partition, "{EXPORTED_SERVICES_NAME}"'
        )
    if kind == "mesh" and name != MESH_NAME:
        raise ConfigEntryError(
            f'Name: invalid name "{name}": the mesh entry is named "{MESH_NAME}"'
        )
    if len(name) > 256 or "/" in name or any(c.isspace() or ord(c) < 32 for c in name):
        raise ConfigEntryError(
            f"Name: invalid name {name!r}: at most 256 characters, no '/', no spaces"
        )
    if name == "*" and kind != "service-intentions":
        raise ConfigEntryError("Name: the wildcard '*' names only a service-intentions entry")
    return name


def decode_entry(raw: Any) -> dict:
    """A request body as a canonical, validated entry (with `Kind` and `Name`).

    Raises ConfigEntryError with the offending field's path for anything
    Consul would refuse, an unknown field, or a value meshweb cannot enforce.
    """
    raw = _unblock(raw)
    if not isinstance(raw, dict):
        raise _expected("body", "a config entry (an object)", raw)
    kind_key = next((k for k in raw if fold(str(k)) == "kind"), None)
    kind = check_kind(raw.get(kind_key) if kind_key is not None else None)
    data = SPECS[kind](raw)
    data["Name"] = normalize_name(kind, data.get("Name"))
    for field in ("Namespace", "Partition"):
        if data.get(field, "") not in ("", DEFAULT_NAMESPACE):
            raise fail(field, f'only "{DEFAULT_NAMESPACE}" is supported, got "{data[field]}"')
        data.pop(field, None)
    if "Meta" in data:
        _check_meta(data["Meta"], "Meta")
    _VALIDATORS[kind](data)
    return _ordered(data)


def _ordered(data: dict) -> dict:
    """`Kind`, `Name` first, then the rest, as Consul's encoder writes them."""
    return {
        "Kind": data["Kind"],
        "Name": data["Name"],
        **{k: v for k, v in data.items() if k not in ("Kind", "Name")},
    }


def _check_meta(meta: dict, path: str) -> None:
    if len(meta) > 64:
        raise fail(path, f"at most 64 keys, got {len(meta)}")
    for key, value in meta.items():
        if not key or len(key) > 128:
            raise fail(path, f"key {key!r} must be 1 to 128 characters")
        if len(value) > 512:
            raise fail(f"{path}.{key}", "value longer than 512 characters")


# --------------------------------------------------------------------------- per-kind rules


def _one_path_match(m: dict, path: str) -> None:
    given = [k for k in ("PathExact", "PathPrefix", "PathRegex") if m.get(k)]
    if len(given) > 1:
        raise fail(
            path, f"at most one of PathExact, PathPrefix or PathRegex, got {', '.join(given)}"
        )
    for k in ("PathExact", "PathPrefix"):
        if m.get(k) and not m[k].startswith("/"):
            raise fail(f"{path}.{k}", f"must start with '/', got {m[k]!r}")


def _check_headers(headers: list, path: str, ops: tuple[str, ...]) -> None:
    for i, h in enumerate(headers):
        p = f"{path}[{i}]"
        if not h.get("Name"):
            raise fail(f"{p}.Name", "is required")
        given = [k for k in ops if h.get(k) not in (None, "", False)]
        if len(given) > 1:
            raise fail(p, f"at most one of {', '.join(ops)}, got {', '.join(given)}")


def _check_methods(methods: list, path: str) -> list[str]:
    out: list[str] = []
    for i, m in enumerate(methods):
        upper = m.upper()
        if upper not in HTTP_METHODS:
            raise fail(
                f"{path}[{i}]", f"unknown HTTP method {m!r} (one of {', '.join(HTTP_METHODS)})"
            )
        if upper in out:
            raise fail(path, f"contains {upper!r} more than once")
        out.append(upper)
    return out


def _check_header_modifiers(d: dict, path: str) -> None:
    for field in ("RequestHeaders", "ResponseHeaders"):
        mods = d.get(field)
        if not mods:
            continue
        for op in ("Add", "Set"):
            for name in mods.get(op, {}):
                if not name.strip():
                    raise fail(f"{path}.{field}.{op}", "header names must not be empty")
        for i, name in enumerate(mods.get("Remove", [])):
            if not name.strip():
                raise fail(f"{path}.{field}.Remove[{i}]", "header names must not be empty")


def _validate_proxy_defaults(e: dict) -> None:
    config = e.get("Config", {})
    # `Config` is a free map, but its protocol key is read as Consul reads it
    # (case-insensitively); it is stored as `protocol`.
    keys = [k for k in config if k.lower() == "protocol"]
    if len(keys) > 1:
        raise fail("Config.protocol", "given more than once")
    if keys:
        proto = config.pop(keys[0])
        if not isinstance(proto, str) or proto.lower() not in PROTOCOLS:
            raise fail("Config.protocol", f"must be one of {', '.join(PROTOCOLS)}, got {proto!r}")
        config["protocol"] = proto.lower()
    _check_expose(e)


def _check_expose(e: dict) -> None:
    for i, p in enumerate(e.get("Expose", {}).get("Paths", [])):
        if p.get("Path") and not p["Path"].startswith("/"):
            raise fail(f"Expose.Paths[{i}].Path", f"must start with '/', got {p['Path']!r}")


def _validate_upstream(u: dict, path: str) -> None:
    phc = u.get("PassiveHealthCheck")
    if (
        phc
        and "Interval" in phc
        and parse_duration(phc["Interval"]) == 0
        and phc.get("MaxFailures")
    ):
        raise fail(
            f"{path}.PassiveHealthCheck.Interval", "must be more than 0s when MaxFailures is set"
        )


def _validate_service_defaults(e: dict) -> None:
    _check_expose(e)
    uc = e.get("UpstreamConfig", {})
    if "Defaults" in uc:
        _validate_upstream(uc["Defaults"], "UpstreamConfig.Defaults")
    for i, o in enumerate(uc.get("Overrides", [])):
        p = f"UpstreamConfig.Overrides[{i}]"
        if not o.get("Name"):
            raise fail(f"{p}.Name", "is required")
        _validate_upstream(o, p)
    inst = e.get("RateLimits", {}).get("InstanceLevel", {})
    if inst.get("RequestsMaxBurst") and not inst.get("RequestsPerSecond"):
        raise fail("RateLimits.InstanceLevel.RequestsMaxBurst", "needs RequestsPerSecond to be set")
    for i, r in enumerate(inst.get("Routes", [])):
        p = f"RateLimits.InstanceLevel.Routes[{i}]"
        given = [k for k in ("PathExact", "PathPrefix", "PathRegex") if r.get(k)]
        if len(given) != 1:
            raise fail(p, "exactly one of PathExact, PathPrefix or PathRegex is required")
        _one_path_match(r, p)
        if not r.get("RequestsPerSecond"):
            raise fail(f"{p}.RequestsPerSecond", "must be more than 0")


def _validate_service_router(e: dict) -> None:
    for i, route in enumerate(e.get("Routes", [])):
        p = f"Routes[{i}]"
        http = route.get("Match", {}).get("HTTP", {})
        hp = f"{p}.Match.HTTP"
        _one_path_match(http, hp)
        _check_headers(
            http.get("Header", []),
            f"{hp}.Header",
            ("Present", "Exact", "Prefix", "Suffix", "Regex"),
        )
        _check_headers(
            http.get("QueryParam", []), f"{hp}.QueryParam", ("Present", "Exact", "Regex")
        )
        if "Methods" in http:
            http["Methods"] = _check_methods(http["Methods"], f"{hp}.Methods")
        dest = route.get("Destination", {})
        if dest.get("PrefixRewrite") and not (http.get("PathExact") or http.get("PathPrefix")):
            raise fail(
                f"{p}.Destination.PrefixRewrite",
                "needs Match.HTTP.PathExact or Match.HTTP.PathPrefix",
            )
        if dest.get("ServiceSubset"):
            _check_subset_name(dest["ServiceSubset"], f"{p}.Destination.ServiceSubset")
        _check_header_modifiers(dest, f"{p}.Destination")


def _validate_service_splitter(e: dict) -> None:
    splits = e.get("Splits", [])
    if not splits:
        raise fail("Splits", "at least one split is required")
    seen: set[tuple] = set()
    total = 0
    for i, split in enumerate(splits):
        p = f"Splits[{i}]"
        if "Weight" not in split:
            raise fail(f"{p}.Weight", "is required")
        total += int(round(split["Weight"] * 100))
        key = (
            split.get("Service") or e["Name"],
            split.get("ServiceSubset", ""),
            split.get("Namespace") or "",
        )
        if key in seen:
            raise fail(p, f"the destination {_split_label(split, e['Name'])} occurs more than once")
        seen.add(key)
        if split.get("ServiceSubset"):
            _check_subset_name(split["ServiceSubset"], f"{p}.ServiceSubset")
        _check_header_modifiers(split, p)
    if total != 10000:
        raise fail("Splits", f"the weights must add up to 100, not {total / 100:g}")


def _split_label(split: dict, default: str) -> str:
    svc = split.get("Service") or default
    return f"{svc} subset {split['ServiceSubset']}" if split.get("ServiceSubset") else svc


_SUBSET_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def _check_subset_name(name: str, path: str) -> None:
    if len(name) > 63 or not _SUBSET_NAME.match(name):
        raise fail(
            path,
            f"invalid subset name {name!r}: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit (a DNS label)",
        )


def _validate_service_resolver(e: dict) -> None:
    subsets = e.get("Subsets", {})
    for name in subsets:
        _check_subset_name(name, f"Subsets.{name}")
    default = e.get("DefaultSubset")
    if default and default not in subsets:
        raise fail("DefaultSubset", f'"{default}" is not one of the Subsets')
    redirect = e.get("Redirect")
    if redirect is not None:
        if e.get("Failover"):
            raise fail("Redirect", "Redirect and Failover cannot both be set")
        if not any(
            redirect.get(k) for k in ("Service", "ServiceSubset", "Namespace", "Datacenter")
        ):
            raise fail(
                "Redirect", "is empty: name a Service, ServiceSubset, Namespace or Datacenter"
            )
        if not redirect.get("Service"):
            for k in ("ServiceSubset", "Namespace"):
                if redirect.get(k):
                    raise fail(f"Redirect.{k}", "needs Redirect.Service")
        elif (
            redirect["Service"] == e["Name"]
            and redirect.get("ServiceSubset")
            and redirect["ServiceSubset"] not in subsets
        ):
            raise fail(
                "Redirect.ServiceSubset",
                f'"{redirect["ServiceSubset"]}" is not one of the Subsets',
            )
    for key, f in e.get("Failover", {}).items():
        p = f"Failover.{key}"
        if key != "*" and key not in subsets:
            raise fail(p, f'"{key}" is neither "*" nor one of the Subsets')
        if f.get("Targets") and any(
            f.get(k) for k in ("Service", "ServiceSubset", "Namespace", "Datacenters")
        ):
            raise fail(
                p,
                "Targets cannot be combined with Service, ServiceSubset, Namespace or Datacenters",
            )
        if not (
            f.get("Targets")
            or any(f.get(k) for k in ("Service", "ServiceSubset", "Namespace", "Datacenters"))
        ):
            raise fail(
                p, "one of Service, ServiceSubset, Namespace, Datacenters or Targets is required"
            )
        same_service = not f.get("Service") or f["Service"] == e["Name"]
        if f.get("ServiceSubset") and same_service and f["ServiceSubset"] not in subsets:
            raise fail(f"{p}.ServiceSubset", f'"{f["ServiceSubset"]}" is not one of the Subsets')
        for i, dc in enumerate(f.get("Datacenters", [])):
            if not dc:
                raise fail(f"{p}.Datacenters[{i}]", "must not be empty")
        for i, t in enumerate(f.get("Targets", [])):
            if not any(t.get(k) for k in ("Service", "ServiceSubset", "Namespace", "Datacenter")):
                raise fail(f"{p}.Targets[{i}]", "is empty")
    _validate_load_balancer(e.get("LoadBalancer"))


def _validate_load_balancer(lb: dict | None) -> None:
    if not lb:
        return
    policy = lb.get("Policy", "")
    if lb.get("RingHashConfig") and policy != "ring_hash":
        raise fail("LoadBalancer.RingHashConfig", f'needs Policy "ring_hash", got "{policy}"')
    ring = lb.get("RingHashConfig", {})
    if (
        ring.get("MinimumRingSize")
        and ring.get("MaximumRingSize")
        and ring["MinimumRingSize"] > ring["MaximumRingSize"]
    ):
        raise fail("LoadBalancer.RingHashConfig", "MinimumRingSize is more than MaximumRingSize")
    if lb.get("LeastRequestConfig") and policy != "least_request":
        raise fail(
            "LoadBalancer.LeastRequestConfig", f'needs Policy "least_request", got "{policy}"'
        )
    if lb.get("HashPolicies") and policy not in ("ring_hash", "maglev"):
        raise fail(
            "LoadBalancer.HashPolicies", f'need Policy "ring_hash" or "maglev", got "{policy}"'
        )
    for i, hp in enumerate(lb.get("HashPolicies", [])):
        p = f"LoadBalancer.HashPolicies[{i}]"
        if hp.get("SourceIP") and (hp.get("Field") or hp.get("FieldValue")):
            raise fail(p, "SourceIP cannot be combined with Field or FieldValue")
        if not hp.get("SourceIP") and not hp.get("Field"):
            raise fail(p, "one of Field or SourceIP is required")
        if hp.get("Field") and not hp.get("FieldValue"):
            raise fail(f"{p}.FieldValue", f'is required with Field "{hp["Field"]}"')
        cookie = hp.get("CookieConfig")
        if cookie:
            if hp.get("Field") != "cookie":
                raise fail(f"{p}.CookieConfig", 'needs Field "cookie"')
            if cookie.get("Session") and cookie.get("TTL") not in (None, "0s"):
                raise fail(f"{p}.CookieConfig", "Session and TTL cannot both be set")


def _validate_service_intentions(e: dict) -> None:
    """Only the shape is checked here: what makes an intention valid (actions,
    permissions, names, duplicates) is `meshproto.intentions`' rule, applied
    when the entry's sources are stored as intentions."""


def _validate_mesh(e: dict) -> None:
    order = {v: i for i, v in enumerate(TLS_VERSIONS)}
    for direction in ("Incoming", "Outgoing"):
        tls = e.get("TLS", {}).get(direction, {})
        lo, hi = tls.get("TLSMinVersion", ""), tls.get("TLSMaxVersion", "")
        if lo not in ("", "TLS_AUTO") and hi not in ("", "TLS_AUTO") and order[lo] > order[hi]:
            raise fail(f"TLS.{direction}", f"TLSMinVersion {lo} is above TLSMaxVersion {hi}")


_PEER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _validate_exported_services(e: dict) -> None:
    """Each service once, named (or `*`), in the default namespace, with at
    least one consumer, and each consumer a peer (partitions and sameness
    groups are not served: one partition per control plane)."""
    seen: set[str] = set()
    for i, svc in enumerate(e.get("Services", [])):
        p = f"Services[{i}]"
        name = svc.get("Name", "")
        if not name:
            raise fail(f"{p}.Name", "is required")
        if name != "*" and (len(name) > 256 or "/" in name or any(c.isspace() for c in name)):
            raise fail(f"{p}.Name", f"invalid service name {name!r}")
        if svc.get("Namespace", "") not in ("", DEFAULT_NAMESPACE, "*"):
            raise fail(f"{p}.Namespace", f'only "{DEFAULT_NAMESPACE}" is supported')
        svc.pop("Namespace", None)
        if name in seen:
            raise fail(f"{p}.Name", f'service "{name}" is listed more than once')
        seen.add(name)
        consumers = svc.get("Consumers") or []
        if not consumers:
            raise fail(f"{p}.Consumers", f'service "{name}" must have at least one consumer')
        peers: set[str] = set()
        for j, c in enumerate(consumers):
            cp = f"{p}.Consumers[{j}]"
            if c.get("Partition") or c.get("SamenessGroup"):
                raise fail(cp, "only Peer consumers are supported (one partition per cluster)")
            peer = c.get("Peer", "")
            if not peer:
                raise fail(f"{cp}.Peer", "is required")
            if not _PEER_NAME.match(peer):
                raise fail(f"{cp}.Peer", f"invalid peer name {peer!r}")
            if peer in peers:
                raise fail(f"{cp}.Peer", f'peer "{peer}" is listed more than once')
            peers.add(peer)


def exported_to(entry: dict | None, peer: str) -> tuple[bool, set[str]]:
    """(all services?, the names) an exported-services entry exports to `peer`."""
    names: set[str] = set()
    everything = False
    for svc in (entry or {}).get("Services", []):
        if any(c.get("Peer") == peer for c in svc.get("Consumers", [])):
            if svc.get("Name") == "*":
                everything = True
            else:
                names.add(svc["Name"])
    return everything, names


_VALIDATORS: dict[str, Callable[[dict], None]] = {
    "proxy-defaults": _validate_proxy_defaults,
    "service-defaults": _validate_service_defaults,
    "service-router": _validate_service_router,
    "service-splitter": _validate_service_splitter,
    "service-resolver": _validate_service_resolver,
    "service-intentions": _validate_service_intentions,
    "mesh": _validate_mesh,
    "exported-services": _validate_exported_services,
}


# --------------------------------------------------------------------------- cross-entry rules

Entries = Mapping[str, Mapping[str, dict]]  # kind -> name -> canonical entry


def protocol_of(service: str, entries: Entries) -> tuple[str, str]:
    """(protocol, where it came from) for `service`: its service-defaults
    `Protocol`, else proxy-defaults `Config.protocol`, else "tcp"."""
    sd = entries.get("service-defaults", {}).get(service)
    if sd and sd.get("Protocol"):
        return sd["Protocol"].lower(), f'service-defaults "{service}"'
    pd = entries.get("proxy-defaults", {}).get(PROXY_DEFAULTS_NAME)
    proto = (pd or {}).get("Config", {}).get("protocol")
    if isinstance(proto, str) and proto:
        return proto.lower(), f'proxy-defaults "{PROXY_DEFAULTS_NAME}"'
    return "tcp", "the default (no service-defaults or proxy-defaults sets one)"


def validate_graph(entries: Entries, datacenter: str = "dc1") -> None:
    """Refuse a set of entries that cannot form valid discovery chains.

    Called with the state a write would produce: every router and splitter
    needs an HTTP-family protocol; every chain must compile (subsets named by
    routes, splits, redirects and failovers exist once the target's resolver
    exists; one protocol per chain; no redirect or split loops).
    """
    from meshproto.discovery_chain import ChainError, compile_chain

    for kind in ("service-router", "service-splitter"):
        for name in sorted(entries.get(kind, {})):
            proto, source = protocol_of(name, entries)
            if proto not in HTTP_PROTOCOLS:
                raise ConfigEntryError(
                    f'{kind} "{name}" needs an HTTP-family protocol (http, http2 or grpc), '
                    f'but service "{name}" has protocol "{proto}" from {source}'
                )
    names: set[str] = set()
    for kind in ("service-router", "service-splitter", "service-resolver", "service-defaults"):
        names.update(entries.get(kind, {}))
    for name in sorted(names):
        try:
            compile_chain(name, datacenter, entries, trust_domain="validate.mesh", lenient=True)
        except ChainError as exc:
            raise ConfigEntryError(str(exc)) from None


def subset_references(service: str, entries: Entries) -> list[str]:
    """Which entries name a subset of `service` (routes, splits, redirects, failovers)."""
    found: list[str] = []
    for name, router in entries.get("service-router", {}).items():
        for i, route in enumerate(router.get("Routes", [])):
            dest = route.get("Destination", {})
            if (dest.get("Service") or name) == service and dest.get("ServiceSubset"):
                found.append(f'service-router "{name}" Routes[{i}]')
    for name, splitter in entries.get("service-splitter", {}).items():
        for i, split in enumerate(splitter.get("Splits", [])):
            if (split.get("Service") or name) == service and split.get("ServiceSubset"):
                found.append(f'service-splitter "{name}" Splits[{i}]')
    for name, resolver in entries.get("service-resolver", {}).items():
        if name == service:
            continue
        r = resolver.get("Redirect") or {}
        if r.get("Service") == service and r.get("ServiceSubset"):
            found.append(f'service-resolver "{name}" Redirect')
        for key, f in resolver.get("Failover", {}).items():
            targets = f.get("Targets") or [f]
            for t in targets:
                if t.get("Service") == service and t.get("ServiceSubset"):
                    found.append(f'service-resolver "{name}" Failover.{key}')
    return found
