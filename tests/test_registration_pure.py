"""`meshproto.registration` and `meshproto.durations` (pure: no database, no server).

The one decoder's two modes and its bounds, the registration rules the
control plane and the agent share, and the JSON shapes both serve.
"""

from __future__ import annotations

import json

import pytest

from meshproto import durations
from meshproto.registration import rules, shapes
from meshproto.registration.decode import (
    AGENT_SERVICE,
    LENIENT,
    MAX_DEPTH,
    DecodeError,
    parse_json,
)
from meshproto.registration.rules import RuleError

# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [("0", 0), ("10s", 10**10), ("1m30s", 90 * 10**9), ("1.5h", 5400 * 10**9), ("250us", 250_000)],
)
def test_go_durations_parse_exactly_in_nanoseconds(text, ns):
    assert durations.parse_ns(text) == ns


@pytest.mark.parametrize(
    "value",
    ["1000000000h", "2562048h", 2**63, 1e30, float("nan"), float("inf"), "99999999999h"],
)
def test_a_duration_go_cannot_hold_is_refused(value):
    with pytest.raises(durations.DurationError, match="out of range|invalid duration"):
        durations.parse_ns(value)


def test_the_largest_go_duration_is_accepted_and_printed_as_go_prints_it():
    assert durations.canonical("2562047h") == "2562047h0m0s"
    assert durations.canonical(10_000_000_000) == "10s"
    assert durations.format_duration(0.5) == "500ms"


# --- the decoder: modes -------------------------------------------------------------------


def test_strict_mode_wants_json_types_and_lenient_mode_takes_what_files_hand_over():
    raw = {"name": "web", "port": "80", "tags": "a", "enable_tag_override": "true"}
    with pytest.raises(DecodeError, match="Port: expected integer, got str"):
        AGENT_SERVICE(raw)
    assert AGENT_SERVICE(raw, "", LENIENT) == {
        "Name": "web",
        "Port": 80,
        "Tags": ["a"],
        "EnableTagOverride": True,
    }


def test_decoding_what_was_decoded_changes_nothing():
    raw = {
        "name": "web",
        "check": {"ttl": 30_000_000_000, "interval": "1m30s"},
        "connect": {"sidecar_service": {"proxy": {"upstreams": [{"destination_name": "db"}]}}},
    }
    once = AGENT_SERVICE(raw)
    assert once["Check"] == {"TTL": "30s", "Interval": "1m30s"}
    assert AGENT_SERVICE(once) == once
    assert AGENT_SERVICE(json.loads(json.dumps(once)), "", LENIENT) == once


def test_the_fields_the_agent_used_to_drop_are_decoded():
    spec = AGENT_SERVICE(
        {
            "Name": "web",
            "Proxy": {"LocalServiceSocketPath": "/s", "Upstreams": [{"DestinationPartition": "p"}]},
            "Connect": {
                "SidecarService": {"Proxy": {"Upstreams": [{"LocalBindSocketPath": "/u"}]}}
            },
        },
        "",
        LENIENT,
    )
    assert spec["Proxy"]["LocalServiceSocketPath"] == "/s"
    assert spec["Proxy"]["Upstreams"][0]["DestinationPartition"] == "p"
    sidecar = spec["Connect"]["SidecarService"]
    assert sidecar["Proxy"]["Upstreams"][0]["LocalBindSocketPath"] == "/u"


# --- the decoder: bounds --------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000],
    ids=["100k-lists", "50k-objects"],
)
def test_deep_json_is_refused_without_a_recursion_error(body):
    with pytest.raises(DecodeError, match=f"nested deeper than {MAX_DEPTH} levels"):
        parse_json(body)


def test_nesting_just_inside_the_bound_is_accepted_and_one_more_is_not():
    assert parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    with pytest.raises(DecodeError, match="nested deeper"):
        parse_json(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))


def test_a_deep_value_handed_over_already_parsed_is_refused_naming_the_field():
    deep: dict = {}
    for _ in range(200):
        deep = {"a": deep}
    with pytest.raises(DecodeError) as err:
        AGENT_SERVICE({"Name": "web", "Proxy": {"Config": deep}}, "", LENIENT)
    assert "nested deeper" in str(err.value)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(text):
    with pytest.raises(DecodeError, match="not valid JSON"):
        parse_json(f'{{"Name": "web", "Port": {text}}}')


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"Name": "web", "Port": 1e30}, "Port"),
        ({"Name": "web", "Port": 2**64}, "Port"),
        ({"Name": "web", "Weights": {"Passing": 1e30}}, "Weights.Passing"),
        ({"Name": "web", "Check": {"TTL": "1000000000h"}}, "Check.TTL"),
        ({"Name": "web", "Check": {"Interval": 2**63}}, "Check.Interval"),
        ({"Name": "web", "Check": {"Timeout": 1e30}}, "Check.Timeout"),
        (
            {"Name": "web", "Proxy": {"Upstreams": [{"LocalBindPort": 70000}]}},
            "Proxy.Upstreams[0].LocalBindPort",
        ),
        ({"Name": "web", "Proxy": {"Config": {"x": float("nan")}}}, "Proxy.Config"),
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_field(raw, field):
    with pytest.raises(DecodeError) as err:
        AGENT_SERVICE(raw)
    assert err.value.path == field
    assert str(err.value).startswith(f"{field}: ")


# --- rules ----------------------------------------------------------------------------------


def test_inline_checks_are_numbered_together_and_named_after_their_service():
    spec = {"Name": "web", "Check": {"TTL": "1m"}, "Checks": [{"TTL": "1m"}, {"CheckID": "x"}]}
    spec["Checks"][1]["TTL"] = "1m"
    checks = rules.service_checks("web-1", "web", spec)
    assert [c.check_id for c in checks] == ["service:web-1:1", "service:web-1:2", "x"]
    assert checks[0].name == "Service 'web' check"
    assert [c.check_id for c in rules.service_checks("w", "web", {"Check": {"TTL": "1s"}})] == [
        "service:w"
    ]


def test_a_sidecar_expands_with_consuls_defaults():
    parent = AGENT_SERVICE(
        {
            "Name": "web",
            "Port": 9090,
            "Tags": ["t"],
            "Connect": {
                "SidecarService": {
                    "Proxy": {"Upstreams": [{"DestinationName": "api", "LocalBindPort": 9191}]}
                }
            },
        }
    )
    rules.validate_service(parent)
    sidecar = rules.expand_sidecar(parent, 21003)
    assert (sidecar["ID"], sidecar["Name"], sidecar["Kind"], sidecar["Port"]) == (
        "web-sidecar-proxy",
        "web-sidecar-proxy",
        "connect-proxy",
        21003,
    )
    assert sidecar["Tags"] == ["t"]
    assert sidecar["Proxy"]["DestinationServiceName"] == "web"
    assert sidecar["Proxy"]["LocalServicePort"] == 9090
    assert sidecar["Proxy"]["Upstreams"][0]["LocalBindAddress"] == "127.0.0.1"
    assert [c["CheckID"] for c in sidecar["Checks"]] == [
        "service:web-sidecar-proxy:1",
        "service:web-sidecar-proxy:2",
    ]
    assert sidecar["Checks"][0]["TCP"] == "127.0.0.1:21003"
    assert "Status" not in sidecar["Checks"][1]  # critical until the alias runs, as in Consul


def test_the_sidecar_port_range_runs_out_with_a_clear_error():
    assert rules.free_sidecar_port({21000, 21002}) == 21001
    with pytest.raises(RuleError, match="No free sidecar port in 21000-21255"):
        rules.free_sidecar_port(range(21000, 21256))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"Port": 1}, "Missing service name"),
        ({"Name": "x", "Kind": "spaceship"}, "Invalid service kind: 'spaceship'"),
        ({"Name": "x", "Port": 70000}, "Invalid service port: 70000"),
        ({"Name": "x", "Kind": "connect-proxy", "Port": 1}, "Proxy.DestinationServiceName"),
        (
            {"Name": "x", "Kind": "connect-proxy", "Proxy": {"DestinationServiceName": "y"}},
            "Port must be set for a connect-proxy",
        ),
        ({"Name": "x", "Weights": {"Passing": 0}}, "Passing weight must be greater than 0"),
        (
            {"Name": "x", "Kind": "mesh-gateway", "Port": 1, "Connect": {"SidecarService": {}}},
            "A sidecar can only be registered for a typical service",
        ),
        (
            {"Name": "x", "Connect": {"SidecarService": {"Kind": "mesh-gateway"}}},
            "Invalid SidecarService: Kind must be connect-proxy",
        ),
        ({"Name": "x", "Check": {"Name": "c"}}, "must provide one of HTTP, TCP, GRPC, TTL"),
        ({"Name": "x", "Check": {"TTL": "1s", "Status": "great"}}, "Invalid check status"),
        ({"Name": "x", "Check": {"HTTP": "http://a"}}, "HTTP checks must have an Interval"),
    ],
)
def test_the_rules_refuse_what_consul_refuses_with_one_message(spec, message):
    with pytest.raises(RuleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rules.validate_service(spec)


def test_maintenance_is_a_critical_check_named_as_consul_names_it():
    svc = rules.maintenance_check("web", "")
    assert (svc["CheckID"], svc["Name"], svc["Status"]) == (
        "_service_maintenance:web",
        "Service Maintenance Mode",
        "critical",
    )
    node = rules.maintenance_check("", "upgrading")
    assert (node["CheckID"], node["Notes"]) == ("_node_maintenance", "upgrading")
    assert rules.is_maintenance("_node_maintenance") and rules.is_maintenance(svc["CheckID"])


def test_output_is_cut_at_4096_saying_how_much_was_captured():
    out = rules.truncate_output("x" * 5000)
    assert out.startswith("x" * 4096) and out.endswith("(captured 4096 of 5000 bytes)")


# --- shapes ---------------------------------------------------------------------------------


def test_a_check_shows_durations_as_go_strings_whatever_form_was_stored():
    for definition in ({"TTL": "30s", "Interval": "10s"}, {"TTL": 30.0, "Interval": 10.0}):
        shown = shapes.check(
            node="n", check_id="c", name="c", status="passing", definition=definition
        )
        assert (shown["Interval"], shown["Definition"]) == (
            "10s",
            {"TTL": "30s", "Interval": "10s"},
        )


def test_a_proxy_shows_the_members_consul_always_shows():
    shown = shapes.agent_service_from_definition(
        {"ID": "p", "Name": "p", "Kind": "connect-proxy", "Port": 1}, "dc1"
    )
    assert shown["Proxy"] == {"MeshGateway": {}, "Expose": {}, "Upstreams": []}
    assert shown["Kind"] == "connect-proxy" and shown["Weights"] == {"Passing": 1, "Warning": 1}
