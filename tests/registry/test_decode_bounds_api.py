"""Bodies past the decoder's bounds are 400s naming the field, and store nothing.

Deep nesting, numbers and durations Go could not hold, NaN and Infinity used
to answer 500 (RecursionError, OverflowError); through the one decoder
(`meshproto.registration.decode`) they are refused like any bad field, on
`/v1` (Consul's plain-text errors) and on `/api` (JSON errors).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

DEEP_LISTS = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECTS = b'{"a":' * 50_000 + b"1" + b"}" * 50_000


@pytest.mark.parametrize(
    ("method", "path", "acl"),
    [
        ("PUT", "/v1/agent/service/register", False),
        ("PUT", "/v1/agent/check/register", False),
        ("PUT", "/v1/catalog/register", False),
        ("PUT", "/v1/catalog/deregister", False),
        ("PUT", "/v1/session/create", False),
        ("POST", "/v1/connect/intentions", False),
        ("PUT", "/v1/config", False),
        ("PUT", "/v1/kv/deep?cas=0", False),
        ("PUT", "/v1/acl/policy", True),
        ("PUT", "/v1/acl/token", True),
    ],
)
@pytest.mark.parametrize("body", [DEEP_LISTS, DEEP_OBJECTS], ids=["lists", "objects"])
def test_deeply_nested_json_is_a_400_on_v1_writes(request, method, path, acl, body):
    server = request.getfixturevalue("acl_server" if acl else "server")
    with server.client() as c:
        r = c.request(method, path, content=body)
    if path.startswith("/v1/kv/"):
        assert r.status_code == 200  # a KV value is bytes, not JSON: stored as sent
        return
    assert r.status_code == 400, (path, r.status_code, r.text[:200])
    assert "nested deeper than 64 levels" in r.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"Check": {"TTL": "1000000000h"}}, "Check.TTL: duration"),
        ({"Check": {"TTL": "99999999999h"}}, "Check.TTL: duration"),
        ({"Check": {"TTL": "10s", "Interval": 2**63}}, "Check.Interval: duration"),
        ({"Check": {"TTL": "10s", "Timeout": 1e30}}, "Check.Timeout: duration"),
        ({"Port": 1e30}, "Port: 1e+30 is out of range"),
        ({"Weights": {"Passing": 1e30, "Warning": 1}}, "Weights.Passing: 1e+30 is out of range"),
    ],
)
def test_numbers_and_durations_out_of_range_are_a_400_naming_the_field(http, unique, body, field):
    name = unique("bounded")
    r = http.put("/v1/agent/service/register", json={"Name": name, **body})
    assert r.status_code == 400, r.text
    assert field in r.text
    assert name not in http.get("/v1/agent/services").json()


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(http, unique, constant):
    name = unique("nan")
    r = http.put(
        "/v1/agent/service/register", content=f'{{"Name": "{name}", "Port": {constant}}}'.encode()
    )
    assert r.status_code == 400 and "is not valid JSON" in r.text
    assert name not in http.get("/v1/agent/services").json()


@pytest.mark.parametrize("delay", [1e30, "99999999999h", 2**64])
def test_a_session_lock_delay_go_cannot_hold_is_a_400(http, delay):
    r = http.put("/v1/session/create", json={"LockDelay": delay})
    assert r.status_code == 400 and "LockDelay" in r.text, r.text


def test_deep_json_policy_rules_are_a_400(acl_server, unique):
    rules = '{"key_prefix": ' + "[" * 5000 + "]" * 5000 + "}"
    with acl_server.client() as c:
        r = c.put("/v1/acl/policy", json={"Name": unique("deep"), "Rules": rules})
    assert r.status_code == 400 and "nested deeper" in r.text, r.text


@pytest.mark.parametrize(
    "body", [DEEP_LISTS, DEEP_OBJECTS, b'{"name": NaN}'], ids=["lists", "objects", "nan"]
)
def test_api_bodies_past_the_bounds_are_json_400s(http, body):
    r = http.post("/api/instances/", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:200]
    assert r.headers["Content-Type"].startswith("application/json")
    assert "body" in r.json()["error"]
