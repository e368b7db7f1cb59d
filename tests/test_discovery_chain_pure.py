"""The discovery-chain compiler against golden files (pure: no database, no server).

Each case is a set of config entries and a compile request; the expected
chain is `tests/golden/discovery_chain/<case>.json`. After a deliberate
change of the compiler, regenerate with `MESH_UPDATE_GOLDEN=1 pytest
tests/test_discovery_chain_pure.py` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from meshproto.config_entries import decode_entry
from meshproto.discovery_chain import ChainError, compile_chain, decode_overrides

GOLDEN = Path(__file__).parent / "golden" / "discovery_chain"
TRUST_DOMAIN = "7f3c2a10-5b7e-4c3d-9a1e-2b4c6d8e0f12.mesh"


def entries(*raw: dict) -> dict:
    out: dict = {}
    for r in raw:
        e = decode_entry(r)
        out.setdefault(e["Kind"], {})[e["Name"]] = {
            k: v for k, v in e.items() if k not in ("Kind", "Name")
        }
    return out


HTTP_GLOBAL = {"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}}

CASES: dict[str, dict] = {
    # No entries: one default resolver, TCP.
    "default_tcp": {"service": "web", "entries": []},
    # Consul's documented "HTTP Path Routing" compilation.
    "http_path_routing": {
        "service": "web",
        "entries": [
            {
                "Kind": "service-resolver",
                "Name": "web",
                "Subsets": {"canary": {"Filter": "Service.Meta.flavor == canary"}},
            },
            HTTP_GLOBAL,
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [
                    {
                        "Match": {"HTTP": {"PathPrefix": "/admin"}},
                        "Destination": {
                            "Service": "admin",
                            "PrefixRewrite": "/",
                            "RequestTimeout": "15s",
                        },
                    },
                    {
                        "Match": {"HTTP": {"Header": [{"Name": "x-debug", "Exact": "1"}]}},
                        "Destination": {
                            "Service": "web",
                            "ServiceSubset": "canary",
                            "NumRetries": 5,
                            "RetryOnConnectFailure": True,
                            "RetryOnStatusCodes": [401, 409],
                        },
                    },
                ],
            },
        ],
    },
    # router -> splitter -> resolver with subsets, a default subset and failover.
    "router_splitter_resolver_failover": {
        "service": "web",
        "entries": [
            HTTP_GLOBAL,
            {
                "Kind": "service-resolver",
                "Name": "web",
                "ConnectTimeout": "3s",
                "RequestTimeout": "20s",
                "DefaultSubset": "v1",
                "Subsets": {
                    "v1": {"Filter": "Service.Meta.version == v1", "OnlyPassing": True},
                    "v2": {"Filter": "Service.Meta.version == v2"},
                },
                "Failover": {
                    "*": {"Datacenters": ["dc2", "dc3"]},
                    "v2": {"ServiceSubset": "v1"},
                },
            },
            {
                "Kind": "service-resolver",
                "Name": "admin",
                "LoadBalancer": {
                    "Policy": "ring_hash",
                    "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}],
                },
            },
            {
                "Kind": "service-splitter",
                "Name": "web",
                "Splits": [
                    {"Weight": 90, "ServiceSubset": "v1"},
                    {
                        "Weight": 10,
                        "ServiceSubset": "v2",
                        "RequestHeaders": {"Set": {"x-canary": "1"}},
                    },
                ],
            },
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [
                    {
                        "Match": {"HTTP": {"PathPrefix": "/admin", "Methods": ["GET"]}},
                        "Destination": {"Service": "admin", "RequestTimeout": "5s"},
                    },
                    {
                        "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Present": True}]}},
                        "Destination": {"ServiceSubset": "v2", "NumRetries": 3},
                    },
                ],
            },
        ],
    },
    # Consul's documented "Multi-Datacenter Failover".
    "multi_dc_failover": {
        "service": "web",
        "entries": [
            {
                "Kind": "service-resolver",
                "Name": "web",
                "ConnectTimeout": "15s",
                "Failover": {"*": {"Datacenters": ["dc3", "dc4"]}},
            }
        ],
    },
    # Consul's documented "Datacenter Redirect with Overrides".
    "redirect_with_overrides": {
        "service": "web",
        "entries": [{"Kind": "service-resolver", "Name": "web", "Redirect": {"Datacenter": "dc2"}}],
        "overrides": {
            "OverrideConnectTimeout": "7s",
            "OverrideProtocol": "grpc",
            "OverrideMeshGateway": {"Mode": "remote"},
        },
    },
    # Consul's documented "Version Split For Alternate Datacenter" (compile-dc=dc2).
    "version_split_compile_dc": {
        "service": "web",
        "datacenter": "dc2",
        "entries": [
            {
                "Kind": "service-resolver",
                "Name": "web",
                "DefaultSubset": "v1",
                "Subsets": {
                    "v1": {"Filter": "Service.Meta.version == v1"},
                    "v2": {"Filter": "Service.Meta.version == v2"},
                },
            },
            {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
            {
                "Kind": "service-splitter",
                "Name": "web",
                "Splits": [
                    {"Weight": 90, "ServiceSubset": "v1"},
                    {"Weight": 10, "ServiceSubset": "v2"},
                ],
            },
        ],
    },
    # A split to a service with its own splitter is flattened (weights multiplied).
    "nested_splitters_flattened": {
        "service": "web",
        "entries": [
            HTTP_GLOBAL,
            {
                "Kind": "service-splitter",
                "Name": "web",
                "Splits": [{"Weight": 50}, {"Weight": 50, "Service": "web-next"}],
            },
            {
                "Kind": "service-splitter",
                "Name": "web-next",
                "Splits": [{"Weight": 80}, {"Weight": 20, "Service": "web-beta"}],
            },
        ],
    },
    # Failover to another service's subset, mesh gateways for remote targets,
    # and an external SNI.
    "failover_targets_and_gateways": {
        "service": "api",
        "entries": [
            {"Kind": "proxy-defaults", "Name": "global", "MeshGateway": {"Mode": "local"}},
            {"Kind": "service-defaults", "Name": "api-backup", "ExternalSNI": "backup.example.com"},
            {
                "Kind": "service-resolver",
                "Name": "api-backup",
                "Subsets": {"stable": {"Filter": "Service.Tags contains stable"}},
            },
            {
                "Kind": "service-resolver",
                "Name": "api",
                "Failover": {
                    "*": {
                        "Targets": [
                            {"Datacenter": "dc2"},
                            {"Service": "api-backup", "ServiceSubset": "stable"},
                        ]
                    }
                },
            },
        ],
    },
    # An L4 override: the router and splitter are left out.
    "tcp_override_drops_routing": {
        "service": "web",
        "entries": [
            HTTP_GLOBAL,
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [
                    {
                        "Match": {"HTTP": {"PathPrefix": "/a"}},
                        "Destination": {"Service": "a"},
                    }
                ],
            },
        ],
        "overrides": {"OverrideProtocol": "tcp"},
    },
}


def compile_case(case: dict) -> dict:
    overrides = decode_overrides(case.get("overrides"))
    return compile_chain(
        case["service"],
        case.get("datacenter", "dc1"),
        entries(*case["entries"]),
        trust_domain=TRUST_DOMAIN,
        use_in_datacenter="dc1",
        override_protocol=overrides.get("OverrideProtocol", ""),
        override_connect_timeout=overrides.get("OverrideConnectTimeout", ""),
        override_mesh_gateway=overrides.get("OverrideMeshGateway"),
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_compiled_chain_matches_its_golden_file(name):
    chain = compile_case(CASES[name])
    path = GOLDEN / f"{name}.json"
    if os.environ.get("MESH_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"Chain": chain}, indent=2) + "\n")
    assert {"Chain": chain} == json.loads(path.read_text())


def test_router_splitter_resolver_chain_reads_as_the_sidecar_will_walk_it():
    chain = compile_case(CASES["router_splitter_resolver_failover"])
    assert chain["StartNode"] == "router:web"
    routes = chain["Nodes"]["router:web"]["Routes"]
    assert [r["NextNode"] for r in routes] == [
        "resolver:admin.default.dc1",
        "resolver:v2.web.default.dc1",
        "splitter:web",
    ]
    splits = chain["Nodes"]["splitter:web"]["Splits"]
    assert [(s["Weight"], s["NextNode"]) for s in splits] == [
        (90, "resolver:v1.web.default.dc1"),
        (10, "resolver:v2.web.default.dc1"),
    ]
    v1 = chain["Nodes"]["resolver:v1.web.default.dc1"]["Resolver"]
    assert v1["Failover"] == {"Targets": ["v1.web.default.dc2", "v1.web.default.dc3"]}
    v2 = chain["Nodes"]["resolver:v2.web.default.dc1"]["Resolver"]
    assert v2["Failover"] == {"Targets": ["v1.web.default.dc1"]}
    assert (
        chain["Targets"]["v1.web.default.dc1"]["SNI"]
        == f"v1.web.default.dc1.internal.{TRUST_DOMAIN}"
    )
    assert chain["Targets"]["v1.web.default.dc1"]["Subset"] == {
        "Filter": "Service.Meta.version == v1",
        "OnlyPassing": True,
    }


def test_nested_splits_multiply_their_weights():
    chain = compile_case(CASES["nested_splitters_flattened"])
    splits = chain["Nodes"]["splitter:web"]["Splits"]
    assert [(s["Weight"], s["NextNode"]) for s in splits] == [
        (50, "resolver:web.default.dc1"),
        (40, "resolver:web-next.default.dc1"),
        (10, "resolver:web-beta.default.dc1"),
    ]
    assert "splitter:web-next" not in chain["Nodes"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            [
                {
                    "Kind": "service-splitter",
                    "Name": "web",
                    "Splits": [{"Weight": 100, "ServiceSubset": "v9"}],
                },
                HTTP_GLOBAL,
            ],
            'service "web" has no service-resolver, so its subset "v9" is not defined',
        ),
        (
            [
                {"Kind": "service-resolver", "Name": "web", "Subsets": {"v1": {}}},
                {
                    "Kind": "service-splitter",
                    "Name": "web",
                    "Splits": [{"Weight": 100, "ServiceSubset": "v9"}],
                },
                HTTP_GLOBAL,
            ],
            'service "web" does not have a subset named "v9"',
        ),
        (
            [
                {
                    "Kind": "service-router",
                    "Name": "web",
                    "Routes": [{"Match": {"HTTP": {"PathPrefix": "/"}}}],
                }
            ],
            'discovery chain "web" uses a protocol "tcp" that does not permit advanced routing',
        ),
    ],
)
def test_chains_that_cannot_compile_say_why(raw, message):
    with pytest.raises(ChainError, match=message):
        compile_chain("web", "dc1", entries(*raw), trust_domain=TRUST_DOMAIN)
