"""`/v1/acl/...` against real `mesh server` processes, driven by the unmodified py-consul
client and plain HTTP, and ACL enforcement across the catalog, health and agent APIs."""

from __future__ import annotations

import threading
import time
import uuid

import consul
import pytest

from registry.models.acl import ANONYMOUS_TOKEN_ACCESSOR, GLOBAL_MANAGEMENT_POLICY_ID
from tests.support.servers import make_server

pytestmark = pytest.mark.slow


def _policy(server, name: str, rules: str) -> dict:
    with server.client() as c:
        r = c.put("/v1/acl/policy", json={"Name": name, "Rules": rules})
    assert r.status_code == 200, r.text
    return r.json()


def _token(server, *policy_names: str, **extra) -> dict:
    with server.client() as c:
        r = c.put(
            "/v1/acl/token",
            json={"Policies": [{"Name": n} for n in policy_names], **extra},
        )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def scoped(acl_server, unique):
    """A token holding one policy with the given rules: `scoped(rules) -> (name, secret)`."""

    def make(rules: str) -> str:
        name = unique("policy")
        _policy(acl_server, name, rules)
        return _token(acl_server, name)["SecretID"]

    return make


# --- py-consul round trip ---------------------------------------------------------------


def test_py_consul_creates_reads_updates_lists_clones_and_deletes_policies_and_tokens(
    acl_server, unique
):
    c = acl_server.consul()
    name = unique("web-policy")
    policy = c.acl.policy.create(
        name, description="web writers", rules={"service": {"web": {"policy": "write"}}}
    )
    assert policy["Name"] == name and policy["Description"] == "web writers"
    assert policy["CreateIndex"] == policy["ModifyIndex"] > 0
    assert c.acl.policy.read(policy["ID"])["Rules"] == policy["Rules"]
    listed = {p["ID"]: p for p in c.acl.policy.list()}
    assert listed[policy["ID"]]["Name"] == name and "Rules" not in listed[policy["ID"]]
    assert GLOBAL_MANAGEMENT_POLICY_ID in listed

    renamed = unique("api-policy")
    updated = c.acl.policy.update(
        policy["ID"],
        renamed,
        description="api writers",
        rules={"service": {"api": {"policy": "write"}}},
    )
    assert (updated["Name"], updated["ModifyIndex"]) == (renamed, updated["ModifyIndex"])
    assert updated["ModifyIndex"] > policy["ModifyIndex"]
    assert '"api"' in c.acl.policy.read(policy["ID"])["Rules"]

    token = c.acl.token.create(policies_name=[renamed], description="api token")
    secret = token["SecretID"]
    uuid.UUID(secret)
    assert token["Policies"] == [{"ID": policy["ID"], "Name": renamed}]
    read = c.acl.token.read(token["AccessorID"])
    assert read["SecretID"] == "<hidden>"
    assert read["Description"] == "api token" and read["Policies"] == token["Policies"]
    assert c.acl.token.read_self(token=secret)["AccessorID"] == token["AccessorID"]

    api = unique("api")
    as_token = acl_server.consul(token=secret)
    with pytest.raises(consul.ACLPermissionDenied):
        as_token.agent.service.register(api, port=1)

    updated_token = c.acl.token.update(
        token["AccessorID"], description="renamed", policies_id=[policy["ID"]]
    )
    assert updated_token["Description"] == "renamed"
    assert updated_token["ModifyIndex"] > token["ModifyIndex"]
    assert [t["AccessorID"] for t in c.acl.token.list(policy=policy["ID"])] == [token["AccessorID"]]
    assert all(t["SecretID"] == "<hidden>" for t in c.acl.token.list())

    clone = c.acl.token.clone(token["AccessorID"], description="the clone")
    assert clone["AccessorID"] != token["AccessorID"]
    assert clone["SecretID"] not in (secret, "<hidden>")
    assert clone["Description"] == "the clone" and clone["Policies"] == token["Policies"]

    assert c.acl.token.delete(token["AccessorID"]) is True
    assert c.acl.token.read(token["AccessorID"]) is None
    with pytest.raises(consul.ACLPermissionDenied):
        as_token.agent.service.register(api, port=1)  # the deleted secret no longer resolves
    assert c.acl.token.delete(clone["AccessorID"]) is True
    assert c.acl.policy.delete(policy["ID"]) is True
    assert c.acl.policy.read(policy["ID"]) is None


def test_a_policy_is_read_by_name_and_accepts_hcl_rules(acl_server, unique):
    name = unique("by-name")
    rules = 'key_prefix "app/" {\n  policy = "read"\n}\n'
    created = _policy(acl_server, name, rules)
    with acl_server.client() as c:
        r = c.get(f"/v1/acl/policy/name/{name}")
        assert r.status_code == 200
        assert r.json()["ID"] == created["ID"] and r.json()["Rules"] == rules
        assert int(r.headers["X-Consul-Index"]) >= created["ModifyIndex"]
        missing = c.get(f"/v1/acl/policy/name/{unique('missing')}")
        assert missing.status_code == 404
        assert int(missing.headers["X-Consul-Index"]) > 0


def test_a_caller_may_choose_a_tokens_accessor_and_secret_and_an_expiry(acl_server):
    accessor, secret = str(uuid.uuid4()), str(uuid.uuid4())
    token = acl_server.consul().acl.token.create(
        accessor_id=accessor, secret_id=secret, expiration_ttl="1h", local=True
    )
    assert (token["AccessorID"], token["SecretID"], token["Local"]) == (accessor, secret, True)
    assert token["ExpirationTime"].endswith("Z")
    assert acl_server.consul(token=secret).acl.token.read_self()["AccessorID"] == accessor
    assert acl_server.consul().acl.token.delete(accessor) is True


def test_token_self_answers_the_anonymous_token_without_a_token(acl_server):
    with acl_server.client(token="") as c:
        r = c.get("/v1/acl/token/self")
        assert r.status_code == 200
        assert r.json()["AccessorID"] == ANONYMOUS_TOKEN_ACCESSOR
    with acl_server.client(token=str(uuid.uuid4())) as c:
        r = c.get("/v1/acl/token/self")
        assert (r.status_code, r.text) == (403, "ACL not found")


# --- who may manage ACLs --------------------------------------------------------------------


def test_acl_management_needs_acl_rights(acl_server, scoped, unique):
    anonymous = acl_server.consul(token="")
    with pytest.raises(consul.ACLPermissionDenied):
        anonymous.acl.token.list()
    with pytest.raises(consul.ACLPermissionDenied):
        anonymous.acl.policy.create(unique("nope"))
    service_writer = acl_server.consul(token=scoped('service "web" { policy = "write" }'))
    with pytest.raises(consul.ACLPermissionDenied, match="lacks permission 'acl:read'"):
        service_writer.acl.policy.list()
    with pytest.raises(consul.ACLPermissionDenied, match="lacks permission 'acl:write'"):
        service_writer.acl.token.create()

    reader = acl_server.consul(token=scoped('acl = "read"'))
    assert any(p["ID"] == GLOBAL_MANAGEMENT_POLICY_ID for p in reader.acl.policy.list())
    assert reader.acl.token.list()
    with pytest.raises(consul.ACLPermissionDenied, match="acl:write"):
        reader.acl.policy.create(unique("nope"))

    writer = acl_server.consul(token=scoped('acl = "write"'))
    made = writer.acl.token.create(description="by an acl writer")
    assert writer.acl.token.delete(made["AccessorID"]) is True


def test_acl_endpoints_answer_401_while_acls_are_disabled(server):
    with server.client() as c:
        for method, url in [
            ("PUT", "/v1/acl/bootstrap"),
            ("GET", "/v1/acl/tokens"),
            ("GET", "/v1/acl/policies"),
            ("GET", "/v1/acl/token/self"),
            ("PUT", "/v1/acl/policy"),
        ]:
            r = c.request(method, url)
            assert (r.status_code, r.text) == (401, "ACL support disabled"), url
    with pytest.raises(consul.ACLDisabled):
        server.consul().acl.token.list()


# --- bad input --------------------------------------------------------------------------------


def _policy_names(server) -> set[str]:
    with server.client() as c:
        return {p["Name"] for p in c.get("/v1/acl/policies").json()}


@pytest.mark.parametrize(
    "rules, message",
    [
        ('service "web" { policy = ', "Failed to parse ACL rules"),
        ('servise "web" { policy = "read" }', "Unknown ACL resource 'servise'"),
        ('service "web" { policy = "admin" }', "admin"),
        ('{"service": ', "invalid JSON"),
    ],
)
def test_a_policy_with_bad_rules_is_refused_with_400_and_not_stored(
    acl_server, unique, rules, message
):
    name = unique("bad-rules")
    with acl_server.client() as c:
        r = c.put("/v1/acl/policy", json={"Name": name, "Rules": rules})
    assert r.status_code == 400 and message in r.text
    assert name not in _policy_names(acl_server)


def test_bad_policy_writes_are_refused_with_400(acl_server, unique):
    name = unique("dup")
    existing = _policy(acl_server, name, "")
    with acl_server.client() as c:
        cases = [
            (c.put("/v1/acl/policy", json={"Name": name}), "already exists"),
            (c.put("/v1/acl/policy", json={"Name": "has spaces"}), "invalid Name"),
            (c.put("/v1/acl/policy", json={"Rules": ""}), "no Name is set"),
            (c.put("/v1/acl/policy", content=b'{"Name": '), "invalid JSON"),
            (c.put("/v1/acl/policy", json={"Name": unique("x"), "Rules": 7}), "Rules"),
            (
                c.put("/v1/acl/policy", json={"ID": str(uuid.uuid4()), "Name": unique("x")}),
                "Cannot specify the ID",
            ),
            (
                c.put(
                    f"/v1/acl/policy/{existing['ID']}", json={"ID": str(uuid.uuid4()), "Name": name}
                ),
                "do not match",
            ),
            (
                c.delete(f"/v1/acl/policy/{GLOBAL_MANAGEMENT_POLICY_ID}"),
                "builtin global-management",
            ),
            (
                c.put(
                    f"/v1/acl/policy/{GLOBAL_MANAGEMENT_POLICY_ID}",
                    json={"Name": "global-management", "Rules": 'acl = "read"'},
                ),
                "Changing the Rules",
            ),
        ]
        for r, message in cases:
            assert r.status_code == 400, (message, r.status_code, r.text)
            assert message in r.text, (message, r.text)
        builtin = c.get(f"/v1/acl/policy/{GLOBAL_MANAGEMENT_POLICY_ID}")
        assert builtin.status_code == 200 and 'acl = "write"' in builtin.json()["Rules"]
        assert (
            c.get(f"/v1/acl/policy/{existing['ID']}").json()["ModifyIndex"]
            == existing["ModifyIndex"]
        )
    assert "has spaces" not in _policy_names(acl_server)


def test_bad_token_writes_are_refused_with_4xx_and_nothing_is_written(acl_server, unique):
    marker = unique("must-not-exist")
    own = acl_server.consul().acl.token.read_self()
    with acl_server.client() as c:
        cases = [
            (
                {"Description": marker, "Policies": [{"Name": unique("ghost")}]},
                "No such ACL policy",
            ),
            (
                {"Description": marker, "Policies": [{"ID": str(uuid.uuid4())}]},
                "No such ACL policy",
            ),
            (
                {"Description": marker, "ServiceIdentities": [{"ServiceName": "web"}]},
                "not supported",
            ),
            ({"Description": marker, "AccessorID": "not-a-uuid"}, "not a valid UUID"),
            ({"Description": marker, "ExpirationTTL": "soon"}, "invalid duration"),
            ({"Description": marker, "ExpirationTTL": "10s"}, "cannot be less than"),
            ({"Description": marker, "ExpirationTime": "tomorrow"}, "RFC 3339"),
            ({"Description": marker, "Policies": "all"}, "expected list"),
        ]
        for body, message in cases:
            r = c.put("/v1/acl/token", json=body)
            assert r.status_code == 400 and message in r.text, (body, r.status_code, r.text)
        r = c.put("/v1/acl/token", content=b"{not json")
        assert r.status_code == 400 and "invalid JSON" in r.text
        r = c.delete(f"/v1/acl/token/{ANONYMOUS_TOKEN_ACCESSOR}")
        assert r.status_code == 400 and "anonymous token" in r.text
        r = c.delete(f"/v1/acl/token/{own['AccessorID']}")
        assert r.status_code == 400 and "authorization token is not permitted" in r.text
        r = c.put(f"/v1/acl/token/{own['AccessorID']}", json={"AccessorID": str(uuid.uuid4())})
        assert r.status_code == 400 and "do not match" in r.text
        r = c.put(f"/v1/acl/token/{uuid.uuid4()}", json={"Description": "x"})
        assert r.status_code == 404
        r = c.put(f"/v1/acl/token/{uuid.uuid4()}/clone", json={})
        assert r.status_code == 404
        assert c.get(f"/v1/acl/token/{uuid.uuid4()}").status_code == 404
        descriptions = {t["Description"] for t in c.get("/v1/acl/tokens").json()}
    assert marker not in descriptions
    assert acl_server.consul().acl.token.read_self()["AccessorID"] == own["AccessorID"]


# --- blocking queries ---------------------------------------------------------------------------


def test_acl_lists_are_blocking_queries_woken_by_acl_writes(acl_server, unique):
    with acl_server.client() as c:
        first = c.get("/v1/acl/policies")
        index = int(first.headers["X-Consul-Index"])
        result: dict = {}

        def wait() -> None:
            with acl_server.client() as w:
                started = time.monotonic()
                r = w.get("/v1/acl/policies", params={"index": index, "wait": "10s"})
                result.update(response=r, took=time.monotonic() - started)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.3)
        name = unique("wakes")
        _policy(acl_server, name, "")
        waiter.join(15)
    response = result["response"]
    assert result["took"] < 8
    assert int(response.headers["X-Consul-Index"]) > index
    assert name in {p["Name"] for p in response.json()}


# --- enforcement across the API -------------------------------------------------------------


def test_an_anonymous_service_register_is_permission_denied(acl_server, unique):
    with acl_server.client(token="") as c:
        r = c.put("/v1/agent/service/register", json={"Name": unique("anon"), "Port": 1})
    assert r.status_code == 403 and r.text.startswith("Permission denied")


def test_a_service_write_token_registers_its_service_only(acl_server, scoped, unique):
    web, api = unique("web"), unique("api")
    c = acl_server.consul(token=scoped(f'service "{web}" {{ policy = "write" }}'))
    assert c.agent.service.register(web, port=80) is True
    with pytest.raises(consul.ACLPermissionDenied):
        c.agent.service.register(api, port=80)
    with pytest.raises(consul.ACLPermissionDenied):
        c.catalog.register(unique("node"), "10.0.0.9", service={"Service": web})  # node:write
    _, services = acl_server.consul().catalog.services()
    assert web in services and api not in services


def test_a_service_read_token_sees_services_but_cannot_write(acl_server, scoped, unique):
    name = unique("visible")
    acl_server.consul().agent.service.register(name, port=1)
    reader = acl_server.consul(token=scoped('service_prefix "" { policy = "read" }'))
    _, services = reader.catalog.services()
    assert name in services
    with pytest.raises(consul.ACLPermissionDenied):
        reader.agent.service.register(unique("nope"), port=1)
    with pytest.raises(consul.ACLPermissionDenied):
        reader.agent.service.deregister(name)


def test_catalog_and_health_reads_show_only_what_the_token_may_see(acl_server, scoped, unique):
    seen, hidden = unique("seen"), unique("hidden")
    admin = acl_server.consul()
    admin.agent.service.register(seen, port=1)
    admin.agent.service.register(hidden, port=1)
    token = scoped(f'service "{seen}" {{ policy = "read" }}\nnode_prefix "" {{ policy = "read" }}')
    reader = acl_server.consul(token=token)
    _, services = reader.catalog.services()
    assert seen in services and hidden not in services
    assert [s["ServiceName"] for s in reader.catalog.service(seen)[1]] == [seen]
    assert reader.catalog.service(hidden)[1] == []
    assert len(reader.health.service(seen)[1]) == 1
    assert reader.health.service(hidden)[1] == []
    assert seen in reader.agent.services() and hidden not in reader.agent.services()
    _, anonymous_view = acl_server.consul(token="").catalog.services()
    assert seen not in anonymous_view and hidden not in anonymous_view


# --- a server of our own: bootstrap from scratch, anonymous grants, expiry ---------------------


def _fresh_server(tmp_path):
    srv = make_server(
        tmp_path,
        acl=True,
        extra_env={
            "MESH_ACL_BOOTSTRAP_ON_START": "false",
            "MESH_ACL_INITIAL_MANAGEMENT_TOKEN": "",
            "MESH_ACL_TOKEN_MIN_EXPIRATION_SECONDS": "1",
        },
    )
    srv.token = None
    return srv


@pytest.fixture(scope="module")
def booted_server(tmp_path_factory):
    srv = _fresh_server(tmp_path_factory.mktemp("acl-booted"))
    try:
        srv.token = srv.consul(token="").acl.bootstrap()["SecretID"]
        yield srv
    finally:
        srv.close()


def test_bootstrap_answers_the_management_token_once(tmp_path):
    srv = _fresh_server(tmp_path)
    try:
        with srv.client(token="") as c:
            assert c.get("/v1/acl/tokens").status_code == 403  # no management token yet
            r = c.put("/v1/acl/bootstrap")
            assert r.status_code == 200, r.text
            token = r.json()
            again = c.put("/v1/acl/bootstrap")
        assert again.status_code == 403
        assert again.text.startswith("ACL bootstrap no longer allowed (reset index: ")
        assert set(token) == {
            "ID", "AccessorID", "SecretID", "Description", "Policies", "Local",
            "CreateTime", "Hash", "CreateIndex", "ModifyIndex",
        }  # fmt: skip
        assert token["ID"] == token["SecretID"]
        uuid.UUID(token["SecretID"])
        assert token["Description"] == "Bootstrap Token (Global Management)"
        assert token["Policies"] == [
            {"ID": GLOBAL_MANAGEMENT_POLICY_ID, "Name": "global-management"}
        ]
        assert token["Local"] is False and token["CreateIndex"] == token["ModifyIndex"] > 0
        with pytest.raises(consul.ACLPermissionDenied, match="no longer allowed"):
            srv.consul(token="").acl.bootstrap()
        management = srv.consul(token=token["SecretID"])
        assert management.acl.token.read_self()["AccessorID"] == token["AccessorID"]
        assert management.agent.service.register("after-bootstrap", port=1) is True
        listed = {t["AccessorID"] for t in management.acl.token.list()}
        assert listed == {token["AccessorID"], ANONYMOUS_TOKEN_ACCESSOR}
    finally:
        srv.close()


def test_bootstrap_takes_a_chosen_secret(tmp_path):
    srv = _fresh_server(tmp_path)
    try:
        chosen = str(uuid.uuid4())
        with srv.client(token="") as c:
            bad = c.put("/v1/acl/bootstrap", json={"BootstrapSecret": "short"})
            assert bad.status_code == 400
            r = c.put("/v1/acl/bootstrap", json={"BootstrapSecret": chosen})
        assert r.status_code == 200 and r.json()["SecretID"] == chosen
        assert srv.consul(token=chosen).acl.token.read_self()["SecretID"] == chosen
    finally:
        srv.close()


def test_policies_attached_to_the_anonymous_token_grant_anonymous_reads(booted_server):
    admin = booted_server.consul()
    admin.agent.service.register("public-web", port=80)
    anonymous = booted_server.consul(token="")
    assert "public-web" not in anonymous.catalog.services()[1]
    policy = admin.acl.policy.create(
        "anonymous-read",
        rules={"service_prefix": {"": {"policy": "read"}}, "node_prefix": {"": {"policy": "read"}}},
    )
    admin.acl.token.update(
        ANONYMOUS_TOKEN_ACCESSOR, description="Anonymous Token", policies_id=[policy["ID"]]
    )
    assert "public-web" in anonymous.catalog.services()[1]
    assert len(anonymous.health.service("public-web")[1]) == 1
    with pytest.raises(consul.ACLPermissionDenied):
        anonymous.agent.service.register("anon-write", port=1)
    with pytest.raises(consul.exceptions.BadRequest, match="anonymous token"):
        admin.acl.token.delete(ANONYMOUS_TOKEN_ACCESSOR)


def test_an_expired_token_is_refused(booted_server):
    admin = booted_server.consul()
    policy = admin.acl.policy.create(
        "short-lived", rules={"service": {"ephemeral": {"policy": "write"}}}
    )
    token = admin.acl.token.create(policies_id=[policy["ID"]], expiration_ttl="2s")
    short = booted_server.consul(token=token["SecretID"])
    assert short.agent.service.register("ephemeral", port=1) is True
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            short.agent.service.register("ephemeral", port=1)
        except consul.ACLPermissionDenied as exc:
            assert "ACL not found" in str(exc)
            break
        time.sleep(0.2)
    else:
        pytest.fail("the expired token was still accepted")
    assert admin.acl.token.read(token["AccessorID"]) is None
    assert token["AccessorID"] not in {t["AccessorID"] for t in admin.acl.token.list()}


def test_a_service_write_token_cannot_overwrite_another_service_by_its_id(
    acl_server, scoped, unique
):
    web, api = unique("web"), unique("api")
    acl_server.consul().agent.service.register(api, service_id=api, port=1)
    writer = acl_server.consul(token=scoped(f'service "{web}" {{ policy = "write" }}'))
    with pytest.raises(consul.ACLPermissionDenied, match=api):
        writer.agent.service.register(web, service_id=api, port=2)
    assert acl_server.consul().agent.services()[api]["Service"] == api


def test_a_catalog_register_cannot_touch_other_services_or_the_node_without_rights(
    acl_server, scoped, unique
):
    web, api, node = unique("web"), unique("api"), unique("node")
    admin = acl_server.consul()
    assert admin.catalog.register(node, "10.1.0.1", service={"Service": api, "ID": api})
    writer = scoped(f'service "{web}" {{ policy = "write" }}')
    base = {"Node": node, "Address": "10.1.0.1", "Service": {"Service": web}}
    with acl_server.client(token=writer) as c:
        # Its own service on a node it does not change: allowed.
        assert c.put("/v1/catalog/register", json=base).status_code == 200
        attempts = [
            # a check on someone else's service
            {
                **base,
                "Check": {
                    "CheckID": unique("c"),
                    "Name": "x",
                    "ServiceID": api,
                    "Status": "critical",
                },
            },
            # replacing someone else's service through its ID
            {**base, "Service": {"Service": web, "ID": api}},
            # changing the node's tagged addresses
            {**base, "TaggedAddresses": {"wan": "203.0.113.9"}},
        ]
        for body in attempts:
            r = c.put("/v1/catalog/register", json=body)
            assert r.status_code == 403 and r.text.startswith("Permission denied"), (body, r.text)
    _, checks = admin.health.node(node)
    assert all(ch["ServiceID"] != api or ch["Status"] != "critical" for ch in checks)
    _, entry = admin.catalog.node(node)
    assert entry["Services"][api]["Service"] == api
    assert entry["Node"]["TaggedAddresses"].get("wan") != "203.0.113.9"


# --- the server agent's own checks and services ---------------------------------------------


def test_agent_checks_and_services_are_filtered_like_the_catalog(acl_server, scoped, unique):
    name = unique("agent-web")
    with acl_server.client() as c:
        r = c.put(
            "/v1/agent/service/register",
            json={"Name": name, "Port": 80, "Check": {"TTL": "30s"}},
        )
        assert r.status_code == 200, r.text
        assert "serfHealth" in c.get("/v1/agent/checks").json()
    with acl_server.client(token="") as anonymous:
        assert anonymous.get("/v1/catalog/nodes").json() == []
        assert anonymous.get("/v1/agent/checks").json() == {}  # no node-level serfHealth
        assert anonymous.get("/v1/agent/services").json() == {}
    node_reader = scoped('node_prefix "" { policy = "read" }')
    with acl_server.client(token=node_reader) as c:
        checks = c.get("/v1/agent/checks").json()
        assert "serfHealth" in checks
        assert not any(ch["ServiceName"] == name for ch in checks.values())
        assert c.get("/v1/agent/services").json() == {}
    service_reader = scoped(f'service "{name}" {{ policy = "read" }}')
    with acl_server.client(token=service_reader) as c:
        checks = c.get("/v1/agent/checks").json()
        assert "serfHealth" not in checks
        assert [ch["ServiceName"] for ch in checks.values()] == [name]
        assert [s["Service"] for s in c.get("/v1/agent/services").json().values()] == [name]
