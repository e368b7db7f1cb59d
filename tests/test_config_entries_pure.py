"""Config entry decoding and cross-entry rules (pure: no database, no server)."""

from __future__ import annotations

import pytest

from meshproto.config_entries import (
    ConfigEntryError,
    decode_entry,
    format_duration,
    parse_duration,
    protocol_of,
    subset_references,
    validate_graph,
)


def entries(*raw: dict) -> dict:
    out: dict = {}
    for r in raw:
        e = decode_entry(r)
        out.setdefault(e["Kind"], {})[e["Name"]] = {
            k: v for k, v in e.items() if k not in ("Kind", "Name")
        }
    return out


def refused(raw: dict) -> str:
    with pytest.raises(ConfigEntryError) as err:
        decode_entry(raw)
    return str(err.value)


# --------------------------------------------------------------------------- decoding


def test_it_accepts_consul_names_in_any_case_and_snake_case():
    e = decode_entry(
        {
            "kind": "service-router",
            "NAME": "web",
            "routes": [
                {
                    "match": {"http": {"path_prefix": "/admin", "methods": ["get", "POST"]}},
                    "destination": {
                        "service": "admin",
                        "prefix_rewrite": "/",
                        "request_timeout": "15s",
                        "retry_on_status_codes": [503],
                        "request_headers": {"set": {"X-From": "mesh"}},
                    },
                }
            ],
        }
    )
    assert e == {
        "Kind": "service-router",
        "Name": "web",
        "Routes": [
            {
                "Match": {"HTTP": {"PathPrefix": "/admin", "Methods": ["GET", "POST"]}},
                "Destination": {
                    "Service": "admin",
                    "PrefixRewrite": "/",
                    "RequestTimeout": "15s",
                    "RetryOnStatusCodes": [503],
                    "RequestHeaders": {"Set": {"X-From": "mesh"}},
                },
            }
        ],
    }


def test_it_keeps_user_map_keys_exactly():
    e = decode_entry(
        {
            "Kind": "service-resolver",
            "Name": "web",
            "Subsets": {"v1": {"Filter": "x"}},
            "Meta": {"Owner_Team": "Payments"},
        }
    )
    assert e["Subsets"] == {"v1": {"Filter": "x"}}
    assert e["Meta"] == {"Owner_Team": "Payments"}


def test_it_takes_a_one_element_list_as_a_block_as_hcl_writes_it():
    e = decode_entry(
        {
            "Kind": "service-router",
            "Name": "web",
            "Routes": [{"Match": [{"HTTP": [{"PathExact": "/x"}]}]}],
        }
    )
    assert e["Routes"] == [{"Match": {"HTTP": {"PathExact": "/x"}}}]


def test_it_stores_durations_as_go_writes_them():
    e = decode_entry(
        {
            "Kind": "service-resolver",
            "Name": "web",
            "ConnectTimeout": "90s",
            "RequestTimeout": 2_500_000_000,
        }
    )
    assert e["ConnectTimeout"] == "1m30s"
    assert e["RequestTimeout"] == "2.5s"
    assert format_duration(parse_duration("1h")) == "1h0m0s"
    assert format_duration(parse_duration("250ms")) == "250ms"


def test_it_decodes_every_service_defaults_feature():
    e = decode_entry(
        {
            "Kind": "service-defaults",
            "Name": "api",
            "Protocol": "HTTP",
            "MeshGateway": {"Mode": "local"},
            "LocalConnectTimeoutMs": 2000,
            "MaxInboundConnections": 100,
            "UpstreamConfig": {
                "Defaults": {
                    "ConnectTimeoutMs": 5000,
                    "Limits": {
                        "MaxConnections": 10,
                        "MaxPendingRequests": 20,
                        "MaxConcurrentRequests": 30,
                    },
                    "PassiveHealthCheck": {
                        "Interval": "10s",
                        "MaxFailures": 5,
                        "EnforcingConsecutive5xx": 100,
                    },
                },
                "Overrides": [{"Name": "db", "ConnectTimeoutMs": 100}],
            },
            "RateLimits": {
                "InstanceLevel": {
                    "RequestsPerSecond": 50,
                    "RequestsMaxBurst": 100,
                    "Routes": [{"PathPrefix": "/slow", "RequestsPerSecond": 1.5}],
                }
            },
        }
    )
    assert e["Protocol"] == "http"
    assert e["UpstreamConfig"]["Defaults"]["Limits"]["MaxConcurrentRequests"] == 30
    assert e["UpstreamConfig"]["Defaults"]["PassiveHealthCheck"]["Interval"] == "10s"
    assert e["RateLimits"]["InstanceLevel"]["Routes"][0]["RequestsPerSecond"] == 1.5


def test_it_decodes_a_resolver_with_subsets_failover_and_load_balancing():
    e = decode_entry(
        {
            "Kind": "service-resolver",
            "Name": "api",
            "DefaultSubset": "v1",
            "Subsets": {
                "v1": {"Filter": "Service.Meta.version == v1", "OnlyPassing": True},
                "v2": {"Filter": "Service.Meta.version == v2"},
            },
            "Failover": {"*": {"Datacenters": ["dc2", "dc3"]}, "v2": {"ServiceSubset": "v1"}},
            "LoadBalancer": {
                "Policy": "ring_hash",
                "RingHashConfig": {"MinimumRingSize": 1024, "MaximumRingSize": 8192},
                "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}, {"SourceIP": True}],
            },
        }
    )
    assert e["Failover"]["*"] == {"Datacenters": ["dc2", "dc3"]}
    assert e["LoadBalancer"]["Policy"] == "ring_hash"


def test_mesh_entry_is_named_mesh_and_carries_allow_by_default():
    e = decode_entry(
        {"Kind": "mesh", "AllowByDefault": True, "TransparentProxy": {"MeshDestinationsOnly": True}}
    )
    assert e == {
        "Kind": "mesh",
        "Name": "mesh",
        "TransparentProxy": {"MeshDestinationsOnly": True},
        "AllowByDefault": True,
    }


def test_it_ignores_the_indexes_a_read_returned():
    e = decode_entry(
        {
            "Kind": "service-defaults",
            "Name": "web",
            "Protocol": "tcp",
            "CreateIndex": 5,
            "ModifyIndex": 9,
        }
    )
    assert e == {"Kind": "service-defaults", "Name": "web", "Protocol": "tcp"}


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"Kind": "service-default", "Name": "web"},
            "invalid config entry kind: 'service-default'",
        ),
        ({"Name": "web"}, "Kind is required"),
        ({"Kind": "service-defaults"}, "Name is required"),
        (
            {"Kind": "service-defaults", "Name": "web", "Protocl": "http"},
            "Protocl: unknown field",
        ),
        (
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [{"Match": {"HTTP": {"PathPrefx": "/"}}}],
            },
            "Routes[0].Match.HTTP.PathPrefx: unknown field",
        ),
        (
            {"Kind": "service-defaults", "Name": "web", "Protocol": "udp"},
            'Protocol: invalid value "udp": must be one of "tcp", "http", "http2", "grpc"',
        ),
        (
            {"Kind": "service-resolver", "Name": "web", "ConnectTimeout": True},
            "ConnectTimeout: expected a duration, got boolean",
        ),
        (
            {"Kind": "service-resolver", "Name": "web", "ConnectTimeout": "5 seconds"},
            'ConnectTimeout: invalid duration "5 seconds"',
        ),
        (
            {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": "ninety"}]},
            "Splits[0].Weight: expected a number, got string",
        ),
        (
            {
                "Kind": "service-splitter",
                "Name": "web",
                "Splits": [{"Weight": 90}, {"Weight": 9, "Service": "b"}],
            },
            "Splits: the weights must add up to 100, not 99",
        ),
        (
            {"Kind": "service-splitter", "Name": "web", "Splits": []},
            "Splits: at least one split is required",
        ),
        (
            {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 50}, {"Weight": 50}]},
            "Splits[1]: the destination web occurs more than once",
        ),
        (
            {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 101}]},
            "Splits[0].Weight: must be between 0 and 100, got 101",
        ),
        (
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [{"Match": {"HTTP": {"PathRegex": "/api/(v1|v2"}}}],
            },
            "Routes[0].Match.HTTP.PathRegex: invalid regular expression '/api/(v1|v2'",
        ),
        (
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [{"Match": {"HTTP": {"Header": [{"Name": "x", "Regex": "[a-"}]}}}],
            },
            "Routes[0].Match.HTTP.Header[0].Regex: invalid regular expression",
        ),
        (
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [{"Match": {"HTTP": {"PathExact": "/a", "PathPrefix": "/b"}}}],
            },
            "Routes[0].Match.HTTP: at most one of PathExact, PathPrefix or PathRegex",
        ),
        (
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [{"Match": {"HTTP": {"PathPrefix": "api"}}}],
            },
            "Routes[0].Match.HTTP.PathPrefix: must start with '/'",
        ),
        (
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [{"Match": {"HTTP": {"Methods": ["FETCH"]}}}],
            },
            "Routes[0].Match.HTTP.Methods[0]: unknown HTTP method 'FETCH'",
        ),
        (
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [{"Match": {"HTTP": {"Header": [{"Exact": "1"}]}}}],
            },
            "Routes[0].Match.HTTP.Header[0].Name: is required",
        ),
        (
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [{"Destination": {"PrefixRewrite": "/"}}],
            },
            "Routes[0].Destination.PrefixRewrite: needs Match.HTTP.PathExact or Match.HTTP.PathPrefix",
        ),
        (
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [{"Destination": {"NumRetries": -1}}],
            },
            "Routes[0].Destination.NumRetries: must be at least 0, got -1",
        ),
        (
            {"Kind": "service-resolver", "Name": "web", "DefaultSubset": "v9"},
            'DefaultSubset: "v9" is not one of the Subsets',
        ),
        (
            {"Kind": "service-resolver", "Name": "web", "Subsets": {"V_1": {}}},
            "Subsets.V_1: invalid subset name 'V_1'",
        ),
        (
            {
                "Kind": "service-resolver",
                "Name": "web",
                "Failover": {"v2": {"Datacenters": ["dc2"]}},
            },
            'Failover.v2: "v2" is neither "*" nor one of the Subsets',
        ),
        (
            {
                "Kind": "service-resolver",
                "Name": "web",
                "Redirect": {"Service": "api"},
                "Failover": {"*": {"Datacenters": ["dc2"]}},
            },
            "Redirect: Redirect and Failover cannot both be set",
        ),
        (
            {"Kind": "service-resolver", "Name": "web", "LoadBalancer": {"Policy": "fastest"}},
            'LoadBalancer.Policy: invalid value "fastest"',
        ),
        (
            {
                "Kind": "service-resolver",
                "Name": "web",
                "LoadBalancer": {"Policy": "round_robin", "HashPolicies": [{"SourceIP": True}]},
            },
            'LoadBalancer.HashPolicies: need Policy "ring_hash" or "maglev"',
        ),
        (
            {"Kind": "proxy-defaults", "Name": "web"},
            'a proxy-defaults entry must be named "global"',
        ),
        (
            {"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "udp"}},
            "Config.protocol: must be one of tcp, http, http2, grpc",
        ),
        (
            {"Kind": "service-defaults", "Name": "web", "Namespace": "team-a"},
            'Namespace: only "default" is supported',
        ),
        (
            {
                "Kind": "service-defaults",
                "Name": "web",
                "UpstreamConfig": {
                    "Defaults": {"PassiveHealthCheck": {"EnforcingConsecutive5xx": 150}}
                },
            },
            "UpstreamConfig.Defaults.PassiveHealthCheck.EnforcingConsecutive5xx: must be at most 100",
        ),
        (
            {
                "Kind": "service-defaults",
                "Name": "web",
                "RateLimits": {"InstanceLevel": {"RequestsMaxBurst": 5}},
            },
            "RateLimits.InstanceLevel.RequestsMaxBurst: needs RequestsPerSecond to be set",
        ),
        (
            {
                "Kind": "service-intentions",
                "Name": "db",
                "Sources": [{"Name": "web", "Acton": "allow"}],
            },
            "Sources[0].Acton: unknown field",
        ),
        (
            {"Kind": "mesh", "Name": "mesh", "AllowByDefault": "yes"},
            "AllowByDefault: expected a boolean, got string",
        ),
        (
            {"Kind": "service-defaults", "Name": "*"},
            "the wildcard '*' names only a service-intentions entry",
        ),
        ([{"Kind": "a"}, {"Kind": "b"}], "body: expected a config entry (an object), got list"),
    ],
)
def test_it_refuses_bad_input_naming_the_field(raw, message):
    assert message in refused(raw)


def test_a_split_within_a_hundredth_of_a_hundred_adds_up():
    e = decode_entry(
        {
            "Kind": "service-splitter",
            "Name": "web",
            "Splits": [
                {"Weight": 33.33, "ServiceSubset": "a"},
                {"Weight": 33.33, "ServiceSubset": "b"},
                {"Weight": 33.34, "ServiceSubset": "c"},
            ],
        }
    )
    assert [s["Weight"] for s in e["Splits"]] == [33.33, 33.33, 33.34]
    assert "not 99.99" in refused(
        {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 99.99}]}
    )


# --------------------------------------------------------------------------- cross-entry rules


def test_the_protocol_comes_from_service_defaults_then_proxy_defaults_then_tcp():
    e = entries(
        {"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}},
        {"Kind": "service-defaults", "Name": "db", "Protocol": "tcp"},
    )
    assert protocol_of("db", e) == ("tcp", 'service-defaults "db"')
    assert protocol_of("web", e) == ("http", 'proxy-defaults "global"')
    assert protocol_of("web", {})[0] == "tcp"


def test_a_router_on_a_tcp_service_is_refused_naming_both():
    e = entries(
        {
            "Kind": "service-router",
            "Name": "web",
            "Routes": [{"Match": {"HTTP": {"PathPrefix": "/a"}}}],
        }
    )
    with pytest.raises(ConfigEntryError) as err:
        validate_graph(e)
    assert str(err.value) == (
        'service-router "web" needs an HTTP-family protocol (http, http2 or grpc), but service '
        '"web" has protocol "tcp" from the default (no service-defaults or proxy-defaults sets one)'
    )


def test_a_route_to_a_subset_the_resolver_lacks_is_refused():
    e = entries(
        {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
        {
            "Kind": "service-resolver",
            "Name": "web",
            "Subsets": {"v1": {"Filter": "Service.Meta.v == 1"}},
        },
        {
            "Kind": "service-router",
            "Name": "web",
            "Routes": [
                {"Match": {"HTTP": {"PathPrefix": "/b"}}, "Destination": {"ServiceSubset": "v2"}}
            ],
        },
    )
    with pytest.raises(ConfigEntryError, match='service "web" does not have a subset named "v2"'):
        validate_graph(e)


def test_a_subset_may_be_named_before_its_resolver_exists():
    e = entries(
        {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
        {
            "Kind": "service-splitter",
            "Name": "web",
            "Splits": [{"Weight": 100, "ServiceSubset": "v2"}],
        },
    )
    validate_graph(e)
    assert subset_references("web", e) == ['service-splitter "web" Splits[0]']


def test_services_of_one_chain_must_share_a_protocol():
    e = entries(
        {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
        {"Kind": "service-defaults", "Name": "admin", "Protocol": "grpc"},
        {
            "Kind": "service-router",
            "Name": "web",
            "Routes": [
                {"Match": {"HTTP": {"PathPrefix": "/admin"}}, "Destination": {"Service": "admin"}}
            ],
        },
    )
    with pytest.raises(ConfigEntryError, match="uses inconsistent protocols"):
        validate_graph(e)


def test_redirect_loops_are_refused():
    e = entries(
        {"Kind": "service-resolver", "Name": "a", "Redirect": {"Service": "b"}},
        {"Kind": "service-resolver", "Name": "b", "Redirect": {"Service": "a"}},
    )
    with pytest.raises(ConfigEntryError, match="circular resolver redirect"):
        validate_graph(e)


def test_split_loops_are_refused():
    e = entries(
        {"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}},
        {"Kind": "service-splitter", "Name": "a", "Splits": [{"Weight": 100, "Service": "b"}]},
        {"Kind": "service-splitter", "Name": "b", "Splits": [{"Weight": 100, "Service": "a"}]},
    )
    with pytest.raises(ConfigEntryError, match='service-splitter loop: "a" -> "b" -> "a"'):
        validate_graph(e)


def test_proxy_defaults_protocol_is_read_whatever_its_case():
    e = decode_entry(
        {"Kind": "proxy-defaults", "Name": "global", "Config": {"Protocol": "HTTP", "x": 1}}
    )
    assert e["Config"] == {"x": 1, "protocol": "http"}
    assert protocol_of("web", entries(e))[0] == "http"
