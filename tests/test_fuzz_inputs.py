"""Fuzz every `/v1` and `/api` write endpoint of a real server (issue 12, the fuzz pass).

`/v1`: Hypothesis bodies per endpoint — known field names with wrong types, huge
numbers, NaN, unicode, deep nesting, truncated JSON, bad UTF-8, missing fields —
some sent chunked. `/api`: schemathesis from the OpenAPI schema at `/api/schema/`,
both schema-conforming and schema-violating cases, for every write operation.

What must hold for every generated request: no 5xx, no hang (a client timeout),
and a refused request (4xx) stores nothing: the global index (the one counter every
write takes, read straight from the server's database) is the same after it as
before. The server's background loop is slowed down so that nothing else writes
while the fuzzer runs. The run is bounded (example counts, not time) and prints
how many requests it sent.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support.servers import MeshServer, make_server

pytestmark = pytest.mark.slow

V1_EXAMPLES = 500
API_EXAMPLES_PER_OPERATION = 16
TIMEOUT = 30.0  # a request slower than this is a hang

FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    derandomize=True,  # the same requests on every run: a failure reproduces
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


# ------------------------------------------------------------------------------ harness


@dataclass
class Ledger:
    """What the fuzzer sent and every breach it saw."""

    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # 5xx
    hangs: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # refused, yet the index moved

    def report(self, label: str) -> str:
        by_class = {f"{k}xx": v for k, v in sorted(self.statuses.items())}
        return f"{label}: {self.sent} generated requests, status classes {by_class}"

    def check(self) -> None:
        assert not self.errors, "5xx answers:\n" + "\n".join(self.errors[:20])
        assert not self.hangs, "hangs:\n" + "\n".join(self.hangs[:20])
        assert not self.changed, "refused but stored:\n" + "\n".join(self.changed[:20])


class IndexReader:
    """The server's global write index, read from its database (no HTTP involved).

    One connection kept open (autocommit: every read sees the latest commit).
    """

    QUERY = "SELECT value FROM registry_meshindex WHERE id = 1"

    def __init__(self, server: MeshServer) -> None:
        if server.database_url:
            import psycopg

            self.conn = psycopg.connect(server.database_url, autocommit=True)
        else:
            path = server.data_dir / "mesh.sqlite3"
            self.conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, timeout=20, isolation_level=None
            )

    def __call__(self) -> int:
        row = self.conn.execute(self.QUERY).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.conn.close()


def record(ledger: Ledger, index: IndexReader, what: str, send) -> None:
    """Send one request (`send()` returns a status and a body) and check it."""
    before = index()
    ledger.sent += 1
    try:
        status, text = send()
    except httpx.TimeoutException:
        ledger.hangs.append(what)
        return
    ledger.statuses[status // 100] += 1
    if status >= 500:
        ledger.errors.append(f"{status} {what} -> {text[:300]!r}")
    elif 400 <= status < 500:
        after = index()
        if after != before:
            ledger.changed.append(f"{status} {what}: index {before} -> {after}")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A server of its own, ACLs on, with a little data for the fuzzer to hit."""
    srv = make_server(
        tmp_path_factory.mktemp("fuzz-server"),
        acl=True,
        # Background work (TTL expiry, reaping) must not write while we watch the index.
        extra_env={"MESH_TASK_TICK_SECONDS": "3600"},
    )
    with srv.client() as c:
        assert c.put("/v1/kv/fuzz/existing", content=b"v").status_code == 200
        r = c.put(
            "/v1/agent/service/register",
            json={"Name": "web", "ID": "web-1", "Port": 80, "Check": {"TTL": "10m"}},
        )
        assert r.status_code == 200, r.text
    yield srv
    srv.close()


# ------------------------------------------------------------------------------- /v1


def _scalar() -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, -1, 2**31, 2**63, 2**64 - 1, 1e30, -1e30, 1.5, 1e-30]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
        st.sampled_from(
            ["", "10s", "-5s", "1000000000h", "99999999999h", "NaN", "☃", "\x00", "a\x00b"]
        ),
    )


def _json_value() -> st.SearchStrategy:
    return st.recursive(
        _scalar(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
        ),
        max_leaves=12,
    )


# Each write endpoint with the field names its body knows (Consul's), so that
# the fuzzer gets past "unknown field, ignored" and into the decoders.
V1_WRITES: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "PUT",
        "/v1/agent/service/register",
        (
            "Name",
            "ID",
            "Port",
            "Address",
            "Tags",
            "Meta",
            "Check",
            "Checks",
            "Weights",
            "Kind",
            "Proxy",
            "Connect",
            "TaggedAddresses",
            "EnableTagOverride",
        ),
    ),
    ("PUT", "/v1/agent/service/deregister/{id}", ()),
    ("PUT", "/v1/agent/service/maintenance/{id}?enable=true", ()),
    ("PUT", "/v1/agent/maintenance?enable=false", ()),
    (
        "PUT",
        "/v1/agent/check/register",
        (
            "Name",
            "CheckID",
            "TTL",
            "HTTP",
            "TCP",
            "Interval",
            "Timeout",
            "ServiceID",
            "Status",
            "Notes",
            "DeregisterCriticalServiceAfter",
            "Header",
        ),
    ),
    ("PUT", "/v1/agent/check/deregister/{id}", ()),
    ("PUT", "/v1/agent/check/pass/{id}", ()),
    ("PUT", "/v1/agent/check/update/{id}", ("Status", "Output")),
    (
        "PUT",
        "/v1/catalog/register",
        (
            "Node",
            "Address",
            "ID",
            "Datacenter",
            "NodeMeta",
            "Service",
            "Check",
            "Checks",
            "TaggedAddresses",
            "SkipNodeUpdate",
        ),
    ),
    ("PUT", "/v1/catalog/deregister", ("Node", "ServiceID", "CheckID", "Datacenter")),
    ("PUT", "/v1/kv/fuzz/{id}", ()),
    ("DELETE", "/v1/kv/fuzz/{id}", ()),
    (
        "PUT",
        "/v1/session/create",
        ("Name", "Node", "LockDelay", "Behavior", "TTL", "NodeChecks", "Checks", "ServiceChecks"),
    ),
    ("PUT", "/v1/session/destroy/{id}", ()),
    ("PUT", "/v1/session/renew/{id}", ()),
    (
        "PUT",
        "/v1/acl/token",
        (
            "Description",
            "Policies",
            "Local",
            "ExpirationTTL",
            "ExpirationTime",
            "SecretID",
            "AccessorID",
        ),
    ),
    ("PUT", "/v1/acl/token/{id}", ("Description", "Policies", "Local", "ExpirationTTL")),
    ("PUT", "/v1/acl/token/{id}/clone", ("Description",)),
    ("DELETE", "/v1/acl/token/{id}", ()),
    ("PUT", "/v1/acl/policy", ("Name", "Description", "Rules", "Datacenters")),
    ("PUT", "/v1/acl/policy/{id}", ("Name", "Description", "Rules", "Datacenters")),
    ("DELETE", "/v1/acl/policy/{id}", ()),
    (
        "PUT",
        "/v1/config",
        (
            "Kind",
            "Name",
            "Protocol",
            "Config",
            "Routes",
            "Splits",
            "Redirect",
            "Failover",
            "Subsets",
            "Sources",
            "Meta",
        ),
    ),
    ("DELETE", "/v1/config/{kind}/{id}", ()),
    (
        "POST",
        "/v1/connect/intentions",
        ("SourceName", "DestinationName", "Action", "Permissions", "Description", "Meta"),
    ),
    (
        "PUT",
        "/v1/connect/intentions/exact?source={id}&destination=web",
        ("Action", "Permissions", "Description", "Meta"),
    ),
    ("DELETE", "/v1/connect/intentions/exact?source={id}&destination=web", ()),
    ("PUT", "/v1/connect/intentions/{id}", ("SourceName", "DestinationName", "Action")),
    ("POST", "/v1/agent/connect/authorize", ("Target", "ClientCertURI", "ClientCertSerial")),
    ("PUT", "/v1/connect/ca/configuration", ("Provider", "Config", "ForceWithoutCrossSigning")),
    (
        "POST",
        "/v1/discovery-chain/{id}",
        ("OverrideConnectTimeout", "OverrideProtocol", "OverrideMeshGateway"),
    ),
]

_HOSTILE_BODIES = [
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b'{"Name": NaN}',
    b'{"Name": "x", "Port": Infinity}',
    b'{"Name": "x", "Port": 1e999}',
    b'{"Name": "x", "Port": ' + b"9" * 5000 + b"}",
    b'{"Name": "x"',
    b"\xff\xfe\x00garbage",
    b"null",
    b"[]",
    b'"text"',
    b"12",
]


def _path_ids() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(
            ["web-1", "web", "existing", "1", "99999999999999999999999", "a\x00b", "\x00"]
            + ["00000000-0000-0000-0000-000000000000"]
        ),
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=16),
    )


@st.composite
def v1_request(draw) -> tuple[str, str, bytes, bool]:
    method, template, fields = draw(st.sampled_from(V1_WRITES))
    path = template.replace("{id}", quote(draw(_path_ids()), safe=""))
    path = path.replace(
        "{kind}", draw(st.sampled_from(["service-defaults", "bogus", "proxy-defaults"]))
    )
    kind = draw(st.integers(0, 9))
    if kind == 0:
        body = draw(st.sampled_from(_HOSTILE_BODIES))
    elif kind == 1:
        body = json.dumps(draw(_json_value())).encode()
    elif kind == 2:
        body = b""
    else:  # the endpoint's own fields, with values of any shape
        chosen = draw(st.lists(st.sampled_from(fields or ("Name",)), unique=True, max_size=6))
        data = {name: draw(_json_value()) for name in chosen}
        body = json.dumps(data, allow_nan=False).encode()
    chunked = draw(st.integers(0, 4)) == 0
    return method, path, body, chunked


def test_v1_write_endpoints_survive_fuzzing(target):
    ledger = Ledger()
    client = httpx.Client(
        base_url=target.url, headers={"X-Consul-Token": target.token}, timeout=TIMEOUT
    )
    started = time.monotonic()

    @settings(FUZZ_SETTINGS, max_examples=V1_EXAMPLES)
    @given(request=v1_request())
    def fuzz(request):
        method, path, body, chunked = request

        def send():
            content = (lambda: (yield body))() if chunked else body
            r = client.request(method, path, content=content)
            return r.status_code, r.text

        what = f"{method} {path} {'chunked ' if chunked else ''}{body[:120]!r}"
        record(ledger, index, what, send)

    index = IndexReader(target)
    try:
        fuzz()
    finally:
        client.close()
        index.close()
    print(f"\n{ledger.report('/v1')} in {time.monotonic() - started:.1f}s")
    assert ledger.sent >= V1_EXAMPLES // 2
    ledger.check()


# ------------------------------------------------------------------------------ /api


def test_api_write_operations_survive_schemathesis(target):
    import schemathesis
    from schemathesis import GenerationMode

    headers = {"X-Consul-Token": target.token}
    schema = schemathesis.openapi.from_url(target.url + "/api/schema/", headers=headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    writes = [
        op
        for op in operations
        # A CA rotation generates keys (slow) and is not input-driven: its body is empty.
        if op.method.upper() in ("POST", "PUT", "PATCH", "DELETE") and "/ca/rotate" not in op.path
    ]
    assert len(writes) >= 15, [f"{op.method} {op.path}" for op in writes]
    ledger = Ledger()
    started = time.monotonic()
    index = IndexReader(target)
    for op in writes:
        cases = st.one_of(
            op.as_strategy(generation_mode=GenerationMode.POSITIVE),
            op.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @settings(FUZZ_SETTINGS, max_examples=API_EXAMPLES_PER_OPERATION)
        @given(case=cases)
        def fuzz(case):
            def send():
                r = case.call(base_url=target.url, headers=headers, timeout=TIMEOUT)
                return r.status_code, r.text

            what = f"{case.method} {case.formatted_path} {case.query or ''} {str(case.body)[:200]}"
            record(ledger, index, what, send)

        fuzz()
    index.close()
    print(f"\n{ledger.report('/api')} in {time.monotonic() - started:.1f}s")
    assert ledger.sent >= len(writes) * API_EXAMPLES_PER_OPERATION // 2
    ledger.check()


def test_the_index_reader_sees_writes(target):
    """The harness itself: a write moves the index it reads, a refusal does not."""
    index = IndexReader(target)
    with target.client() as c:
        before = index()
        assert c.put("/v1/kv/fuzz/probe", content=b"x").status_code == 200
        assert index() > before
        before = index()
        assert c.put("/v1/session/create", content=b'{"LockDelay": "1h"}').status_code == 400
        assert index() == before
    index.close()
