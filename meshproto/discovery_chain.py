"""The discovery-chain compiler: config entries -> Consul's compiled chain (pure).

A chain says how a caller reaches `service`: an optional router (routes by
path, header, method...), splitters (weighted splits, nested ones flattened)
and resolvers (which instances: subsets, redirects, failover, timeouts,
load balancing), ending in targets — one set of instances each, named
`[<subset>.]<service>.<namespace>.<datacenter>` and reached through the
SNI `<target id>.internal.<trust domain>`.

The output is Consul's `CompiledDiscoveryChain` (`GET /v1/discovery-chain`):
`ServiceName`, `Namespace`, `Datacenter`, `Protocol`, `StartNode`, `Nodes`
keyed "router:web" / "splitter:web" / "resolver:web.default.dc1", and
`Targets` keyed by target ID. Compilation follows Consul's compiler: routes
and splits without a subset go through the destination's splitter when it
has one; redirects and default subsets rewrite a target before it is
resolved; failover targets are resolved too (their redirects apply) but only
the primary resolver nodes stay in `Nodes`; every service in one chain must
speak one protocol; routers and splitters need an HTTP-family protocol.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from meshproto.config_entries import (
    DEFAULT_NAMESPACE,
    HTTP_PROTOCOLS,
    MESH_GATEWAY,
    PROTOCOLS,
    PROXY_DEFAULTS_NAME,
    ConfigEntryError,
    Duration,
    Entries,
    Enum,
    Struct,
    parse_duration,
    protocol_of,
)

DEFAULT_CONNECT_TIMEOUT = "5s"

# `POST /v1/discovery-chain/<service>`'s body.
OVERRIDES = Struct(
    {
        "OverrideConnectTimeout": Duration,
        "OverrideProtocol": Enum(*PROTOCOLS),
        "OverrideMeshGateway": MESH_GATEWAY,
    }
)


class ChainError(ValueError):
    """The entries do not form a valid chain (a missing subset, a loop, mixed protocols)."""


@dataclass(frozen=True)
class Target:
    service: str
    subset: str
    namespace: str
    datacenter: str

    @property
    def id(self) -> str:
        base = f"{self.service}.{self.namespace}.{self.datacenter}"
        return f"{self.subset}.{base}" if self.subset else base

    def rewrite(
        self, service: str = "", subset: str = "", namespace: str = "", datacenter: str = ""
    ) -> Target:
        """Consul's rewriteTarget: naming another service drops the subset."""
        svc, sub, ns, dc = self.service, self.subset, self.namespace, self.datacenter
        if service and service != svc:
            svc, sub = service, ""
        if subset:
            sub = subset
        return Target(svc, sub, namespace or ns, datacenter or dc)


def target_sni(target_id: str, trust_domain: str) -> str:
    """The SNI (and load-balancer name) of a target: `<target id>.internal.<trust domain>`,
    the same form as `meshproto.spiffe.gateway_sni` with the subset in front."""
    return f"{target_id}.internal.{trust_domain}"


def decode_overrides(raw: Any) -> dict:
    """A POST body's overrides, validated; raises ConfigEntryError naming the field."""
    if raw is None:
        return {}
    return OVERRIDES(raw)


def compile_chain(
    service: str,
    datacenter: str,
    entries: Entries,
    *,
    trust_domain: str,
    namespace: str = DEFAULT_NAMESPACE,
    use_in_datacenter: str | None = None,
    override_protocol: str = "",
    override_connect_timeout: str = "",
    override_mesh_gateway: dict | None = None,
    lenient: bool = False,
) -> dict:
    """The compiled chain for `service` as seen from `datacenter`, as Consul's
    `{"Chain": ...}` inner object.

    `entries` maps kind -> name -> canonical entry (see
    `meshproto.config_entries.decode_entry`). `use_in_datacenter` is where
    the caller runs (mesh gateways are never used for targets there; default
    `datacenter`). `lenient` lets a subset be named before its service has a
    resolver (write-time validation only); otherwise that is a ChainError.
    """
    c = _Compiler(
        service,
        datacenter,
        entries,
        trust_domain=trust_domain,
        namespace=namespace or DEFAULT_NAMESPACE,
        use_in_datacenter=use_in_datacenter or datacenter,
        override_protocol=(override_protocol or "").lower(),
        override_connect_timeout=override_connect_timeout or "",
        override_mesh_gateway=override_mesh_gateway or {},
        lenient=lenient,
    )
    return c.compile()


class _Compiler:
    def __init__(self, service: str, datacenter: str, entries: Entries, **opts: Any) -> None:
        self.service = service
        self.datacenter = datacenter
        self.entries = entries
        self.trust_domain: str = opts["trust_domain"]
        self.namespace: str = opts["namespace"]
        self.use_in_datacenter: str = opts["use_in_datacenter"]
        self.override_protocol: str = opts["override_protocol"]
        self.override_connect_timeout: str = opts["override_connect_timeout"]
        if self.override_connect_timeout and parse_duration(self.override_connect_timeout) <= 0:
            self.override_connect_timeout = ""
        self.override_mesh_gateway: dict = {
            k: v for k, v in opts["override_mesh_gateway"].items() if v
        }
        self.lenient: bool = opts["lenient"]
        self.nodes: dict[str, dict] = {}
        self.targets: dict[str, dict] = {}
        self.protocol: str | None = None
        self.uses_advanced_routing = False
        # An L4 override means: no routers, no splitters (Consul's documented behaviour).
        self.advanced_disabled = bool(
            self.override_protocol and self.override_protocol not in HTTP_PROTOCOLS
        )
        self._splitters_visiting: list[str] = []
        self._failover_done: set[str] = set()
        self.customized: dict[str, Any] = {}

    # -- entries -------------------------------------------------------------------

    def _entry(self, kind: str, name: str) -> dict | None:
        return self.entries.get(kind, {}).get(name)

    def _record_protocol(self, service: str) -> None:
        proto, _source = protocol_of(service, self.entries)
        if self.protocol is None:
            self.protocol = proto
        elif proto != self.protocol:
            raise ChainError(
                f'discovery chain "{self.service}" uses inconsistent protocols; '
                f'service "{service}" has "{proto}" which is not "{self.protocol}"'
            )

    # -- compile -------------------------------------------------------------------

    def compile(self) -> dict:
        self._record_protocol(self.service)
        start = None if self.advanced_disabled else self._router_node(self.service)
        if start is None:
            start = self._splitter_or_resolver(self._target(self.service))
        protocol = self.protocol or "tcp"
        if self.uses_advanced_routing and protocol not in HTTP_PROTOCOLS:
            raise ChainError(
                f'discovery chain "{self.service}" uses a protocol "{protocol}" that does not '
                "permit advanced routing or splitting behavior"
            )
        if self.override_protocol and self.override_protocol != protocol:
            protocol = self.override_protocol
            self.customized["Protocol"] = protocol
        if self.override_connect_timeout:
            self.customized["ConnectTimeout"] = self.override_connect_timeout
        if self.override_mesh_gateway:
            self.customized["MeshGateway"] = self.override_mesh_gateway
        start_key = _key(start)
        self._flatten_splitters()
        nodes = self._reachable(start_key)
        targets = self._used_targets(nodes)
        chain: dict[str, Any] = {
            "ServiceName": self.service,
            "Namespace": self.namespace,
            "Datacenter": self.datacenter,
        }
        if self.customized:
            digest = hashlib.sha256(json.dumps(self.customized, sort_keys=True).encode())
            chain["CustomizationHash"] = digest.hexdigest()[:8]
        chain.update(
            {
                "Protocol": protocol,
                "StartNode": start_key,
                "Nodes": {k: nodes[k] for k in sorted(nodes)},
                "Targets": {t: self.targets[t] for t in sorted(targets)},
            }
        )
        return chain

    def _target(self, service: str, subset: str = "", namespace: str = "") -> Target:
        return Target(service, subset, namespace or self.namespace, self.datacenter)

    def _router_node(self, service: str) -> dict | None:
        router = self._entry("service-router", service)
        if router is None:
            return None
        self.uses_advanced_routing = True
        node: dict[str, Any] = {"Type": "router", "Name": service, "Routes": []}
        self.nodes[_key(node)] = node
        routes = [copy.deepcopy(r) for r in router.get("Routes", [])]
        # The implicit last route: everything else goes to the service itself.
        routes.append({"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"Service": service}})
        for route in routes:
            dest = route.setdefault("Destination", {"Service": service})
            target = self._target(
                dest.get("Service") or service,
                dest.get("ServiceSubset", ""),
                dest.get("Namespace", ""),
            )
            if target.subset:
                nxt = self._resolver_node(target)
            else:
                nxt = self._splitter_or_resolver(target)
            node["Routes"].append({"Definition": route, "NextNode": _key(nxt)})
        return node

    def _splitter_or_resolver(self, target: Target) -> dict:
        if not self.advanced_disabled:
            node = self._splitter_node(target.service, target.namespace)
            if node is not None:
                return node
        return self._resolver_node(target)

    def _splitter_node(self, service: str, namespace: str) -> dict | None:
        splitter = self._entry("service-splitter", service)
        if splitter is None:
            return None
        key = f"splitter:{service}"
        if service in self._splitters_visiting:
            loop = self._splitters_visiting[self._splitters_visiting.index(service) :] + [service]
            raise ChainError("service-splitter loop: " + " -> ".join(f'"{s}"' for s in loop))
        if key in self.nodes:
            return self.nodes[key]
        self.uses_advanced_routing = True
        node: dict[str, Any] = {"Type": "splitter", "Name": service, "Splits": []}
        self._splitters_visiting.append(service)
        try:
            for split in splitter.get("Splits", []):
                svc = split.get("Service") or service
                ns = split.get("Namespace") or namespace
                subset = split.get("ServiceSubset", "")
                compiled: dict[str, Any] = {"Weight": split["Weight"], "NextNode": ""}
                if svc != service and not subset:
                    nested = self._splitter_node(svc, ns)
                    if nested is not None:
                        compiled["NextNode"] = _key(nested)
                        node["Splits"].append(compiled)
                        continue
                resolved = self._resolver_node(self._target(svc, subset, ns))
                compiled["NextNode"] = _key(resolved)
                compiled["Definition"] = copy.deepcopy(split)
                node["Splits"].append(compiled)
                lb = resolved.get("LoadBalancer")
                if (
                    "LoadBalancer" not in node
                    and lb
                    and lb.get("Policy") in ("ring_hash", "maglev")
                ):
                    node["LoadBalancer"] = copy.deepcopy(lb)
        finally:
            self._splitters_visiting.pop()
        self.nodes[key] = node
        return node

    def _resolver_node(self, target: Target, for_failover: bool = False) -> dict:
        history: list[str] = []
        while True:
            if target.id in history:
                raise ChainError(
                    "detected circular resolver redirect: " + " -> ".join(history + [target.id])
                )
            history.append(target.id)
            cached = self.nodes.get(f"resolver:{target.id}")
            if cached is not None:
                if not for_failover:
                    # First built as some other target's failover: now it is a
                    # primary, so it gets its own failover too.
                    self._attach_failover(cached, target)
                return cached
            resolver = self._entry("service-resolver", target.service)
            redirect = (resolver or {}).get("Redirect")
            if redirect:
                redirected = target.rewrite(
                    redirect.get("Service", ""),
                    redirect.get("ServiceSubset", ""),
                    redirect.get("Namespace", ""),
                    redirect.get("Datacenter", ""),
                )
                if redirected.id != target.id:
                    target = redirected
                    continue
            if not target.subset and resolver and resolver.get("DefaultSubset"):
                target = target.rewrite(subset=resolver["DefaultSubset"])
                continue
            break

        subsets = (resolver or {}).get("Subsets", {})
        subset_def: dict = {}
        if target.subset:
            if target.subset in subsets:
                subset_def = copy.deepcopy(subsets[target.subset])
            elif resolver is None and self.lenient:
                pass  # written before its resolver: checked when the resolver is written
            elif resolver is None:
                raise ChainError(
                    f'service "{target.service}" has no service-resolver, so its subset '
                    f'"{target.subset}" is not defined'
                )
            else:
                raise ChainError(
                    f'service "{target.service}" does not have a subset named "{target.subset}"'
                )
        self._record_protocol(target.service)

        timeout = self.override_connect_timeout or (resolver or {}).get("ConnectTimeout", "")
        if not timeout or parse_duration(timeout) <= 0:
            timeout = DEFAULT_CONNECT_TIMEOUT
        info: dict[str, Any] = {"ConnectTimeout": timeout}
        if resolver is None:
            info["Default"] = True
        info["Target"] = target.id
        if (resolver or {}).get("RequestTimeout"):
            info["RequestTimeout"] = resolver["RequestTimeout"]
        node: dict[str, Any] = {"Type": "resolver", "Name": target.id, "Resolver": info}
        if (resolver or {}).get("LoadBalancer"):
            node["LoadBalancer"] = copy.deepcopy(resolver["LoadBalancer"])
        self.targets[target.id] = self._target_json(target, subset_def, timeout)
        self.nodes[_key(node)] = node

        if not for_failover:
            self._attach_failover(node, target)
        return node

    def _attach_failover(self, node: dict, target: Target) -> None:
        """Resolve `node`'s failover targets (once); they get no failover of their own."""
        key = _key(node)
        if key in self._failover_done:
            return
        self._failover_done.add(key)
        resolver = self._entry("service-resolver", target.service) or {}
        failover = resolver.get("Failover", {})
        policy = failover.get(target.subset) if target.subset else None
        policy = policy or failover.get("*")
        if not policy:
            return
        ids: list[str] = []
        for candidate in self._failover_targets(target, policy):
            resolved = self._resolver_node(candidate, for_failover=True)
            tid = resolved["Resolver"]["Target"]
            if tid != target.id and tid not in ids:
                ids.append(tid)
        if ids:
            node["Resolver"]["Failover"] = {"Targets": ids}

    @staticmethod
    def _failover_targets(target: Target, policy: dict) -> list[Target]:
        if policy.get("Targets"):
            found = [
                target.rewrite(
                    t.get("Service", ""),
                    t.get("ServiceSubset", ""),
                    t.get("Namespace", ""),
                    t.get("Datacenter", ""),
                )
                for t in policy["Targets"]
            ]
        elif policy.get("Datacenters"):
            found = [
                target.rewrite(
                    policy.get("Service", ""),
                    policy.get("ServiceSubset", ""),
                    policy.get("Namespace", ""),
                    dc,
                )
                for dc in policy["Datacenters"]
            ]
        else:
            found = [
                target.rewrite(
                    policy.get("Service", ""),
                    policy.get("ServiceSubset", ""),
                    policy.get("Namespace", ""),
                )
            ]
        return [t for t in found if t.id != target.id]

    def _mesh_gateway(self, target: Target) -> dict:
        if target.datacenter == self.use_in_datacenter:
            return {}  # gateways carry traffic between datacenters only
        if self.override_mesh_gateway.get("Mode"):
            return {"Mode": self.override_mesh_gateway["Mode"]}
        sd = self._entry("service-defaults", target.service) or {}
        if sd.get("MeshGateway", {}).get("Mode"):
            return {"Mode": sd["MeshGateway"]["Mode"]}
        pd = self._entry("proxy-defaults", PROXY_DEFAULTS_NAME) or {}
        if pd.get("MeshGateway", {}).get("Mode"):
            return {"Mode": pd["MeshGateway"]["Mode"]}
        return {}

    def _target_json(self, target: Target, subset_def: dict, timeout: str) -> dict:
        out: dict[str, Any] = {"ID": target.id, "Service": target.service}
        if target.subset:
            out["ServiceSubset"] = target.subset
        out.update(
            {
                "Namespace": target.namespace,
                "Datacenter": target.datacenter,
                "MeshGateway": self._mesh_gateway(target),
                "Subset": subset_def,
                "ConnectTimeout": timeout,
            }
        )
        sni = target_sni(target.id, self.trust_domain)
        external = (self._entry("service-defaults", target.service) or {}).get("ExternalSNI")
        if external:
            out["External"] = True
            out["SNI"] = external
        else:
            out["SNI"] = sni
        out["Name"] = sni
        return out

    # -- finishing -----------------------------------------------------------------

    def _flatten_splitters(self) -> None:
        """A split that leads to another splitter becomes that splitter's splits,
        weights multiplied (90% of a 50/50 split is two 45% splits)."""

        def flat(node: dict) -> list[dict]:
            out: list[dict] = []
            for split in node["Splits"]:
                nxt = self.nodes[split["NextNode"]]
                if nxt["Type"] != "splitter":
                    out.append(split)
                    continue
                for inner in flat(nxt):
                    weight = round(split["Weight"] * inner["Weight"] / 100, 6)
                    merged = {**inner, "Weight": int(weight) if weight.is_integer() else weight}
                    out.append(merged)
            return out

        for node in list(self.nodes.values()):
            if node["Type"] == "splitter":
                node["_flat"] = flat(node)
        for node in self.nodes.values():
            if node["Type"] == "splitter":
                node["Splits"] = node.pop("_flat")

    def _reachable(self, start: str) -> dict[str, dict]:
        seen: dict[str, dict] = {}
        stack = [start]
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            node = self.nodes[key]
            seen[key] = node
            for route in node.get("Routes", []):
                stack.append(route["NextNode"])
            for split in node.get("Splits", []):
                stack.append(split["NextNode"])
        return seen

    @staticmethod
    def _used_targets(nodes: dict[str, dict]) -> set[str]:
        used: set[str] = set()
        for node in nodes.values():
            info = node.get("Resolver")
            if info:
                used.add(info["Target"])
                used.update(info.get("Failover", {}).get("Targets", []))
        return used


def _key(node: dict) -> str:
    return f"{node['Type']}:{node['Name']}"


__all__ = [
    "ChainError",
    "ConfigEntryError",
    "OVERRIDES",
    "Target",
    "compile_chain",
    "decode_overrides",
    "target_sni",
]
