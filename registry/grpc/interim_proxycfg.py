"""INTERIM — delete when `registry.domain.proxycfg.compile_proxy` lands.

A minimal proxy-config compile with the real one's signature, so that the
config stream can be built and tested before the compiler exists:
`compile_proxy(node_name, proxy_id) -> (ProxyConfig, topics)`. It knows the
catalog (inbound, TCP upstreams with their healthy sidecar endpoints),
intentions and roots; no discovery chains, routes or config entries.
`registry.grpc.streams` imports the real one when it is there.
"""

from __future__ import annotations

from meshproto import proxycfg, spiffe
from registry.domain import catalog, connect_ca, intentions
from registry.domain.txn import current_index
from registry.errors import NotFound
from registry.models import Check, Intention, ServiceInstance


def _endpoints(service: str, dc: str) -> tuple[proxycfg.Endpoint, ...]:
    instances = list(
        catalog.instances_query(service, connect=True, dc=dc).filter(kind="connect-proxy")
    )
    checks = catalog.checks_for(instances)
    out = []
    for inst in instances:
        status = catalog.aggregate_status(c.status for c in checks.get(inst.pk, []))
        if status == Check.CRITICAL:
            continue
        out.append(
            proxycfg.Endpoint(
                address=inst.address or inst.node.address,
                port=inst.port,
                node=inst.node.name,
                service_id=inst.service_id,
                health=status,
            )
        )
    return tuple(out)


def compile_proxy(node_name: str, proxy_id: str) -> tuple[proxycfg.ProxyConfig, set[str]]:
    proxy = (
        ServiceInstance.objects.select_related("node__datacenter")
        .filter(node__name=node_name, service_id=proxy_id, kind="connect-proxy")
        .first()
    )
    if proxy is None:
        raise NotFound(f'no proxy "{proxy_id}" on node "{node_name}"')
    version = current_index()
    td = connect_ca.trust_domain()
    dc = proxy.node.datacenter.name
    service = proxy.destination_name
    p = proxy.proxy or {}
    topics = {
        f"node:{node_name}",
        f"service:{proxy.name}",
        "ca-roots",
        intentions.TOPIC,
        *intentions.MESH_TOPICS,
    }
    upstreams = []
    for u in p.get("Upstreams") or []:
        dest = u.get("DestinationName") or ""
        if not dest:
            continue
        topics.update({f"connect:{dest}", f"service:{dest}"})
        cluster = proxycfg.Cluster(
            name=f"{dest}.default.{dc}",
            service=dest,
            datacenter=dc,
            spiffe_id=spiffe.service_id(td, dest, dc).uri,
            sni=spiffe.gateway_sni(dest, "default", dc, td),
            endpoints=_endpoints(dest, dc),
        )
        upstreams.append(
            proxycfg.Upstream(
                destination=dest,
                local_bind_address=u.get("LocalBindAddress") or "127.0.0.1",
                local_bind_port=int(u.get("LocalBindPort") or 0),
                datacenter=dc,
                clusters=(cluster,),
            )
        )
    rows = Intention.objects.filter(destination_name__in=[service, "*"])
    _index, roots = connect_ca.roots_json()
    config = proxycfg.ProxyConfig(
        version=version,
        proxy_id=proxy_id,
        service=service,
        service_id=p.get("DestinationServiceID") or service,
        node=node_name,
        datacenter=dc,
        trust_domain=td,
        spiffe_id=spiffe.service_id(td, service, dc).uri,
        inbound=proxycfg.Inbound(
            bind_address=proxy.address or proxy.node.address,
            port=proxy.port,
            local_app_address=p.get("LocalServiceAddress") or "127.0.0.1",
            local_app_port=int(p.get("LocalServicePort") or 0),
        ),
        upstreams=tuple(upstreams),
        intentions=tuple(intentions.intention_json(r) for r in rows),
        default_allow=intentions.default_allow(),
        roots=tuple(r["RootCert"] for r in sorted(roots["Roots"], key=lambda r: not r["Active"])),
    )
    return config, topics
