"""The compiled proxy configuration: what one sidecar enforces, built in two stages.

As Consul's proxycfg does, compilation is split in two:

1. **gather** (`gather`, database reads only): everything one sidecar's
   config depends on is read into an immutable `ProxySnapshot` — the proxy
   instance and the service instance it fronts, the trust domain and the CA
   roots (active first), the intentions whose destination is the service or
   `*` (Consul's JSON), the `mesh` entry's `AllowByDefault`, the config
   entries (`config_entries.snapshot`, the same gather the discovery-chain
   endpoint uses), for each upstream its compiled discovery chain and, for
   each chain target, the candidate instances (the target's sidecars and
   Connect-native instances in the target's datacenter, with their checks,
   in Consul's `CheckServiceNode` JSON), and the mesh gateways of the
   datacenters that matter;
2. **translate** (`build_proxy_config` and the functions it calls, PURE: no
   database, no clock): the snapshot becomes a `meshproto.proxycfg.ProxyConfig`.
   Health, subset filters (`Filter`, `OnlyPassing`), weights, addresses,
   gateway choice, routes, splits and cluster settings are decided here, so
   they are tested against golden files (tests/golden/proxycfg/).

`compile_proxy(node, proxy_id)` runs both and also returns the change-hub
topics the result depends on (`dependency_topics`); the config's `version`
is the highest index of those topics, so a change to anything the config
was built from yields a higher version.

One write can wake a thousand sidecars at once, so `gather` shares what they
read alike (roots, entries, a service's intentions, an upstream's chain and
instances) for one value of the global index (`_SharedReads`), and keeps
each proxy's own rows while its node's topic is unchanged (`_proxy_rows`).

Choices worth knowing (see docs/proxy-config.md):
* an endpoint is healthy when neither its sidecar's checks (node checks
  included) nor the checks of the service instance it fronts are critical
  (maintenance is a critical check). The fronted instance's checks count
  directly, not only through the sidecar's alias check, because alias checks
  are evaluated where the node's checks run and a sidecar must drop an
  unhealthy app at once;
* a target in another datacenter is reached through a mesh gateway when one
  is registered (healthy) there — or, with `MeshGateway.Mode = "local"`, in
  the local datacenter — unless the mode is `"none"`. Its endpoints are then
  the gateway's addresses (as Consul's Envoy clusters): the sidecar dials
  them, sends the cluster's SNI, and still checks the destination's SPIFFE ID
  (the gateway passes TLS through). `gateway` names the first of them;
* limits, passive health checks and connect timeouts of upstream clusters
  come from the upstream registration's `Config`, else the service's
  `service-defaults` `UpstreamConfig.Overrides` entry for the destination,
  else its `UpstreamConfig.Defaults` (Consul's precedence).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Q

from meshproto import config_entries as pure_entries
from meshproto import discovery_chain as chains
from meshproto import spiffe
from meshproto.gatewaycfg import LOCAL, GatewayConfig, GatewayRoute, RemoteDatacenter
from meshproto.proxycfg import (
    RETRY_ON,
    Cluster,
    Endpoint,
    FaultInjection,
    Gateway,
    HashPolicy,
    HeaderMatch,
    Inbound,
    Limits,
    OutlierDetection,
    PeerTrust,
    ProxyConfig,
    RateLimit,
    RetryPolicy,
    Route,
    RouteMatch,
    RouteRateLimit,
    Upstream,
    WeightedCluster,
)
from registry import topics as topic
from registry.acl_rules import Authorizer
from registry.filtering import FilterError, compile_filter

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = pure_entries.DEFAULT_NAMESPACE
MESH_GATEWAY = "mesh-gateway"
HTTP_PROTOCOLS = pure_entries.HTTP_PROTOCOLS
INBOUND_BIND_DEFAULT = "0.0.0.0"
LOCAL_BIND_DEFAULT = "127.0.0.1"
LOCAL_APP_DEFAULT = "127.0.0.1"
PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
_STATUS_ORDER = {PASSING: 0, WARNING: 1, CRITICAL: 2}

# Topics every compiled config depends on, whatever its service and upstreams:
# the CA roots, the `mesh` entry (AllowByDefault) and the wildcard-destination
# intentions. Config entries are added one by one as the compile reads them
# (`EntryReads`), intentions by destination (`intentions_for`).
BASE_TOPICS = frozenset(
    {
        topic.CA_ROOTS,
        topic.config_entry("mesh", "mesh"),
        topic.intentions_for(topic.WILDCARD),
    }
)


class _KindReads(Mapping[str, Mapping[str, Any]]):
    """The entries of one kind, noting each name looked up (found or not)."""

    __slots__ = ("_kind", "_entries", "_log")

    def __init__(self, kind: str, entries: Mapping[str, Mapping[str, Any]], log: EntryReads):
        self._kind, self._entries, self._log = kind, entries, log

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        self._log.names.add((self._kind, name))
        return self._entries[name]

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        self._log.names.add((self._kind, name))
        return self._entries.get(name, default)

    def __contains__(self, name: object) -> bool:
        self._log.names.add((self._kind, str(name)))
        return name in self._entries

    def __iter__(self):
        self._log.kinds.add(self._kind)  # a walk over the kind depends on all of it
        return iter(self._entries)

    def __len__(self) -> int:
        self._log.kinds.add(self._kind)
        return len(self._entries)


class EntryReads(Mapping[str, Mapping[str, Mapping[str, Any]]]):
    """Config entries (kind -> name -> data) that remember what a compile read.

    `gather` hands this to the chain compiler and the translation; afterwards
    `names` holds every (kind, name) looked up — a lookup that found nothing
    counts too, since creating that entry would change the result — and
    `kinds` every kind walked whole. `dependency_topics` turns them into
    `config:<kind>:<name>` (or `config:<kind>`) topics, so a config entry write
    recompiles only the proxies that read that entry.
    """

    def __init__(self, entries: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        self._entries = entries
        self.data = entries  # what it wraps
        self.names: set[tuple[str, str]] = set()
        self.kinds: set[str] = set()

    def __getitem__(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        return _KindReads(kind, self._entries.get(kind) or {}, self)

    def get(self, kind: str, default: Any = None) -> Any:  # type: ignore[override]
        # An absent kind still answers (and notes) lookups: a later entry of it matters.
        return self[kind]

    def __contains__(self, kind: object) -> bool:
        return kind in self._entries

    def __iter__(self):
        self.kinds.update(self._entries)
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def topics(self) -> set[str]:
        out = {topic.config_entry(kind, name) for kind, name in self.names}
        out.update(topic.config_kind(kind) for kind in self.kinds)
        return out


# =========================================================================== snapshot


@dataclass(frozen=True)
class Candidate:
    """One instance that may serve a target: a sidecar (or a Connect-native
    service), or a mesh gateway.

    `entry` is Consul's `CheckServiceNode` JSON of the instance (`Node`,
    `Service`, `Checks`: what a resolver subset's `Filter` sees, as on
    `/v1/health/connect`); `destination_checks` are the checks of the service
    instance a sidecar fronts (on the same node), whose health counts too.
    """

    entry: Mapping[str, Any]
    destination_checks: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class UpstreamSnapshot:
    """One `Proxy.Upstreams` entry and what was gathered for it."""

    upstream: Mapping[str, Any]  # the registration's upstream, Consul's field names
    settings: Mapping[str, Any]  # `upstream_settings`: merged UpstreamConfig fields
    chain: Mapping[str, Any] | None  # the compiled chain; None if it did not compile
    instances: Mapping[str, tuple[Candidate, ...]] = field(default_factory=dict)  # by target ID
    error: str = ""  # why the chain did not compile
    # Translations of this upstream, by (datacenter, trust domain): `gather`
    # shares one UpstreamSnapshot among the proxies of a generation, so they
    # share its translation too (a cache, not data: left out of ==).
    translated: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ProxySnapshot:
    """Everything one sidecar's config is translated from, read at one moment."""

    datacenter: str  # the proxy's datacenter
    trust_domain: str
    node: Mapping[str, Any]  # the proxy's node, Consul's JSON
    proxy: Mapping[str, Any]  # the proxy instance, `/v1/agent/service` JSON
    destination: Mapping[str, Any] | None  # the instance it fronts, if registered on the node
    roots: tuple[str, ...]  # PEM, active first
    intentions: tuple[Mapping[str, Any], ...]  # destination = the service or `*`, Consul's JSON
    allow_by_default: bool
    entries: Mapping[str, Mapping[str, Mapping[str, Any]]]  # kind -> name -> data
    upstreams: tuple[UpstreamSnapshot, ...] = ()
    gateways: Mapping[str, tuple[Candidate, ...]] = field(default_factory=dict)  # by datacenter
    version: int = 0
    # Cluster peering (`gather_peering`): (peer, service) -> how to reach an
    # imported service, and the peers' trust (peer, trust domain, roots).
    peered: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    peer_trust: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @property
    def service(self) -> str:
        return (self.proxy.get("Proxy") or {}).get("DestinationServiceName") or ""

    @property
    def namespace(self) -> str:
        return self.proxy.get("Namespace") or DEFAULT_NAMESPACE


# =========================================================================== translate (pure)


def build_proxy_config(snap: ProxySnapshot) -> ProxyConfig:
    """The sidecar's config from a snapshot (pure)."""
    service = snap.service
    return ProxyConfig(
        version=snap.version,
        proxy_id=snap.proxy["ID"],
        service=service,
        service_id=(snap.proxy.get("Proxy") or {}).get("DestinationServiceID") or "",
        node=snap.node["Node"],
        datacenter=snap.datacenter,
        trust_domain=snap.trust_domain,
        spiffe_id=spiffe.service_id(
            snap.trust_domain, service, snap.datacenter, snap.namespace
        ).uri,
        inbound=translate_inbound(snap),
        upstreams=tuple(_translate_shared(snap, u) for u in snap.upstreams)
        + translate_peer_upstreams(snap),
        intentions=tuple(dict(i) for i in snap.intentions),
        default_allow=snap.allow_by_default,
        roots=snap.roots,
        namespace=snap.namespace,
        peer_trust=tuple(PeerTrust(p, td, roots) for p, td, roots in snap.peer_trust),
    )


def _entry(entries: Mapping, kind: str, name: str) -> Mapping[str, Any]:
    return entries.get(kind, {}).get(name) or {}


def _fold_get(data: Mapping[str, Any] | None, name: str, default: Any = None) -> Any:
    """`data[name]` with Consul's key folding (case, `_` and `-` ignored)."""
    if not data:
        return default
    if name in data:
        return data[name]
    want = pure_entries.fold(name)
    for key, value in data.items():
        if pure_entries.fold(str(key)) == want:
            return value
    return default


def service_protocol(snap: ProxySnapshot) -> str:
    """The fronted service's protocol: the proxy registration's `Config.protocol`,
    else service-defaults, else proxy-defaults, else tcp."""
    proxy_cfg = (snap.proxy.get("Proxy") or {}).get("Config") or {}
    declared = str(_fold_get(proxy_cfg, "protocol", "") or "").lower()
    if declared in pure_entries.PROTOCOLS:
        return declared
    return pure_entries.protocol_of(snap.service, snap.entries)[0]  # type: ignore[arg-type]


def translate_inbound(snap: ProxySnapshot) -> Inbound:
    """Where the sidecar listens for mTLS and where the local app is, with the
    service's inbound rate limit and connection limit (its service-defaults)."""
    proxy = snap.proxy
    p = proxy.get("Proxy") or {}
    local_port = p.get("LocalServicePort") or (snap.destination or {}).get("Port") or 0
    sd = _entry(snap.entries, "service-defaults", snap.service)
    instance = (sd.get("RateLimits") or {}).get("InstanceLevel") or {}
    return Inbound(
        bind_address=proxy.get("Address") or INBOUND_BIND_DEFAULT,
        port=int(proxy.get("Port") or 0),
        local_app_address=p.get("LocalServiceAddress") or LOCAL_APP_DEFAULT,
        local_app_port=int(local_port),
        protocol=service_protocol(snap),
        rate_limit=RateLimit(
            requests_per_second=float(instance.get("RequestsPerSecond") or 0),
            burst=int(instance.get("RequestsMaxBurst") or 0),
        ),
        limits=Limits(max_connections=int(sd.get("MaxInboundConnections") or 0)),
        route_rate_limits=tuple(
            RouteRateLimit(
                requests_per_second=float(r.get("RequestsPerSecond") or 0),
                burst=int(r.get("RequestsMaxBurst") or 0),
                path_exact=r.get("PathExact") or "",
                path_prefix=r.get("PathPrefix") or "",
                path_regex=r.get("PathRegex") or "",
            )
            for r in instance.get("Routes") or ()
            if r.get("RequestsPerSecond")
        ),
        request_timeout_s=int(sd.get("LocalRequestTimeoutMs") or 0) / 1000.0,
    )


# --------------------------------------------------------------------------- upstream settings

_UPSTREAM_FIELDS = pure_entries.UPSTREAM_CONFIG.fields["Defaults"]
_UPSTREAM_FOLDS = {pure_entries.fold(k) for k in _UPSTREAM_FIELDS.fields}  # type: ignore[union-attr]


def _registration_config(raw: Any) -> dict[str, Any]:
    """The known fields of an upstream registration's opaque `Config`
    (`connect_timeout_ms`, `limits`, `passive_health_check`, `protocol`, ...),
    decoded as service-defaults' UpstreamConfig fields. Unknown keys (other
    proxies' settings) are ignored; a malformed known field is dropped."""
    if not isinstance(raw, Mapping):
        return {}
    known = {k: v for k, v in raw.items() if pure_entries.fold(str(k)) in _UPSTREAM_FOLDS}
    out: dict[str, Any] = {}
    for key, value in known.items():
        try:
            out.update(_UPSTREAM_FIELDS({key: value}))  # type: ignore[operator]
        except pure_entries.ConfigEntryError as exc:
            log.warning("ignoring upstream Config field %s: %s", key, exc)
    return out


def upstream_settings(
    service: str, upstream: Mapping[str, Any], proxy: Mapping[str, Any], entries: Mapping
) -> dict[str, Any]:
    """An upstream's settings with Consul's precedence: the registration's
    `Config`, then the service's service-defaults `UpstreamConfig.Overrides`
    entry for the destination, then `UpstreamConfig.Defaults`. `MeshGateway`
    comes from the upstream, else the proxy registration (else the chain's)."""
    uc = _entry(entries, "service-defaults", service).get("UpstreamConfig") or {}
    dest = upstream.get("DestinationName", "")
    ns = upstream.get("DestinationNamespace") or DEFAULT_NAMESPACE
    merged: dict[str, Any] = dict(uc.get("Defaults") or {})
    for override in uc.get("Overrides") or ():
        if override.get("Name") == dest and (override.get("Namespace") or ns) == ns:
            merged.update({k: v for k, v in override.items() if k not in ("Name", "Namespace")})
            break
    merged.update(_registration_config(upstream.get("Config")))
    mode = (upstream.get("MeshGateway") or {}).get("Mode") or (
        (proxy.get("Proxy") or {}).get("MeshGateway") or {}
    ).get("Mode")
    if mode:
        merged["MeshGateway"] = {"Mode": mode}
    return merged


def chain_overrides(settings: Mapping[str, Any]) -> dict[str, Any]:
    """What an upstream's settings override when its chain is compiled (as
    Consul passes an upstream's protocol and connect timeout to the compiler)."""
    out: dict[str, Any] = {}
    if settings.get("Protocol"):
        out["override_protocol"] = settings["Protocol"]
    if settings.get("ConnectTimeoutMs"):
        out["override_connect_timeout"] = f"{int(settings['ConnectTimeoutMs'])}ms"
    if (settings.get("MeshGateway") or {}).get("Mode"):
        out["override_mesh_gateway"] = dict(settings["MeshGateway"])
    return out


def _limits(settings: Mapping[str, Any]) -> Limits:
    lim = settings.get("Limits") or {}
    return Limits(
        max_connections=int(lim.get("MaxConnections") or 0),
        max_pending_requests=int(lim.get("MaxPendingRequests") or 0),
        max_concurrent_requests=int(lim.get("MaxConcurrentRequests") or 0),
    )


def _outlier(settings: Mapping[str, Any]) -> OutlierDetection | None:
    phc = settings.get("PassiveHealthCheck")
    if not phc:
        return None
    default = OutlierDetection()
    return OutlierDetection(
        interval_s=pure_entries.duration_seconds(phc.get("Interval")) or default.interval_s,
        max_failures=int(phc.get("MaxFailures") or default.max_failures),
        base_ejection_s=pure_entries.duration_seconds(phc.get("BaseEjectionTime"))
        or default.base_ejection_s,
        max_ejection_percent=int(phc.get("MaxEjectionPercent") or default.max_ejection_percent),
        enforcing_consecutive_5xx=int(
            phc["EnforcingConsecutive5xx"]
            if phc.get("EnforcingConsecutive5xx") is not None
            else default.enforcing_consecutive_5xx
        ),
    )


# --------------------------------------------------------------------------- endpoints


def candidate_status(c: Candidate) -> str:
    """passing / warning / critical: the worst of the instance's checks and
    the checks of the instance it fronts (no checks: passing)."""
    worst = PASSING
    for check in (*c.entry.get("Checks", ()), *c.destination_checks):
        status = check.get("Status", CRITICAL)
        if _STATUS_ORDER.get(status, 2) > _STATUS_ORDER[worst]:
            worst = status if status in _STATUS_ORDER else CRITICAL
    return worst


def best_address(entry: Mapping[str, Any], wan: bool) -> tuple[str, int]:
    """Consul's `CheckServiceNode.BestAddress`: the service's (WAN-tagged when
    `wan`) address and port, else the node's (WAN-tagged when `wan`) address."""
    svc = entry.get("Service") or {}
    addr, port = svc.get("Address") or "", int(svc.get("Port") or 0)
    if wan:
        tagged = (svc.get("TaggedAddresses") or {}).get("wan")
        if isinstance(tagged, Mapping) and tagged.get("Address"):
            addr = tagged["Address"]
            port = int(tagged.get("Port") or port)
    if not addr:
        node = entry.get("Node") or {}
        tagged_node = (node.get("TaggedAddresses") or {}).get("wan") if wan else None
        addr = tagged_node or node.get("Address") or ""
    return addr, port


def _weight(entry: Mapping[str, Any], status: str) -> int:
    weights = (entry.get("Service") or {}).get("Weights") or {}
    key = "Passing" if status == PASSING else "Warning"
    value = weights.get(key)
    return 1 if value is None else int(value)


def _endpoint(c: Candidate, status: str, wan: bool) -> Endpoint | None:
    weight = _weight(c.entry, status)
    addr, port = best_address(c.entry, wan)
    if weight <= 0 or not addr or not port:
        return None
    return Endpoint(
        address=addr,
        port=port,
        node=(c.entry.get("Node") or {}).get("Node", ""),
        service_id=(c.entry.get("Service") or {}).get("ID", ""),
        weight=weight,
        health=status,
    )


def select_endpoints(
    candidates: Iterable[Candidate], subset: Mapping[str, Any], *, wan: bool = False
) -> tuple[Endpoint, ...]:
    """The healthy candidates a target may use: not critical, passing only when
    the subset says `OnlyPassing`, matching the subset's `Filter` (Consul's
    filter language over the `CheckServiceNode` JSON), with a non-zero weight."""
    keep = None
    expression = (subset or {}).get("Filter") or ""
    if expression:
        try:
            keep = compile_filter(expression)
        except FilterError as exc:
            log.warning("subset filter %r does not compile: %s", expression, exc)
            return ()
    only_passing = bool((subset or {}).get("OnlyPassing"))
    out: list[Endpoint] = []
    for c in candidates:
        status = candidate_status(c)
        if status == CRITICAL or (only_passing and status != PASSING):
            continue
        if keep is not None:
            try:
                if not keep(c.entry):
                    continue
            except FilterError:
                continue  # a selector this instance's JSON cannot answer: not a match
        ep = _endpoint(c, status, wan)
        if ep is not None:
            out.append(ep)
    return tuple(out)


def gateway_datacenter(target: Mapping[str, Any], local_dc: str, gateways: Mapping) -> str:
    """Which datacenter's mesh gateway carries traffic to `target` ("" for none:
    direct). Only targets in another datacenter use one; mode `none` never,
    mode `local` the local datacenter's when it has one, otherwise the
    target datacenter's when it has one."""
    dc = target.get("Datacenter") or local_dc
    if dc == local_dc:
        return ""
    mode = (target.get("MeshGateway") or {}).get("Mode") or ""
    if mode == "none":
        return ""
    if mode == "local" and _healthy(gateways.get(local_dc, ())):
        return local_dc
    if _healthy(gateways.get(dc, ())):
        return dc
    return ""


def _healthy(candidates: Iterable[Candidate]) -> bool:
    return any(candidate_status(c) != CRITICAL for c in candidates)


# --------------------------------------------------------------------------- routes


def _duration(text: Any) -> float:
    return pure_entries.duration_seconds(text) if isinstance(text, str) else 0.0


def _route_match(http: Mapping[str, Any]) -> RouteMatch:
    """A router route's `Match.HTTP` (no path matcher: every path, prefix `/`)."""
    has_path = any(http.get(k) for k in ("PathExact", "PathPrefix", "PathRegex"))
    return RouteMatch(
        path_exact=http.get("PathExact") or "",
        path_prefix=http.get("PathPrefix") or ("" if has_path else "/"),
        path_regex=http.get("PathRegex") or "",
        methods=tuple(m.upper() for m in http.get("Methods") or ()),
        headers=tuple(
            HeaderMatch(
                name=h["Name"],
                present=bool(h.get("Present")),
                exact=h.get("Exact") or "",
                prefix=h.get("Prefix") or "",
                suffix=h.get("Suffix") or "",
                regex=h.get("Regex") or "",
                invert=bool(h.get("Invert")),
            )
            for h in http.get("Header") or ()
        ),
        query=tuple((q["Name"], q.get("Exact") or "") for q in http.get("QueryParam") or ()),
    )


def _unsupported_match(http: Mapping[str, Any]) -> str:
    """What a route matches on that the schema cannot carry ("" if nothing)."""
    for q in http.get("QueryParam") or ():
        if q.get("Regex"):
            return f"query parameter {q.get('Name')!r} by regex"
    return ""


def _splits(node: Mapping[str, Any], nodes: Mapping[str, Any]) -> tuple[WeightedCluster, ...]:
    if node.get("Type") == "resolver":
        return (WeightedCluster(node["Resolver"]["Target"], 100.0),)
    out = []
    for split in node.get("Splits") or ():
        nxt = nodes[split["NextNode"]]
        definition = split.get("Definition") or {}
        req_set, req_remove = _headers(definition.get("RequestHeaders"))
        resp_set, resp_remove = _headers(definition.get("ResponseHeaders"))
        out.append(
            WeightedCluster(
                nxt["Resolver"]["Target"],
                float(split["Weight"]),
                request_headers_set=req_set,
                request_headers_remove=req_remove,
                response_headers_set=resp_set,
                response_headers_remove=resp_remove,
            )
        )
    return tuple(out)


def _headers(mods: Mapping[str, Any] | None) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Consul's header modifiers as (set, remove); `Add` is applied as a set
    (see `_header_adds` for the routes, which keep `Add` apart)."""
    mods = mods or {}
    merged = {**(mods.get("Add") or {}), **(mods.get("Set") or {})}
    return tuple(merged.items()), tuple(mods.get("Remove") or ())


def _route_headers(mods: Mapping[str, Any] | None) -> tuple[tuple, tuple, tuple]:
    """A route's header modifiers as (add, set, remove): `Add` appends a value."""
    mods = mods or {}
    return (
        tuple((mods.get("Add") or {}).items()),
        tuple((mods.get("Set") or {}).items()),
        tuple(mods.get("Remove") or ()),
    )


def _retry_policy(dest: Mapping[str, Any]) -> RetryPolicy:
    """A router destination's retry settings, with meshweb's extensions
    (`PerTryTimeout`, `RetryNonIdempotent`, `RetryBudget`)."""
    retry_on = tuple(dest.get("RetryOn") or ())
    budget = dest.get("RetryBudget") or {}
    default = RetryPolicy()
    return RetryPolicy(
        num_retries=int(dest.get("NumRetries") or 0),
        on_connect_failure=bool(dest.get("RetryOnConnectFailure")) or "connect-failure" in retry_on,
        on_status_codes=tuple(int(c) for c in dest.get("RetryOnStatusCodes") or ()),
        retry_on=tuple(r for r in retry_on if r in RETRY_ON),
        per_try_timeout_s=_duration(dest.get("PerTryTimeout")),
        retry_non_idempotent=bool(dest.get("RetryNonIdempotent")),
        budget_percent=float(
            budget["Percent"] if budget.get("Percent") is not None else default.budget_percent
        ),
        budget_min_per_s=float(
            budget["MinRetriesPerSecond"]
            if budget.get("MinRetriesPerSecond") is not None
            else default.budget_min_per_s
        ),
    )


def _fault(dest: Mapping[str, Any]) -> FaultInjection | None:
    """meshweb's `Fault` extension of a router destination."""
    fault = dest.get("Fault")
    if not fault:
        return None
    return FaultInjection(
        delay_s=_duration(fault.get("Delay")),
        delay_percent=float(fault.get("DelayPercent") or 0),
        abort_status=int(fault.get("AbortStatus") or 0),
        abort_percent=float(fault.get("AbortPercent") or 0),
    )


def _resolver_timeout(node: Mapping[str, Any]) -> float:
    if node.get("Type") != "resolver":
        return 0.0
    return _duration(node["Resolver"].get("RequestTimeout"))


def translate_routes(chain: Mapping[str, Any]) -> tuple[Route, ...]:
    """A chain's routes, first match wins, the last one catching everything.

    Router: one route per router route (its implicit last route included);
    splitter: one catch-all route with its (flattened) splits; resolver: one
    catch-all route to its target. A route whose match cannot be expressed
    (a query parameter regex) is left out rather than widened."""
    nodes = chain["Nodes"]
    start = nodes[chain["StartNode"]]
    catch_all = RouteMatch(path_prefix="/")
    if start["Type"] != "router":
        return (
            Route(
                match=catch_all, splits=_splits(start, nodes), timeout_s=_resolver_timeout(start)
            ),
        )
    routes: list[Route] = []
    for r in start["Routes"]:
        definition = r.get("Definition") or {}
        http = (definition.get("Match") or {}).get("HTTP") or {}
        unsupported = _unsupported_match(http)
        if unsupported:
            log.warning(
                "discovery chain %s: a route matching on %s is left out",
                chain.get("ServiceName"),
                unsupported,
            )
            continue
        nxt = nodes[r["NextNode"]]
        dest = definition.get("Destination") or {}
        req_add, req_set, req_remove = _route_headers(dest.get("RequestHeaders"))
        resp_add, resp_set, resp_remove = _route_headers(dest.get("ResponseHeaders"))
        routes.append(
            Route(
                match=_route_match(http),
                splits=_splits(nxt, nodes),
                prefix_rewrite=dest.get("PrefixRewrite") or "",
                timeout_s=_duration(dest.get("RequestTimeout")) or _resolver_timeout(nxt),
                retry=_retry_policy(dest),
                request_headers_set=req_set,
                request_headers_remove=req_remove,
                response_headers_set=resp_set,
                response_headers_remove=resp_remove,
                name=str(len(routes)),
                fault=_fault(dest),
                request_headers_add=req_add,
                response_headers_add=resp_add,
            )
        )
    return tuple(routes)


def tcp_routes(chain: Mapping[str, Any]) -> tuple[Route, ...]:
    """L4: one catch-all route to the chain's start target."""
    start = chain["Nodes"][chain["StartNode"]]
    return (Route(match=RouteMatch(), splits=_splits(start, chain["Nodes"])),)


# --------------------------------------------------------------------------- clusters


def cluster_order(chain: Mapping[str, Any], routes: Iterable[Route]) -> list[str]:
    """Target IDs in the order a reader expects: as routes and splits name
    them, each followed by its failover targets, then any others."""
    nodes = chain["Nodes"]
    order: list[str] = []

    def add(tid: str) -> None:
        if tid in order:
            return
        order.append(tid)
        resolver = nodes.get(f"resolver:{tid}")
        for fo in ((resolver or {}).get("Resolver") or {}).get("Failover", {}).get("Targets", []):
            add(fo)

    for route in routes:
        for split in route.splits:
            add(split.cluster)
    for tid in sorted(chain["Targets"]):
        add(tid)
    return [t for t in order if t in chain["Targets"]]


def _lb_policy(chain: Mapping[str, Any], target: Mapping[str, Any], entries: Mapping) -> str:
    node = chain["Nodes"].get(f"resolver:{target['ID']}")
    lb = (node or {}).get("LoadBalancer")
    if lb is None:  # a failover-only target keeps no node: its resolver entry says
        lb = _entry(entries, "service-resolver", target["Service"]).get("LoadBalancer")
    return (lb or {}).get("Policy") or "round_robin"


def _hash_policies(
    chain: Mapping[str, Any], target: Mapping[str, Any], entries: Mapping
) -> tuple[HashPolicy, ...]:
    node = chain["Nodes"].get(f"resolver:{target['ID']}")
    lb = (node or {}).get("LoadBalancer")
    if lb is None:
        lb = _entry(entries, "service-resolver", target["Service"]).get("LoadBalancer")
    return tuple(
        HashPolicy(
            field=hp.get("Field") or "",
            field_value=hp.get("FieldValue") or "",
            source_ip=bool(hp.get("SourceIP")),
            terminal=bool(hp.get("Terminal")),
        )
        for hp in (lb or {}).get("HashPolicies") or ()
    )


def translate_cluster(
    snap: ProxySnapshot, us: UpstreamSnapshot, target: Mapping[str, Any]
) -> Cluster:
    """One chain target as a cluster: identity, SNI, endpoints (direct or
    through a mesh gateway), timeout, balancing, failover, limits, outlier."""
    assert us.chain is not None
    tid = target["ID"]
    dc = target.get("Datacenter") or snap.datacenter
    ns = target.get("Namespace") or DEFAULT_NAMESPACE
    gw_dc = gateway_datacenter(target, snap.datacenter, snap.gateways)
    gateway = None
    if gw_dc:
        endpoints = select_endpoints(snap.gateways.get(gw_dc, ()), {}, wan=gw_dc != snap.datacenter)
        if endpoints:
            gateway = Gateway(endpoints[0].address, endpoints[0].port)
    else:
        endpoints = select_endpoints(
            us.instances.get(tid, ()), target.get("Subset") or {}, wan=dc != snap.datacenter
        )
    node = us.chain["Nodes"].get(f"resolver:{tid}") or {}
    failover = ((node.get("Resolver") or {}).get("Failover") or {}).get("Targets") or ()
    return Cluster(
        name=tid,
        service=target["Service"],
        datacenter=dc,
        spiffe_id=spiffe.service_id(snap.trust_domain, target["Service"], dc, ns).uri,
        sni=target.get("SNI") or "",
        endpoints=endpoints,
        namespace=ns,
        subset=target.get("ServiceSubset") or "",
        connect_timeout_s=_duration(target.get("ConnectTimeout")) or 5.0,
        lb_policy=_lb_policy(us.chain, target, snap.entries),
        gateway=gateway,
        failover=tuple(failover),
        limits=_limits(us.settings),
        outlier=_outlier(us.settings),
        hash_policies=_hash_policies(us.chain, target, snap.entries),
        request_timeout_s=_duration((node.get("Resolver") or {}).get("RequestTimeout")),
    )


def _translate_shared(snap: ProxySnapshot, us: UpstreamSnapshot) -> Upstream:
    """`translate_upstream`, once per UpstreamSnapshot and (datacenter, trust
    domain) — the other inputs, the entries' data and the gateways, are the
    same for every proxy sharing the snapshot. The entry lookups it made are
    replayed into `snap.entries`, so each proxy still depends on them. With
    gateways in play it is not shared (they are per proxy in the pure tests)."""
    if snap.gateways or not isinstance(snap.entries, EntryReads):
        return translate_upstream(snap, us)
    key = (snap.datacenter, snap.trust_domain)
    hit = us.translated.get(key)
    if hit is None:
        reads = EntryReads(snap.entries.data)
        upstream = translate_upstream(dataclasses.replace(snap, entries=reads), us)
        hit = us.translated.setdefault(
            key, (upstream, frozenset(reads.names), frozenset(reads.kinds))
        )
    upstream, names, kinds = hit
    snap.entries.names.update(names)
    snap.entries.kinds.update(kinds)
    return upstream


def translate_upstream(snap: ProxySnapshot, us: UpstreamSnapshot) -> Upstream:
    """One local listener: its bind address, protocol, routes and clusters.
    An upstream whose chain did not compile keeps its listener with no
    clusters (connections to it are refused) rather than breaking the config."""
    u = us.upstream
    common = {
        "destination": u.get("DestinationName", ""),
        "local_bind_address": u.get("LocalBindAddress") or LOCAL_BIND_DEFAULT,
        "local_bind_port": int(u.get("LocalBindPort") or 0),
        "datacenter": u.get("Datacenter") or snap.datacenter,
        "namespace": u.get("DestinationNamespace") or DEFAULT_NAMESPACE,
    }
    chain = us.chain
    if chain is None:
        return Upstream(**common)
    protocol = chain.get("Protocol") or "tcp"
    routes = translate_routes(chain) if protocol in HTTP_PROTOCOLS else tcp_routes(chain)
    clusters = tuple(
        translate_cluster(snap, us, chain["Targets"][tid]) for tid in cluster_order(chain, routes)
    )
    return Upstream(protocol=protocol, routes=routes, clusters=clusters, **common)


# --------------------------------------------------------------------------- topics


def dependency_topics(snap: ProxySnapshot) -> set[str]:
    """The change-hub topics whose change may change this config (pure).

    Precise, so that a write recompiles only the proxies it concerns: the
    intentions whose destination is this proxy's service (and the wildcard
    ones), the config entries the compile actually looked up (when the
    snapshot's entries are an `EntryReads`; plain entries, as the pure tests
    build them, depend on every chain kind), the instances of the service,
    its upstreams and their chain targets, the node, the CA roots, the mesh
    entry. Call it after `build_proxy_config`, so the translation's lookups
    are recorded too."""
    topics = set(BASE_TOPICS)
    if isinstance(snap.entries, EntryReads):
        topics.update(snap.entries.topics())
    else:
        topics.update(topic.config_kind(kind) for kind in pure_entries.CHAIN_KINDS)
    topics.add(topic.service(snap.proxy["Service"]))
    topics.add(topic.node(snap.node["Node"]))
    if snap.service:
        topics.update((topic.service(snap.service), topic.intentions_for(snap.service)))
    cross_dc = False
    for us in snap.upstreams:
        dest = us.upstream.get("DestinationName", "")
        if dest:
            topics.update((topic.service(dest), topic.connect(dest)))
        for target in ((us.chain or {}).get("Targets") or {}).values():
            topics.update((topic.service(target["Service"]), topic.connect(target["Service"])))
            if (target.get("Datacenter") or snap.datacenter) != snap.datacenter:
                cross_dc = True
    topics.update(peering_topics(snap))
    if cross_dc:
        # A mesh gateway registered later changes the path: any registration
        # touches `services`, a new node `nodes`.
        topics.update((topic.NODES, topic.SERVICES))
        for gws in snap.gateways.values():
            for gw in gws:
                topics.add(topic.service(gw.entry["Service"]["Service"]))
    return topics


# =========================================================================== cluster peering


def _peer_upstreams(snap: ProxySnapshot) -> list[Mapping[str, Any]]:
    upstreams = (snap.proxy.get("Proxy") or {}).get("Upstreams") or ()
    return [
        u
        for u in upstreams
        if u.get("DestinationPeer")
        and u.get("DestinationName")
        and (u.get("DestinationType") or "service") == "service"
    ]


def translate_peer_upstreams(snap: ProxySnapshot) -> tuple[Upstream, ...]:
    """Upstreams naming a `DestinationPeer` (pure): one TCP cluster each, to
    the service the peer exports, identified by its SPIFFE ID in the peer's
    trust domain and sent the exporter's gateway SNI.

    The path: with `MeshGateway.Mode` "local" (the upstream's, else the
    proxy's, else the service's `service-defaults`, else `proxy-defaults`) through a healthy local mesh gateway, which routes the SNI to
    the peer's gateways; otherwise straight to the peer's gateways; a peer
    with no gateway is dialled at its sidecars. A service not (or no longer)
    imported keeps its listener with no cluster: connections are refused.
    """
    out = []
    upstreams = _peer_upstreams(snap)
    proxy_mode = ""
    if upstreams:
        proxy_mode = (
            ((snap.proxy.get("Proxy") or {}).get("MeshGateway") or {}).get("Mode")
            or (
                _entry(snap.entries, "service-defaults", snap.service).get("MeshGateway") or {}
            ).get("Mode")
            or (
                _entry(snap.entries, "proxy-defaults", pure_entries.PROXY_DEFAULTS_NAME).get(
                    "MeshGateway"
                )
                or {}
            ).get("Mode")
            or ""
        )
    for u in upstreams:
        peer, name = u["DestinationPeer"], u["DestinationName"]
        common = {
            "destination": name,
            "local_bind_address": u.get("LocalBindAddress") or LOCAL_BIND_DEFAULT,
            "local_bind_port": int(u.get("LocalBindPort") or 0),
            "datacenter": "",
            "namespace": u.get("DestinationNamespace") or DEFAULT_NAMESPACE,
            "peer": peer,
        }
        target = snap.peered.get((peer, name))
        if not target:
            out.append(Upstream(**common))
            continue
        mode = (u.get("MeshGateway") or {}).get("Mode") or proxy_mode
        local = select_endpoints(snap.gateways.get(snap.datacenter, ()), {}, wan=False)
        remote = tuple(
            Endpoint(g["Address"], int(g["Port"]))
            for g in target.get("Gateways") or ()
            if g.get("Address") and g.get("Port")
        )
        direct = tuple(
            Endpoint(e["Address"], int(e["Port"]))
            for e in target.get("Endpoints") or ()
            if e.get("Address") and e.get("Port")
        )
        endpoints = local if mode == "local" and local and remote else remote or direct
        gateway = Gateway(endpoints[0].address, endpoints[0].port) if remote and endpoints else None
        dc = str(target.get("Datacenter") or "")
        cluster_name = f"{name}.default.{peer}.peer"
        cluster = Cluster(
            name=cluster_name,
            service=name,
            datacenter=dc,
            spiffe_id=str(target.get("SpiffeID") or ""),
            sni=str(target.get("SNI") or ""),
            endpoints=endpoints,
            gateway=gateway,
            limits=_limits(u.get("Config") or {}),
            peer=peer,
        )
        routes = (Route(RouteMatch(), (WeightedCluster(cluster_name, 100.0),)),)
        out.append(Upstream(protocol="tcp", routes=routes, clusters=(cluster,), **common))
    return tuple(out)


def peering_topics(snap: ProxySnapshot) -> set[str]:
    """What the peering parts of a config depend on (pure)."""
    topics = {topic.PEERINGS, topic.config_entry("exported-services", "default")}
    for u in _peer_upstreams(snap):
        topics.add(topic.peered_service(u["DestinationPeer"], u["DestinationName"]))
        topics.add(topic.peering(u["DestinationPeer"]))
    return topics


def peer_gateway_routes() -> tuple[tuple[GatewayRoute, ...], set[str]]:
    """A mesh gateway's routes to services imported from peers, and their topics.

    Each imported service's SNI (the exporter's own gateway SNI, in its trust
    domain) leads to the exporting cluster's gateways; the gateway there
    routes it to the service's sidecars as one of its own.
    """
    from registry.models import ImportedService, Peering

    live = (Peering.ACTIVE, Peering.FAILING)
    routes = []
    topics = {topic.PEERINGS}
    peers = Peering.objects.filter(state__in=live).values_list("name", flat=True)
    topics.update(topic.peered_services(p) for p in peers)
    rows = (
        ImportedService.objects.filter(peering__state__in=live)
        .order_by("peering__name", "name")
        .values_list("peering__name", "name", "connect")
    )
    for peer, name, connect in rows:
        gateways = tuple(
            Endpoint(str(g["Address"]), int(g["Port"]))
            for g in connect.get("Gateways") or ()
            if g.get("Address") and g.get("Port")
        )
        if connect.get("SNI") and gateways:
            routes.append(
                GatewayRoute(
                    sni=str(connect["SNI"]),
                    kind="remote",
                    service=name,
                    datacenter=str(connect.get("Datacenter") or ""),
                    peer=peer,
                    endpoints=gateways,
                )
            )
    return tuple(routes), topics


def gather_peering(
    service: str, proxy: Mapping[str, Any]
) -> tuple[dict[tuple[str, str], Mapping[str, Any]], tuple]:
    """Read what the peering parts of a sidecar's config need: the imported
    services its `DestinationPeer` upstreams name, and the trust of the peers
    it calls or is exported to."""
    from registry.domain import peering

    pairs = {
        (u["DestinationPeer"], u["DestinationName"])
        for u in proxy.get("Upstreams") or ()
        if u.get("DestinationPeer") and u.get("DestinationName")
    }
    peers = {p for p, _ in pairs} | (peering.peers_exported_to(service) if service else set())
    if not peers:
        return {}, ()
    return peering.imported_connect(pairs), peering.trust_for(peers)


# =========================================================================== gather (database)


class _SharedReads:
    """What every proxy's gather reads alike (CA roots, config entries, the
    intentions of a service, an upstream's chain and instances, gateways),
    kept for one value of the global index.

    A write wakes every proxy that depends on it at once: without this, N
    sidecars of one service would each run the same queries and compile the
    same chains. Every write takes a new global index, so data read *after*
    reading the index N is at least as new as N: keeping it under N never
    serves older data than a reader of N could see, and the first compile at
    a higher index starts a new generation. Values are shared between
    compiles, so they are immutable (tuples, frozen dataclasses) or never
    modified by the (pure) translation.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._index = -1
        self._values: dict[tuple, Any] = {}

    def generation(self, index: int) -> dict[tuple, Any]:
        with self._lock:
            if index != self._index:
                self._index, self._values = index, {}
            return self._values

    def forget(self) -> None:
        with self._lock:
            self._index, self._values = -1, {}
        with _rows_lock:
            _rows.clear()


_shared = _SharedReads()


def forget_shared_reads() -> None:
    """Drop the shared reads (tests roll the database back, so an index value
    can come back with different rows behind it)."""
    _shared.forget()


def _global_index() -> int:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT value FROM registry_meshindex WHERE id = 1")
        row = cur.fetchone()
    return int(row[0]) if row else 0


def _once(shared: dict[tuple, Any], key: tuple, make):
    """`shared[key]`, made on first use by one thread while the others wanting
    it wait (a fan-out starts every DB thread on the same keys at once)."""
    try:
        return shared[key]
    except KeyError:
        pass
    with shared.setdefault(("making", *key), threading.Lock()):  # setdefault is atomic
        try:
            return shared[key]
        except KeyError:
            return shared.setdefault(key, make())


def _find_proxy_row(node_name: str, proxy_id: str):
    from registry.errors import NotFound
    from registry.models import ServiceInstance

    row = (
        ServiceInstance.objects.select_related("node__datacenter")
        .filter(node__name=node_name, service_id=proxy_id, kind__in=_COMPILED_KINDS)
        .first()
    )
    if row is None:
        raise NotFound(f'No connect-proxy "{proxy_id}" on node "{node_name}"')
    return row


# The instance kinds the config stream compiles a config for.
_COMPILED_KINDS = ("connect-proxy", MESH_GATEWAY)


def _candidates(instances: list) -> tuple[Candidate, ...]:
    """Instances as Candidates: their CheckServiceNode JSON and the checks of
    the instances they front (one query each for checks)."""
    from registry.domain import catalog, shapes
    from registry.models import Check

    if not instances:
        return ()
    checks = catalog.checks_for(instances)
    wanted = {
        (s.node_id, (s.proxy or {}).get("DestinationServiceID"))
        for s in instances
        if (s.proxy or {}).get("DestinationServiceID")
    }
    dest_checks: dict[tuple[int, str], list] = {}
    if wanted:
        # One query over the nodes and IDs involved; the exact pairs are kept below.
        rows = Check.objects.filter(
            node_id__in={n for n, _ in wanted}, service_id__in={sid for _, sid in wanted}
        ).order_by("check_id")
        for c in rows:
            if (c.node_id, c.service_id) in wanted:
                dest_checks.setdefault((c.node_id, c.service_id), []).append(c)
    nodes_json: dict[int, dict] = {}
    out = []
    for s in instances:
        node_json = nodes_json.get(s.node_id)
        if node_json is None:
            node_json = nodes_json[s.node_id] = shapes.node_json(s.node)
        entry = {
            "Node": node_json,
            "Service": shapes.agent_service_json(s, with_index=True),
            "Checks": [shapes.check_json(c, s.node.name) for c in checks[s.pk]],
        }
        dest_id = (s.proxy or {}).get("DestinationServiceID")
        extra = tuple(
            shapes.check_json(c, s.node.name) for c in dest_checks.get((s.node_id, dest_id), ())
        )
        out.append(Candidate(entry=entry, destination_checks=extra))
    return tuple(out)


def _target_candidates(service: str, dc: str) -> tuple[Candidate, ...]:
    from registry.domain import catalog

    return _candidates(list(catalog.instances_query(service, connect=True, dc=dc)))


def _gateway_candidates(dc: str) -> tuple[Candidate, ...]:
    from registry.models import ServiceInstance

    rows = (
        ServiceInstance.objects.select_related("node__datacenter")
        .filter(kind="mesh-gateway", node__datacenter__name=dc)
        .order_by("node__name", "service_id")
    )
    return _candidates(list(rows))


def plan_upstream(
    service: str,
    proxy: Mapping[str, Any],
    upstream: Mapping[str, Any],
    local_dc: str,
    trust_domain: str,
    entries: Mapping,
) -> UpstreamSnapshot:
    """An upstream's settings and compiled discovery chain, without instances
    (pure: what `gather` and the golden tests both start from). A chain that
    does not compile is kept as `chain=None` with the reason in `error`."""
    settings = upstream_settings(service, upstream, proxy, entries)
    dest = upstream.get("DestinationName", "")
    try:
        chain = chains.compile_chain(
            dest,
            upstream.get("Datacenter") or local_dc,
            entries,  # type: ignore[arg-type]
            trust_domain=trust_domain,
            namespace=upstream.get("DestinationNamespace") or DEFAULT_NAMESPACE,
            use_in_datacenter=local_dc,
            **chain_overrides(settings),
        )
    except (chains.ChainError, pure_entries.ConfigEntryError, spiffe.SpiffeError) as exc:
        log.warning("upstream %s of %s: discovery chain does not compile: %s", dest, service, exc)
        return UpstreamSnapshot(upstream=upstream, settings=settings, chain=None, error=str(exc))
    return UpstreamSnapshot(upstream=upstream, settings=settings, chain=chain)


def chain_targets(us: UpstreamSnapshot) -> list[tuple[str, str, str]]:
    """(target ID, service, datacenter) of every target of an upstream's chain."""
    targets = (us.chain or {}).get("Targets") or {}
    return [(tid, t["Service"], t["Datacenter"]) for tid, t in targets.items()]


def _gather_upstream(
    service: str,
    proxy_json: Mapping[str, Any],
    upstream: Mapping[str, Any],
    local_dc: str,
    trust_domain: str,
    entries: Mapping,
    candidates: Callable[[str, str], tuple[Candidate, ...]] = _target_candidates,
) -> UpstreamSnapshot:
    """`plan_upstream` with the instances of each chain target (`candidates`
    of (service, datacenter): `gather` shares them among every upstream of a
    generation that targets them — sidecars of one service differ in their
    upstreams' local ports, not in where those lead)."""
    planned = plan_upstream(service, proxy_json, upstream, local_dc, trust_domain, entries)
    instances: dict[str, tuple[Candidate, ...]] = {}
    by_service_dc: dict[tuple[str, str], tuple[Candidate, ...]] = {}
    for tid, svc, dc in chain_targets(planned):
        if (svc, dc) not in by_service_dc:
            by_service_dc[(svc, dc)] = candidates(svc, dc)
        instances[tid] = by_service_dc[(svc, dc)]
    return dataclasses.replace(planned, instances=instances)


_ProxyRows = tuple[str, dict, dict, dict | None]  # datacenter, node, proxy, destination JSON
_rows_lock = threading.Lock()
_rows: dict[tuple[str, str], tuple[int, _ProxyRows]] = {}


def _proxy_rows(node_name: str, proxy_id: str, node_index: int | None = None) -> _ProxyRows:
    """The proxy's own rows as JSON: its datacenter, node, registration and the
    instance it fronts. Kept per proxy while its node's topic is unchanged
    (every change to a service or check on the node touches it); the index
    is read before the rows, as in `_SharedReads`."""
    from registry.domain import shapes
    from registry.models import ServiceInstance
    from registry.txn import topics_index

    key = (node_name, proxy_id)
    index = topics_index((topic.node(node_name),)) if node_index is None else node_index
    with _rows_lock:
        hit = _rows.get(key)
    if hit is not None and hit[0] == index and index:
        return hit[1]
    try:
        row = _find_proxy_row(node_name, proxy_id)
    except Exception:
        with _rows_lock:
            _rows.pop(key, None)
        raise
    node = row.node
    proxy_json = shapes.agent_service_json(row)
    dest_id = (proxy_json.get("Proxy") or {}).get("DestinationServiceID")
    dest_row = None
    if dest_id:
        dest_row = (
            ServiceInstance.objects.select_related("node__datacenter")
            .filter(node=node, service_id=dest_id)
            .first()
        )
    rows: _ProxyRows = (
        node.datacenter.name,
        shapes.node_json(node),
        proxy_json,
        shapes.agent_service_json(dest_row) if dest_row is not None else None,
    )
    with _rows_lock:
        _rows[key] = (index, rows)
    return rows


def gather(
    node_name: str,
    proxy_id: str,
    *,
    global_index: int | None = None,
    node_index: int | None = None,
) -> ProxySnapshot:
    """Read everything `proxy_id` on `node_name` depends on (see the module doc).
    Raises NotFound if there is no such connect-proxy on that node.
    `global_index` and `node_index`, when given, were read before this call
    (`compile_proxies` reads them once for many proxies)."""
    from registry.acl_rules import Authorizer
    from registry.domain import config_entries, connect_ca, intentions

    if global_index is None:
        global_index = _global_index()
    shared = _shared.generation(global_index)  # read first: see `_SharedReads`
    local_dc, node_json, proxy_json, destination = _proxy_rows(node_name, proxy_id, node_index)
    p = proxy_json.get("Proxy") or {}
    service = p.get("DestinationServiceName") or ""

    def read_roots() -> tuple[str, tuple[str, ...]]:
        _index, data = connect_ca.roots_json()
        ordered = sorted(data["Roots"], key=lambda r: not r["Active"])  # stable: active first
        return data["TrustDomain"], tuple(r["RootCert"] for r in ordered)

    def read_intentions() -> tuple[dict, ...]:
        _index, found = intentions.match(Authorizer.management(), "destination", [service])
        return tuple(intentions.intention_json(r) for r in found.get(service, []))

    trust_domain, roots = _once(shared, ("roots",), read_roots)
    rules = _once(shared, ("intentions", service), read_intentions) if service else ()
    allow = _once(shared, ("allow-by-default",), intentions.default_allow)
    entries = EntryReads(_once(shared, ("entries",), config_entries.snapshot))

    def target_candidates(svc: str, dc: str) -> tuple[Candidate, ...]:
        return _once(shared, ("candidates", svc, dc), lambda: _target_candidates(svc, dc))

    def upstream(u: Mapping[str, Any]) -> UpstreamSnapshot:
        mode = (p.get("MeshGateway") or {}).get("Mode") or ""
        key = ("upstream", service, json.dumps(u, sort_keys=True), mode, local_dc, trust_domain)

        def make() -> tuple[UpstreamSnapshot, frozenset, frozenset]:
            reads = EntryReads(entries.data)
            us = _gather_upstream(
                service, proxy_json, u, local_dc, trust_domain, reads, target_candidates
            )
            return us, frozenset(reads.names), frozenset(reads.kinds)

        us, names, kinds = _once(shared, key, make)
        entries.names.update(names)
        entries.kinds.update(kinds)
        return us

    upstreams = tuple(
        upstream(u)
        for u in p.get("Upstreams") or ()
        if (u.get("DestinationType") or "service") == "service"
        and u.get("DestinationName")
        and not u.get("DestinationPeer")  # imported services: `gather_peering`
    )
    peered, peer_trust = _once(
        shared,
        ("peering", service, json.dumps(p.get("Upstreams") or [], sort_keys=True)),
        lambda: gather_peering(service, p),
    )

    gateway_dcs = {
        t["Datacenter"]
        for us in upstreams
        for t in ((us.chain or {}).get("Targets") or {}).values()
        if t["Datacenter"] != local_dc
    }
    if gateway_dcs or peered:
        gateway_dcs.add(local_dc)
    gateways = {
        dc: _once(shared, ("gateways", dc), lambda dc=dc: _gateway_candidates(dc))
        for dc in sorted(gateway_dcs)
    }

    return ProxySnapshot(
        datacenter=local_dc,
        trust_domain=trust_domain,
        node=node_json,
        proxy=proxy_json,
        destination=destination,
        roots=roots,
        intentions=rules,
        allow_by_default=allow,
        entries=entries,
        upstreams=upstreams,
        gateways=gateways,
        peered=peered,
        peer_trust=peer_trust,
    )


def compile_proxy(node_name: str, proxy_id: str) -> tuple[ProxyConfig, set[str]]:
    """The config `proxy_id` on `node_name` enforces, and the change-hub topics
    it depends on. Raises `registry.errors.NotFound` if there is no such
    connect-proxy on that node.

    The version is the highest index of those topics, read after the gather:
    a change that lands during compilation can only make the version higher
    than the data (never lower), and a watcher that registers the topics
    *before* calling this is woken by it and recompiles.
    """
    from registry.txn import topics_index

    if _is_gateway(node_name, proxy_id):
        return compile_gateway(node_name, proxy_id)
    snap = gather(node_name, proxy_id)
    config = build_proxy_config(snap)  # before the topics: its entry lookups count
    topics = dependency_topics(snap)
    version = topics_index(tuple(sorted(topics)))
    return dataclasses.replace(config, version=version), topics


def _indexes(topics: Iterable[str]) -> dict[str, int]:
    """The index of each topic that was ever written, in one query."""
    from django.db import connection

    wanted = sorted(set(topics))
    if not wanted:
        return {}
    marks = ", ".join(["%s"] * len(wanted))
    with connection.cursor() as cur:
        cur.execute(
            f'SELECT topic, "index" FROM registry_topicindex WHERE topic IN ({marks})', wanted
        )
        return {t: int(i) for t, i in cur.fetchall()}


def compile_proxies(
    proxies: list[tuple[str, str]],
) -> list[tuple[ProxyConfig, set[str]] | Exception]:
    """`compile_proxy` for many (node, proxy ID) pairs at once, as a write that
    wakes many proxies asks for: the global index and the nodes' indexes are
    read once before every gather, and the versions in one query after every
    build (the same order as one compile, so the same guarantees: data never
    older than its index, a version never lower than its data). Each pair's
    result, or the exception its compile raised."""
    from django.db import InterfaceError, OperationalError

    global_index = _global_index()
    nodes = _indexes(topic.node(n) for n, _ in proxies)
    built: list[tuple[ProxyConfig, set[str]] | Exception] = []
    for node_name, proxy_id in proxies:
        try:
            if _is_gateway(node_name, proxy_id, nodes.get(topic.node(node_name), 0)):
                gw_config, gw_topics = gather_gateway_config(node_name, proxy_id, global_index)
                built.append((gw_config, gw_topics))  # type: ignore[arg-type]
                continue
            snap = gather(
                node_name,
                proxy_id,
                global_index=global_index,
                node_index=nodes.get(topic.node(node_name), 0),
            )
            built.append((build_proxy_config(snap), dependency_topics(snap)))
        except (OperationalError, InterfaceError):
            raise  # the connection: the DB pool retries the whole call on a fresh one
        except Exception as exc:
            built.append(exc)
    indexes = _indexes(t for b in built if not isinstance(b, Exception) for t in b[1])
    return [
        b
        if isinstance(b, Exception)
        else (
            dataclasses.replace(b[0], version=max((indexes.get(t, 0) for t in b[1]), default=0)),
            b[1],
        )
        for b in built
    ]


# =========================================================================== mesh gateways


@dataclass(frozen=True)
class GatewaySnapshot:
    """Everything one mesh gateway's routing table is translated from."""

    datacenter: str
    trust_domain: str
    node: Mapping[str, Any]  # the gateway's node, Consul's JSON
    gateway: Mapping[str, Any]  # the gateway instance, `/v1/agent/service` JSON
    # Connect-capable instances (sidecars, Connect-native) of this datacenter, by
    # (service, namespace): what local routes lead to.
    local: Mapping[tuple[str, str], tuple[Candidate, ...]]
    # The mesh gateways of every other datacenter, by datacenter.
    remote_gateways: Mapping[str, tuple[Candidate, ...]]
    entries: Mapping[str, Mapping[str, Mapping[str, Any]]]  # kind -> name -> data
    version: int = 0


GATEWAY_BIND_DEFAULT = "0.0.0.0"
# What a gateway's table depends on: any instance, check, node or datacenter of
# the mesh (its local routes span every service here; its remote ones every
# other datacenter's gateways), resolver subsets, and the trust domain.
GATEWAY_TOPICS = frozenset(
    {
        topic.SERVICES,
        topic.CHECKS,
        topic.NODES,
        topic.DATACENTERS,
        topic.CA_ROOTS,
        topic.config_kind("service-resolver"),
    }
)


def _candidate_key(c: Candidate) -> tuple[str, str]:
    svc = c.entry.get("Service") or {}
    name = (svc.get("Proxy") or {}).get("DestinationServiceName") or svc.get("Service") or ""
    return name, svc.get("Namespace") or DEFAULT_NAMESPACE


def build_gateway_config(snap: GatewaySnapshot) -> GatewayConfig:
    """A mesh gateway's routing table (pure).

    Local routes: for every service with Connect-capable instances here, its
    SNI (`<svc>.<ns>.<dc>.internal.<td>`) leads to its healthy instances'
    sidecars (LAN addresses), and each subset of its `service-resolver` to
    the instances the subset's `Filter`/`OnlyPassing` select (`<subset>.` in
    front, Consul's subset SNI). A service whose instances are all unhealthy
    keeps its route with no endpoint, so the gateway refuses its streams as
    `no_healthy_endpoint` rather than `unknown_sni`. Remote datacenters: each
    other datacenter with a healthy gateway gets its SNI suffix, leading to
    its gateways' WAN addresses (the gateway there resolves the service).
    The gateway listens on its LAN address and on its WAN address when that
    differs (`Proxy.Config.bind_address` overrides the LAN one, `0.0.0.0` for all).
    """
    gw = snap.gateway
    td, dc = snap.trust_domain, snap.datacenter
    routes: list[GatewayRoute] = []
    for (service, ns), candidates in sorted(snap.local.items()):
        if not service:
            continue
        base = spiffe.gateway_sni(service, ns, dc, td)
        routes.append(
            GatewayRoute(
                sni=base,
                kind=LOCAL,
                service=service,
                datacenter=dc,
                namespace=ns,
                endpoints=select_endpoints(candidates, {}),
            )
        )
        resolver = _entry(snap.entries, "service-resolver", service)
        for name, subset in sorted((resolver.get("Subsets") or {}).items()):
            routes.append(
                GatewayRoute(
                    sni=f"{name}.{base}",
                    kind=LOCAL,
                    service=service,
                    datacenter=dc,
                    namespace=ns,
                    subset=name,
                    endpoints=select_endpoints(candidates, subset or {}),
                )
            )
    remotes = []
    for other, gateways in sorted(snap.remote_gateways.items()):
        if other == dc:
            continue
        endpoints = select_endpoints(gateways, {}, wan=True)
        if endpoints:
            remotes.append(
                RemoteDatacenter(
                    datacenter=other, sni_suffix=f".{other}.internal.{td}", gateways=endpoints
                )
            )
    proxy_cfg = (gw.get("Proxy") or {}).get("Config") or {}
    timeout_ms = _fold_get(proxy_cfg, "connect_timeout_ms", 0)
    lan_address, port = best_address({"Node": snap.node, "Service": gw}, wan=False)
    wan_address, wan_port = best_address({"Node": snap.node, "Service": gw}, wan=True)
    return GatewayConfig(
        version=snap.version,
        proxy_id=gw["ID"],
        service=gw.get("Service") or MESH_GATEWAY,
        node=snap.node["Node"],
        datacenter=dc,
        trust_domain=td,
        bind_address=str(
            _fold_get(proxy_cfg, "bind_address", "") or lan_address or GATEWAY_BIND_DEFAULT
        ),
        port=port,
        routes=tuple(routes),
        datacenters=tuple(remotes),
        connect_timeout_s=(
            int(timeout_ms) / 1000
            if isinstance(timeout_ms, int) and not isinstance(timeout_ms, bool) and timeout_ms > 0
            else 5.0
        ),
        wan_address=wan_address if (wan_address, wan_port) != (lan_address, port) else "",
        wan_port=wan_port if (wan_address, wan_port) != (lan_address, port) else 0,
    )


def gateway_dependency_topics(snap: GatewaySnapshot) -> set[str]:
    """The topics whose change may change a gateway's table (coarse: gateways are few)."""
    return {*GATEWAY_TOPICS, topic.node(snap.node["Node"])}


def _is_gateway(node_name: str, proxy_id: str, node_index: int | None = None) -> bool:
    """Whether `proxy_id` on the node is a mesh gateway (its rows are kept per node index)."""
    try:
        _dc, _node, instance, _dest = _proxy_rows(node_name, proxy_id, node_index)
    except Exception:
        return False  # the sidecar path raises the proper NotFound
    return instance.get("Kind") == MESH_GATEWAY


def _local_candidates(dc: str) -> dict[tuple[str, str], tuple[Candidate, ...]]:
    from registry.models import ServiceInstance

    rows = (
        ServiceInstance.objects.select_related("node__datacenter")
        .filter(node__datacenter__name=dc)
        .filter(Q(kind="connect-proxy") | Q(connect__Native=True))
        .order_by("node__name", "service_id")
    )
    out: dict[tuple[str, str], list[Candidate]] = {}
    for c in _candidates(list(rows)):
        out.setdefault(_candidate_key(c), []).append(c)
    return {k: tuple(v) for k, v in out.items()}


def gather_gateway(
    node_name: str, proxy_id: str, global_index: int | None = None
) -> GatewaySnapshot:
    """Read what a mesh gateway's table is built from (shared per global index)."""
    from registry.domain import config_entries, connect_ca
    from registry.models import Datacenter

    if global_index is None:
        global_index = _global_index()
    from registry.errors import NotFound

    shared = _shared.generation(global_index)
    missing = NotFound(f'No mesh-gateway "{proxy_id}" on node "{node_name}"')
    try:
        local_dc, node_json, gw_json, _ = _proxy_rows(node_name, proxy_id)
    except NotFound:
        raise missing from None
    if gw_json.get("Kind") != MESH_GATEWAY:
        raise missing
    trust_domain = _once(
        shared, ("trust-domain",), lambda: connect_ca.roots_json()[1]["TrustDomain"]
    )
    local = _once(shared, ("gateway-local", local_dc), lambda: _local_candidates(local_dc))
    names = _once(
        shared,
        ("datacenter-names",),
        lambda: tuple(Datacenter.objects.values_list("name", flat=True)),
    )
    remote = {
        dc: _once(shared, ("gateways", dc), lambda dc=dc: _gateway_candidates(dc))
        for dc in sorted(names)
        if dc != local_dc
    }
    entries = _once(shared, ("entries",), config_entries.snapshot)
    return GatewaySnapshot(
        datacenter=local_dc,
        trust_domain=trust_domain,
        node=node_json,
        gateway=gw_json,
        local=local,
        remote_gateways=remote,
        entries=entries,
    )


def gather_gateway_config(
    node_name: str, proxy_id: str, global_index: int | None = None
) -> tuple[GatewayConfig, set[str]]:
    """The gateway's table and its topics, version 0 (the caller stamps it)."""
    snap = gather_gateway(node_name, proxy_id, global_index)
    config, topics = build_gateway_config(snap), gateway_dependency_topics(snap)
    routes, peer_topics = peer_gateway_routes()
    if routes:
        config = dataclasses.replace(config, routes=config.routes + routes)
    return config, topics | peer_topics


def compile_gateway(node_name: str, proxy_id: str) -> tuple[GatewayConfig, set[str]]:
    """What mesh gateway `proxy_id` on `node_name` routes, and the topics it depends
    on; versioned as `compile_proxy` versions a sidecar's config."""
    from registry.txn import topics_index

    config, topics = gather_gateway_config(node_name, proxy_id)
    version = topics_index(tuple(sorted(topics)))
    return dataclasses.replace(config, version=version), topics


def find_proxy(service: str, *, proxy_id: str = "", node: str = "") -> tuple[str, str]:
    """(node name, proxy ID) of a sidecar of `service`: the one named by
    `proxy_id` and/or `node`, else the first (by node, then ID). NotFound
    says whether the service, its sidecars or the one asked for is missing."""
    from registry.errors import NotFound
    from registry.models import ServiceInstance

    proxies = ServiceInstance.objects.filter(kind="connect-proxy", destination_name=service)
    if proxy_id:
        proxies = proxies.filter(service_id=proxy_id)
    if node:
        proxies = proxies.filter(node__name=node)
    found = proxies.order_by("node__name", "service_id").values_list("node__name", "service_id")
    first = found.first()
    if first is not None:
        return first[0], first[1]
    if not ServiceInstance.objects.filter(Q(name=service) | Q(destination_name=service)).exists():
        raise NotFound(f'Service "{service}" not found')
    if not proxy_id and not node:
        raise NotFound(f'Service "{service}" has no sidecar proxy')
    which = " ".join(
        part
        for part in (f'"{proxy_id}"' if proxy_id else "", f'on node "{node}"' if node else "")
        if part
    )
    raise NotFound(f'Service "{service}" has no sidecar proxy {which}')


__all__ = [
    "Candidate",
    "GatewaySnapshot",
    "build_gateway_config",
    "compile_gateway",
    "readable_proxy_config",
    "ProxySnapshot",
    "UpstreamSnapshot",
    "build_proxy_config",
    "compile_proxy",
    "dependency_topics",
    "find_proxy",
    "gather",
    "plan_upstream",
    "select_endpoints",
    "translate_routes",
    "upstream_settings",
]


def readable_proxy_config(
    authz: Authorizer, service: str, *, proxy_id: str = "", node: str = "", accessor: str = ""
) -> ProxyConfig:
    """The compiled config of one of `service`'s sidecars, for a caller who may see it:
    service:read and intentions:read on the service (the config carries its
    intentions) and service:read on every upstream it names. The one home of
    this rule (`/api/services/<name>/proxy-config` and the UI's service page)."""
    from registry.errors import PermissionDenied

    def refuse(permission: str, resource: str) -> None:
        who = f"token with AccessorID '{accessor}'" if accessor else "token"
        raise PermissionDenied(
            f"Permission denied: {who} lacks permission '{permission}' on \"{resource}\""
        )

    if not authz.service_read(service):
        refuse("service:read", service)
    node_name, pid = find_proxy(service, proxy_id=proxy_id, node=node)
    config, _topics = compile_proxy(node_name, pid)
    if not authz.intention_read(service):
        refuse("intentions:read", service)
    for upstream in config.upstreams:
        if not authz.service_read(upstream.destination):
            refuse("service:read", upstream.destination)
    return config
