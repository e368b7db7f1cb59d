"""Bodies decode as Consul's decoder does; wrong types are named 400s."""

from __future__ import annotations

import pytest

from registry.decode import (
    AGENT_SERVICE,
    CATALOG_REGISTER,
    format_duration,
    parse_body_json,
    parse_duration,
)
from registry.errors import BadRequest


def test_struct_keys_match_in_any_case_and_in_snake_case():
    spec = AGENT_SERVICE(
        {
            "name": "web",
            "PORT": 80,
            "enable_tag_override": True,
            "Check": {"ttl": "10s", "deregister_critical_service_after": "1m"},
        }
    )
    assert spec["Name"] == "web" and spec["Port"] == 80 and spec["EnableTagOverride"] is True
    assert spec["Check"] == {"TTL": "10s", "DeregisterCriticalServiceAfter": "1m0s"}


def test_user_map_keys_are_kept_exactly():
    spec = AGENT_SERVICE({"Name": "web", "Meta": {"Version": "1", "some_key": "x"}})
    assert spec["Meta"] == {"Version": "1", "some_key": "x"}


def test_service_is_an_alias_of_name():
    assert AGENT_SERVICE({"Service": "web"})["Name"] == "web"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Name": "web", "Port": "80"}, "Port: expected integer, got str"),
        ({"Name": "web", "Tags": "a,b"}, "Tags: expected list, got str"),
        ({"Name": "web", "Tags": [1]}, "Tags[0]: expected string, got int"),
        ({"Name": "web", "Meta": ["x"]}, "Meta: expected object, got list"),
        ({"Name": "web", "Port": 1.5}, "Port: expected integer, got float"),
        (
            {"Name": "web", "EnableTagOverride": "yes"},
            "EnableTagOverride: expected boolean, got str",
        ),
        ({"Name": "web", "Check": {"Interval": "ten seconds"}}, "Check.Interval: invalid duration"),
        ({"Name": "web", "Check": {"TTL": "-5s"}}, "Check.TTL: duration must not be negative"),
    ],
)
def test_a_wrong_type_is_a_bad_request_naming_the_field(body, message):
    with pytest.raises(BadRequest) as err:
        AGENT_SERVICE(body)
    assert message in err.value.message


def test_nested_catalog_structures_decode():
    spec = CATALOG_REGISTER(
        {
            "node": "n1",
            "address": "10.0.0.1",
            "service": {"service": "db", "port": 5432},
            "checks": [{"check_id": "c1", "definition": {"http": "http://x", "interval": "5s"}}],
        }
    )
    assert spec["Service"] == {"Name": "db", "Port": 5432}
    assert spec["Checks"][0]["CheckID"] == "c1"
    assert spec["Checks"][0]["Definition"] == {"HTTP": "http://x", "Interval": "5s"}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("10s", 10),
        ("1m30s", 90),
        ("500ms", 0.5),
        ("1h", 3600),
        ("1.5s", 1.5),
        ("250us", 0.00025),
    ],
)
def test_go_durations_parse(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("seconds", "text"), [(10, "10s"), (90, "1m30s"), (0.5, "500ms"), (3600, "1h0m0s"), (0, "0s")]
)
def test_durations_print_as_go_prints_them(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"{", "invalid JSON"), (b"\xff\xfe", "not valid UTF-8"), (b'{"a": }', "invalid JSON")],
)
def test_malformed_bodies_are_named(body, message):
    with pytest.raises(BadRequest) as err:
        parse_body_json(body)
    assert message in err.value.message


def test_an_empty_body_is_none():
    assert parse_body_json(b"  ") is None


# --- hostile bodies (issue 12, finding 7) --------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        (b"[" * 100_000, "body: nested deeper than 64 levels"),
        (b'{"a":' * 50_000, "body: nested deeper than 64 levels"),
        (b'{"a":' * 70 + b"1" + b"}" * 70, "nested deeper than 64 levels"),
        (b'{"Description": NaN}', "Description: number NaN is not valid JSON"),
        (b'{"Policies": [{"ID": Infinity}]}', "Policies[0].ID: number Infinity"),
        (b'{"Port": 1e999}', "Port: number 1e999 is out of range"),
        (b'{"Port": 18446744073709551616}', "Port: number 18446744073709551616 is out of range"),
        (b'{"Port": ' + b"9" * 5000 + b"}", "Port: number 99999999999999999999... is out of range"),
        (b'{"Name": "a\\u0000b"}', "Name: NUL characters"),
        (b'{"Meta": {"k\\u0000": "v"}}', "Meta: NUL characters (\\u0000) are not allowed in keys"),
        (b'{"Tags": ["ok", "\\u0000"]}', "Tags[1]: NUL characters"),
    ],
)
def test_a_hostile_body_is_a_bad_request_naming_the_field(body, message):
    with pytest.raises(BadRequest, match="Request decode failed: ") as caught:
        parse_body_json(body)
    assert message in caught.value.message


def test_a_body_within_the_bounds_parses_as_json():
    nested = b'{"a":' * 63 + b"[1, 2.5, -9223372036854775808, 18446744073709551615]" + b"}" * 63
    value = parse_body_json(nested)
    for _ in range(63):
        value = value["a"]
    assert value == [1, 2.5, -(2**63), 2**64 - 1]
