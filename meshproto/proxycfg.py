"""The compiled proxy configuration: what one sidecar enforces.

The control plane builds it (`registry.domain.proxycfg`), serves it at
`/api/services/<name>/proxy-config` and pushes it to agents over the gRPC
config stream; the agent's sidecar applies it. One schema, defined once here,
as frozen dataclasses with a JSON form (`to_json` / `from_json`).

A sidecar sees:
- `inbound`: where it listens for mTLS from other sidecars and where the
  local app is; the `intentions` that authorise callers (plus `default_allow`);
- `upstreams`: one local listener per upstream, each routing (L7 routes and
  weighted splits for HTTP) to `clusters`: resolved targets with their healthy
  endpoints, the SPIFFE ID their sidecars must present, and how to reach them
  (directly, or through a mesh gateway with an SNI);
- `roots`: the CA roots (PEM) to verify peers with;
- `peer_trust`: peered clusters' roots, each trusted only for certificates
  naming a SPIFFE ID of that cluster's trust domain.
Its own leaf certificate is not in it: the agent makes that key on the host.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

SCHEMA_VERSION = 1

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """One healthy instance of a target, reached at its sidecar's address."""

    address: str
    port: int
    node: str = ""
    service_id: str = ""
    weight: int = 1
    # "passing" or "warning"; critical instances are never sent.
    health: str = "passing"


@dataclass(frozen=True)
class Gateway:
    """Reach a target through a mesh gateway: connect here, send `sni`."""

    address: str
    port: int


@dataclass(frozen=True)
class Limits:
    max_connections: int = 0  # 0: unlimited
    max_pending_requests: int = 0
    max_concurrent_requests: int = 0


@dataclass(frozen=True)
class OutlierDetection:
    """Passive health checking: eject an endpoint after consecutive failures."""

    interval_s: float = 10.0
    max_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_percent: int = 10
    # The chance (percent) that an endpoint reaching `max_failures` consecutive
    # 5xx / gateway errors is actually ejected (Envoy's enforcing_consecutive_5xx).
    enforcing_consecutive_5xx: int = 100


@dataclass(frozen=True)
class HashPolicy:
    """What a ring_hash / maglev cluster hashes to pick an endpoint (sticky sessions).

    `field` is header | cookie | query_parameter (named by `field_value`), or
    `source_ip` is set; policies are tried in order, and a `terminal` one that
    yields a value stops the search."""

    field: str = ""
    field_value: str = ""
    source_ip: bool = False
    terminal: bool = False


@dataclass(frozen=True)
class Cluster:
    """A resolved target of a discovery chain (`api.default.dc1`, a subset, a failover)."""

    name: str
    service: str
    datacenter: str
    spiffe_id: str  # what the destination's sidecar must present
    sni: str
    endpoints: tuple[Endpoint, ...] = ()
    namespace: str = "default"
    subset: str = ""
    connect_timeout_s: float = 5.0
    lb_policy: str = "round_robin"  # round_robin | least_request | random | ring_hash | maglev
    gateway: Gateway | None = None
    failover: tuple[str, ...] = ()  # names of clusters to use when this one has no endpoints
    limits: Limits = field(default_factory=Limits)
    outlier: OutlierDetection | None = None
    hash_policies: tuple[HashPolicy, ...] = ()
    request_timeout_s: float = 0.0  # the resolver's RequestTimeout (0: none)
    # Set for a service imported from a peered cluster: its `spiffe_id` is in
    # that peer's trust domain, verified against the peer's roots only.
    peer: str = ""


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    present: bool = False
    exact: str = ""
    prefix: str = ""
    suffix: str = ""
    regex: str = ""
    invert: bool = False


@dataclass(frozen=True)
class RouteMatch:
    path_exact: str = ""
    path_prefix: str = ""
    path_regex: str = ""
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[tuple[str, str], ...] = ()  # (name, exact value); "" value: present


@dataclass(frozen=True)
class WeightedCluster:
    cluster: str
    weight: float  # percent; a route's splits add up to 100
    request_headers_set: tuple[tuple[str, str], ...] = ()
    request_headers_remove: tuple[str, ...] = ()
    response_headers_set: tuple[tuple[str, str], ...] = ()
    response_headers_remove: tuple[str, ...] = ()


# What `RetryPolicy.retry_on` may name (Envoy's retry conditions, HTTP and gRPC).
RETRY_ON = (
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)


@dataclass(frozen=True)
class RetryPolicy:
    num_retries: int = 0
    on_connect_failure: bool = False
    on_status_codes: tuple[int, ...] = ()
    retry_on: tuple[str, ...] = ()  # names from RETRY_ON
    per_try_timeout_s: float = 0.0  # 0: only the route's timeout
    # Non-idempotent methods (POST, PATCH, ...) are retried only when set (a
    # connect failure, where nothing was sent, is always retriable).
    retry_non_idempotent: bool = False
    backoff_base_s: float = 0.025
    backoff_max_s: float = 0.25
    # The retry budget (Linkerd's): retries may be at most `budget_percent` of
    # the requests of the last `budget_window_s`, plus `budget_min_per_s`.
    budget_percent: float = 20.0
    budget_min_per_s: float = 10.0
    budget_window_s: float = 10.0


@dataclass(frozen=True)
class FaultInjection:
    """Resilience testing on a route: delay and/or abort a share of requests."""

    delay_s: float = 0.0
    delay_percent: float = 0.0
    abort_status: int = 0  # HTTP status answered (gRPC: mapped to a grpc-status)
    abort_percent: float = 0.0


@dataclass(frozen=True)
class Route:
    """First matching route wins; its splits pick a cluster by weight."""

    match: RouteMatch
    splits: tuple[WeightedCluster, ...]
    prefix_rewrite: str = ""
    timeout_s: float = 0.0  # 0: no request timeout
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    request_headers_set: tuple[tuple[str, str], ...] = ()
    request_headers_remove: tuple[str, ...] = ()
    response_headers_set: tuple[tuple[str, str], ...] = ()
    response_headers_remove: tuple[str, ...] = ()
    name: str = ""  # for metrics and logs ("" : its index)
    fault: FaultInjection | None = None
    request_headers_add: tuple[tuple[str, str], ...] = ()  # appended, not replaced
    response_headers_add: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Upstream:
    """One local listener of the sidecar and where its traffic goes."""

    destination: str
    local_bind_address: str
    local_bind_port: int
    protocol: str = "tcp"  # tcp | http | http2 | grpc
    datacenter: str = ""
    namespace: str = "default"
    peer: str = ""  # `DestinationPeer`: the service is imported from that peering
    # TCP: the single cluster; HTTP: the routes (the last one catches all).
    routes: tuple[Route, ...] = ()
    clusters: tuple[Cluster, ...] = ()


@dataclass(frozen=True)
class RateLimit:
    requests_per_second: float = 0.0  # 0: no limit
    burst: int = 0


@dataclass(frozen=True)
class RouteRateLimit:
    """A rate limit for the inbound requests whose path matches (service-defaults
    `RateLimits.Routes`); checked before the instance-level one."""

    requests_per_second: float
    burst: int = 0
    path_exact: str = ""
    path_prefix: str = ""
    path_regex: str = ""


@dataclass(frozen=True)
class Inbound:
    bind_address: str
    port: int
    local_app_address: str = "127.0.0.1"
    local_app_port: int = 0
    protocol: str = "tcp"
    rate_limit: RateLimit = field(default_factory=RateLimit)
    limits: Limits = field(default_factory=Limits)
    route_rate_limits: tuple[RouteRateLimit, ...] = ()
    request_timeout_s: float = 0.0  # to the local app (0: none)
    idle_timeout_s: float = 300.0  # a keep-alive connection idle this long is closed


@dataclass(frozen=True)
class PeerTrust:
    """A peered cluster's CA roots, trusted for SPIFFE IDs of its trust domain only."""

    peer: str
    trust_domain: str
    roots: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProxyConfig:
    """Everything one sidecar enforces, at one version."""

    version: int  # the control plane's index when it was compiled
    proxy_id: str  # the sidecar's service ID (`web-sidecar-proxy`)
    service: str  # the service it fronts (`web`)
    service_id: str
    node: str
    datacenter: str
    trust_domain: str
    spiffe_id: str  # this service's identity
    inbound: Inbound
    upstreams: tuple[Upstream, ...] = ()
    # Intentions whose destination is this service (or `*`), Consul's JSON shape.
    intentions: tuple[dict, ...] = ()
    default_allow: bool = False
    roots: tuple[str, ...] = ()  # PEM, active root first
    namespace: str = "default"
    # Peers whose services this sidecar calls or is exported to.
    peer_trust: tuple[PeerTrust, ...] = ()
    schema: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return _dump(self)

    def dumps(self) -> bytes:
        """The JSON the stream sends: `json.dumps(to_json(), sort_keys=True)`,
        compact, byte for byte. The control plane shares one Upstream object
        among the sidecars a change reaches (its endpoints are most of a
        config): its JSON text is encoded once, kept on the frozen object,
        and spliced in, so a fan-out encodes each cluster once, not once per
        sidecar."""
        parts = []
        for name in _CONFIG_KEYS:
            if name == "upstreams":
                text = "[" + ",".join(_encoded_once(u) for u in self.upstreams) + "]"
            else:
                text = _encode(_dump(getattr(self, name)))
            parts.append(f'"{name}":{text}')
        return ("{" + ",".join(parts) + "}").encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProxyConfig:
        """Rebuild from JSON; raises ValueError on anything malformed."""
        if not isinstance(data, dict):
            raise ValueError("proxy config must be a JSON object")
        if data.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"unsupported proxy config schema {data.get('schema')!r}")
        return _load(cls, data, "config")

    @classmethod
    def loads(cls, raw: bytes | str) -> ProxyConfig:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"proxy config is not JSON: {exc}") from None
        return cls.from_json(data)


_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}  # None: not a dataclass


_encode = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
# ProxyConfig's field names in JSON order (`sort_keys`); plain identifiers, so
# they need no escaping.
_CONFIG_KEYS = tuple(sorted(f.name for f in dataclasses.fields(ProxyConfig)))


def _encoded_once(value: Any) -> str:
    cached = value.__dict__.get("_encoded")
    if cached is None:
        cached = _encode(_dump(value))
        object.__setattr__(value, "_encoded", cached)  # a cache on a frozen value, not a field
    return cached


def _dump(value: Any) -> Any:
    # Hot: a config with large clusters has thousands of fields, and the control
    # plane dumps one per sidecar a change reaches. Field names are kept per class.
    cls = type(value)
    try:
        names = _FIELD_NAMES[cls]
    except KeyError:
        names = _FIELD_NAMES[cls] = (
            tuple(f.name for f in dataclasses.fields(value))
            if dataclasses.is_dataclass(value)
            else None
        )
    if names is not None:
        return {name: _dump(getattr(value, name)) for name in names}
    if isinstance(value, tuple | list):
        return [_dump(v) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _load(tp: Any, value: Any, path: str) -> Any:
    """Strictly rebuild `value` as type `tp` (dataclasses, tuples, unions, scalars)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected an object")
        hints = _hints(tp)
        known = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}")
        kwargs = {k: _load(hints[k], v, f"{path}.{k}") for k, v in value.items()}
        try:
            return tp(**kwargs)
        except TypeError as exc:
            raise ValueError(f"{path}: {exc}") from None
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_load(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{path}: expected {len(args)} items")
        return tuple(
            _load(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _load(a, value, path)
            except ValueError:
                continue
        raise ValueError(f"{path}: unexpected value {value!r}")
    if tp is Any or tp is dict:
        if tp is dict and not isinstance(value, dict):
            raise ValueError(f"{path}: expected an object")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: expected an integer")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ValueError(f"{path}: expected {tp.__name__}")
        return value
    raise ValueError(f"{path}: unsupported type {tp!r}")
