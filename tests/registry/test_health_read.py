"""The health read's one-statement path gives exactly the full shapes of the models.

`reads.health_service` reads rows in plain SQL and builds Consul's shapes
from them; here the same answer is built from the ORM's models through the
same shape functions, and both are compared as the bytes a client gets.
"""

from __future__ import annotations

import json

import pytest

from registry import decode
from registry.acl_rules import Authorizer
from registry.domain import catalog, reads, shapes
from registry.models import Check, Node, ServiceInstance

pytestmark = pytest.mark.django_db


def _catalog_register(data: dict) -> None:
    spec = decode.CATALOG_REGISTER(data)
    catalog.catalog_register(spec, catalog.stored_for_catalog(spec))


def _populate() -> None:
    local = catalog.ensure_local_node()
    catalog.register_agent_service(
        local,
        {
            "Name": "api",
            "ID": "api-1",
            "Port": 9000,
            "Tags": ["api", "primary", "é"],
            "Meta": {"version": "2", "owner": "teäm"},
            "Weights": {"Passing": 3, "Warning": 2},
            "Checks": [
                {"CheckID": "api-ttl", "TTL": "30m", "Notes": "ttl"},
                {"CheckID": "api-http", "HTTP": "http://127.0.0.1:1/h", "Interval": "10s"},
            ],
            "Connect": {
                "SidecarService": {
                    "Port": 21000,
                    "Proxy": {"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}]},
                }
            },
        },
    )
    for n in range(3):
        _catalog_register(
            {
                "Node": f"node-{n}",
                "Address": f"10.0.0.{n + 1}",
                "NodeMeta": {"rack": f"r{n % 2}"},
                "TaggedAddresses": {"wan": f"192.0.2.{n + 1}"} if n % 2 else {},
                "Check": {
                    "CheckID": "serfHealth",
                    "Name": "Serf Health Status",
                    "Status": "critical" if n == 2 else "passing",
                },
                "Service": {
                    "ID": f"api-{n + 2}",
                    "Service": "api",
                    "Port": 8000 + n,
                    "Address": f"10.1.0.{n}" if n else "",
                    "Tags": ["api", f"v{n}"] if n != 1 else [],
                    "Meta": {"version": str(n)},
                    "TaggedAddresses": {"lan": {"Address": "10.9.9.9", "Port": 1}}
                    if n == 0
                    else {},
                    "EnableTagOverride": n == 1,
                },
                "Checks": [
                    {
                        "CheckID": f"service:api-{n + 2}",
                        "Name": "svc",
                        "Status": ["passing", "warning", "passing"][n],
                        "ServiceID": f"api-{n + 2}",
                        "Output": "out ü",
                        "Definition": {"HTTP": "http://x/h", "Interval": "15s", "Timeout": "1s"},
                    }
                ],
            }
        )


def _full_shapes(name: str, *, connect: bool = False) -> list[dict]:
    """The answer built from model instances, one query per relation."""
    if connect:
        found = ServiceInstance.objects.filter(
            destination_name=name
        ) | ServiceInstance.objects.filter(name=name, connect__Native=True)
    else:
        found = ServiceInstance.objects.filter(name=name)
    out = []
    for s in found.select_related("node__datacenter").order_by("node__name", "service_id"):
        checks = list(Check.objects.filter(node=s.node, service_id="").order_by("check_id")) + list(
            Check.objects.filter(node=s.node, service_id=s.service_id).order_by("check_id")
        )
        out.append(
            {
                "Node": shapes.node_json(s.node),
                "Service": shapes.agent_service_json(s, with_index=True),
                "Checks": [shapes.check_json(c, s.node.name) for c in checks],
            }
        )
    return out


def _bytes(data) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def test_the_health_read_is_byte_for_byte_the_full_shape_of_its_models():
    _populate()
    authz = Authorizer.management()
    index, fast = reads.health_service(authz, "api", "dc1")
    assert [e["Service"]["ID"] for e in fast] == ["api-1", "api-2", "api-3", "api-4"]
    assert index >= max(s.modify_index for s in ServiceInstance.objects.filter(name="api"))
    assert _bytes(fast) == _bytes(_full_shapes("api"))
    # Every instance's checks: the node's own first, then its own, each by check ID.
    by_id = {e["Service"]["ID"]: [c["CheckID"] for c in e["Checks"]] for e in fast}
    assert by_id["api-1"] == ["serfHealth", "api-http", "api-ttl"]
    assert by_id["api-4"] == ["serfHealth", "service:api-4"]

    _, proxies = reads.health_service(authz, "api", "dc1", connect=True)
    assert [e["Service"]["ID"] for e in proxies] == ["api-1-sidecar-proxy"]
    assert proxies[0]["Service"]["Proxy"]["Upstreams"][0]["DestinationName"] == "db"
    assert _bytes(proxies) == _bytes(_full_shapes("api", connect=True))


def test_filters_select_from_the_same_shapes():
    _populate()
    authz = Authorizer.management()
    full = {e["Service"]["ID"]: e for e in _full_shapes("api")}
    _, tagged = reads.health_service(authz, "api", "dc1", tags=["api", "v0"])
    assert _bytes(tagged) == _bytes([full["api-2"]])
    _, passing = reads.health_service(authz, "api", "dc1", passing=True)
    # api-1's HTTP check has not run (critical), api-3 warns, api-4's node is critical.
    assert [e["Service"]["ID"] for e in passing] == ["api-2"]
    _, racked = reads.health_service(authz, "api", "dc1", node_meta={"rack": "r1"})
    assert _bytes(racked) == _bytes([full["api-3"]])


def test_shared_decoded_values_do_not_leak_between_answers():
    """Equal tags and meta are decoded once and shared: changing one answer must
    not change the next."""
    _populate()
    authz = Authorizer.management()
    _, first = reads.health_service(authz, "api", "dc1")
    first[1]["Service"]["Tags"].append("changed")
    first[1]["Service"]["Meta"]["version"] = "changed"
    first[1]["Node"]["Meta"]["rack"] = "changed"
    _, second = reads.health_service(authz, "api", "dc1")
    assert _bytes(second) == _bytes(_full_shapes("api"))


def test_a_missing_datacenter_is_404_for_the_api_and_empty_for_other_readers():
    from registry.errors import NotFound

    _populate()
    authz = Authorizer.management()
    assert reads.health_service(authz, "api", "nowhere")[1] == []
    with pytest.raises(NotFound, match='No path to datacenter "nowhere"'):
        reads.health_service(authz, "api", "nowhere", require_dc=True)
    assert Node.objects.filter(name="node-0").exists()
