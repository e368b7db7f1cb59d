"""Intentions through the service layer (registry.domain.intentions) and through
a real server: `/v1/connect/intentions`, `/v1/agent/connect/authorize`,
`/api/intentions/`, with the unmodified py-consul client and raw HTTP.

Pure decision rules (precedence, L7 matching) are tested without a database
in tests/test_intentions_pure.py.
"""

from __future__ import annotations

import json

import consul
import pytest

from registry import audit
from registry import topics as topic
from registry.acl_rules import Authorizer, parse_rules
from registry.domain import intentions
from registry.errors import BadRequest, Conflict, NotFound, PermissionDenied
from registry.models import AuditEntry, ConfigEntry, Intention
from registry.txn import Change, topic_index

ALL = Authorizer.management()
OPERATOR = audit.Actor("9d4a8c2e-0000-4000-8000-000000000001", "operator token", "v1")
DEFAULT = ("default", "")


def ref(name: str) -> tuple[str, str]:
    return ("default", name)


def rules(text: str) -> Authorizer:
    return Authorizer.from_rules([parse_rules(text)])


@pytest.fixture(autouse=True)
def _fresh_caches():
    intentions.reset_caches()
    yield
    intentions.reset_caches()


def _http_service(name: str) -> None:
    ConfigEntry.objects.create(
        kind="service-defaults",
        name=name,
        data={"Kind": "service-defaults", "Name": name, "Protocol": "http"},
    )


L7 = [
    {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
    {"Action": "allow", "HTTP": {"PathPrefix": "/", "Methods": ["GET", "HEAD"]}},
]


# --- the service-intentions bridge -------------------------------------------------------------


@pytest.mark.django_db
def test_replace_for_destination_makes_the_destination_hold_exactly_the_sources():
    _http_service("db")
    with Change() as change:
        intentions.replace_for_destination(
            change,
            "db",
            [
                {"Name": "web", "Action": "allow", "Description": "front end"},
                {"Name": "*", "Action": "deny"},
                {"Name": "api", "Permissions": L7},
            ],
        )
    sources = intentions.list_for_destination("db")
    assert [(s["Name"], s["Precedence"]) for s in sources] == [("api", 9), ("web", 9), ("*", 8)]
    assert sources[1] == {
        "Name": "web",
        "Action": "allow",
        "Precedence": 9,
        "Type": "consul",
        "Description": "front end",
    }
    assert sources[0]["Permissions"][1] == {
        "Action": "allow",
        "HTTP": {"PathPrefix": "/", "Methods": ["GET", "HEAD"]},
    }
    assert "Action" not in sources[0]
    # The same rows are the intentions API's view.
    listing = intentions.list_intentions(ALL, destination="db")
    assert [(r.source_name, r.action) for r in listing.rows] == [
        ("api", ""),
        ("web", "allow"),
        ("*", "deny"),
    ]


@pytest.mark.django_db
def test_replacing_keeps_ids_of_unchanged_sources_and_deletes_dropped_ones():
    with Change() as change:
        intentions.replace_for_destination(
            change, "db", [{"Name": "web", "Action": "allow"}, {"Name": "api", "Action": "allow"}]
        )
    ids = dict(Intention.objects.values_list("source_name", "id"))
    created = Intention.objects.get(source_name="web").create_index
    with Change() as change:
        intentions.replace_for_destination(
            change, "db", [{"name": "web", "action": "deny"}, {"Name": "cache", "Action": "allow"}]
        )
    rows = {r.source_name: r for r in Intention.objects.all()}
    assert set(rows) == {"web", "cache"}
    assert rows["web"].id == ids["web"]
    assert rows["web"].action == "deny"
    assert rows["web"].create_index == created
    assert rows["web"].modify_index == change.index
    assert topic_index(topic.intentions_for("db")) == change.index
    assert topic_index(topic.config_entry("service-intentions", "db")) == change.index


@pytest.mark.django_db
def test_replace_refuses_a_bad_source_and_writes_nothing():
    with Change() as change:
        intentions.replace_for_destination(change, "db", [{"Name": "web", "Action": "allow"}])
    bad_sources = [
        (
            [{"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}],
            'Sources[1] defines "web" more than once',
        ),
        (
            [{"Name": "web", "Action": "maybe"}],
            "Sources[0].Action must be set to 'allow' or 'deny'",
        ),
        (
            [{"Name": "we*", "Action": "allow"}],
            "Sources[0].SourceName: wildcard character '*' cannot be used",
        ),
        (
            [{"Name": "web", "Action": "allow", "Colour": "red"}],
            "Sources[0]: unknown field 'Colour'",
        ),
        ([{"Name": "web", "Permissions": L7}], "Permissions need an HTTP-based destination"),
        (
            [{"Name": "web", "Action": "allow", "LegacyMeta": {"a": "b"}}],
            "Sources[0].LegacyMeta must be omitted",
        ),
    ]
    for sources, message in bad_sources:
        with pytest.raises(BadRequest) as err, Change() as change:
            intentions.replace_for_destination(change, "db", sources)
        assert message in err.value.message
    assert [(r.source_name, r.action) for r in Intention.objects.all()] == [("web", "allow")]


@pytest.mark.django_db
def test_an_empty_source_list_removes_every_intention_of_the_destination():
    with Change() as change:
        intentions.replace_for_destination(change, "db", [{"Name": "web", "Action": "allow"}])
        intentions.replace_for_destination(change, "cache", [{"Name": "web", "Action": "allow"}])
    with Change() as change:
        intentions.replace_for_destination(change, "db", [])
    assert intentions.list_for_destination("db") == []
    assert len(intentions.list_for_destination("cache")) == 1


@pytest.mark.django_db
def test_the_entry_meta_becomes_every_intentions_meta():
    with Change() as change:
        intentions.replace_for_destination(
            change, "db", [{"Name": "web", "Action": "allow"}], meta={"team": "data"}
        )
    row = Intention.objects.get()
    assert intentions.intention_json(row)["Meta"] == {"team": "data"}


@pytest.mark.django_db
def test_destinations_lists_each_destination_with_its_indexes():
    with Change() as first:
        intentions.replace_for_destination(first, "db", [{"Name": "web", "Action": "allow"}])
    intentions.upsert_exact(ALL, ref("api"), ref("db"), {"Action": "deny"})
    assert intentions.destinations() == [
        {
            "Namespace": "default",
            "Name": "db",
            "CreateIndex": first.index,
            "ModifyIndex": topic_index(topic.intentions_for("db")),
        }
    ]
    assert topic_index(topic.intentions_for("db")) > first.index


# --- service layer: decisions, ACLs, bad input -------------------------------------------------


@pytest.mark.django_db
def test_check_answers_allow_deny_wildcard_and_default_deny():
    intentions.upsert_exact(ALL, ref("web"), ref("db"), {"Action": "allow"})
    intentions.upsert_exact(ALL, ref("*"), ref("db"), {"Action": "deny"})
    intentions.upsert_exact(ALL, ref("ops"), ref("*"), {"Action": "allow"})
    assert intentions.check(ALL, ref("web"), ref("db"))[1] is True  # exact allow
    assert intentions.check(ALL, ref("api"), ref("db"))[1] is False  # * => db deny
    assert intentions.check(ALL, ref("ops"), ref("cache"))[1] is True  # ops => * allow
    assert intentions.check(ALL, ref("ops"), ref("db"))[1] is False  # * => db beats ops => *
    assert intentions.check(ALL, ref("api"), ref("cache"))[1] is False  # nothing: default deny


@pytest.mark.django_db
def test_authorize_names_the_intention_that_decided():
    row = intentions.upsert_exact(ALL, ref("web"), ref("db"), {"Action": "allow"})
    wild = intentions.upsert_exact(ALL, ref("*"), ref("db"), {"Action": "deny"})
    uri = "spiffe://11111111-2222-3333-4444-555555555555.mesh/ns/default/dc/dc1/svc/{}"
    allowed = intentions.authorize(ALL, "db", uri.format("web"))
    assert allowed.allowed is True
    assert allowed.reason == (
        f"Matched L4 intention: web => db (ID: {row.id}, Precedence: 9, Action: ALLOW)"
    )
    denied = intentions.authorize(ALL, "db", uri.format("api"))
    assert (denied.allowed, denied.intention_id) == (False, wild.id)
    assert denied.reason == (
        f"Matched L4 intention: * => db (ID: {wild.id}, Precedence: 8, Action: DENY)"
    )
    default = intentions.authorize(ALL, "cache", uri.format("web"))
    assert default.allowed is False
    assert default.reason.startswith("Default behavior: deny.")
    assert "web => cache" in default.reason


@pytest.mark.django_db
def test_the_mesh_entry_switches_to_default_allow_loudly():
    intentions.upsert_exact(ALL, ref("web"), ref("db"), {"Action": "deny"})
    uri = "spiffe://a.mesh/ns/default/dc/dc1/svc/web"
    assert intentions.authorize(ALL, "cache", uri).allowed is False
    with Change() as change:
        ConfigEntry.objects.create(
            kind="mesh", name="mesh", data={"Kind": "mesh", "AllowByDefault": True}
        )
        change.touch(topic.config_kind("mesh"), topic.config_entry("mesh", "mesh"))
    decision = intentions.authorize(ALL, "cache", uri)
    assert decision.allowed is True
    assert decision.reason.startswith("DEFAULT ALLOW:")
    assert "development" in decision.reason
    # An explicit deny still wins over the default.
    assert intentions.authorize(ALL, "db", uri).allowed is False


@pytest.mark.django_db
def test_l7_intentions_count_as_deny_for_check_and_authorize():
    _http_service("db")
    row = intentions.upsert_exact(ALL, ref("web"), ref("db"), {"Permissions": L7})
    assert intentions.check(ALL, ref("web"), ref("db"))[1] is False
    decision = intentions.authorize(ALL, "db", "spiffe://a.mesh/ns/default/dc/dc1/svc/web")
    assert (decision.allowed, decision.has_l7) == (False, True)
    assert decision.reason == (
        f"Matched L7 intention: web => db (ID: {row.id}, Precedence: 9, Permissions: 2)"
    )


@pytest.mark.django_db
def test_a_decision_sees_a_write_made_after_the_index_was_built():
    uri = "spiffe://a.mesh/ns/default/dc/dc1/svc/web"
    assert intentions.authorize(ALL, "db", uri).allowed is False
    intentions.upsert_exact(ALL, ref("web"), ref("db"), {"Action": "allow"})
    assert intentions.authorize(ALL, "db", uri).allowed is True
    intentions.delete_exact(ALL, ref("web"), ref("db"))
    assert intentions.authorize(ALL, "db", uri).allowed is False


@pytest.mark.django_db
def test_authorize_refuses_bad_input_and_another_trust_domain():
    for target, uri, message in [
        ("", "spiffe://a.mesh/ns/default/dc/dc1/svc/web", "Target service must be specified"),
        ("db", "", "ClientCertURI must be specified"),
        ("db", "https://example.com/web", "ClientCertURI not a valid Connect identifier"),
        ("db", "spiffe://a.mesh/agent/client/dc/dc1/id/n1", "not a valid Service identifier"),
    ]:
        with pytest.raises(BadRequest) as err:
            intentions.authorize(ALL, target, uri)
        assert message in err.value.message
    from registry.models import ClusterIdentity

    ClusterIdentity.objects.create(id=1, cluster_id="c", trust_domain="ours.mesh")
    intentions.upsert_exact(ALL, ref("web"), ref("db"), {"Action": "allow"})
    foreign = intentions.authorize(ALL, "db", "spiffe://theirs.mesh/ns/default/dc/dc1/svc/web")
    assert foreign.allowed is False
    assert "trust domain 'theirs.mesh'" in foreign.reason
    assert intentions.authorize(ALL, "db", "spiffe://ours.mesh/ns/default/dc/dc1/svc/web").allowed


@pytest.mark.django_db
def test_writes_need_intentions_write_on_the_destination():
    token = rules('service "db" { policy = "read" intentions = "write" }')
    intentions.upsert_exact(token, ref("web"), ref("db"), {"Action": "allow"})
    with pytest.raises(PermissionDenied) as err:
        intentions.upsert_exact(token, ref("db"), ref("web"), {"Action": "allow"})
    assert "intentions:write" in err.value.message
    with pytest.raises(PermissionDenied):
        intentions.upsert_exact(token, ref("web"), ref("*"), {"Action": "allow"})
    with pytest.raises(PermissionDenied):
        intentions.delete_exact(rules('service "db" { policy = "read" }'), ref("web"), ref("db"))
    assert Intention.objects.count() == 1


@pytest.mark.django_db
def test_reads_show_intentions_readable_on_either_end():
    intentions.upsert_exact(ALL, ref("web"), ref("db"), {"Action": "allow"})
    intentions.upsert_exact(ALL, ref("api"), ref("cache"), {"Action": "allow"})
    intentions.upsert_exact(ALL, ref("x"), ref("y"), {"Action": "deny"})
    token = rules('service "web" { policy = "read" }\nservice "cache" { policy = "read" }')
    listing = intentions.list_intentions(token)
    assert sorted((r.source_name, r.destination_name) for r in listing.rows) == [
        ("api", "cache"),
        ("web", "db"),
    ]
    assert listing.filtered is True
    with pytest.raises(PermissionDenied):
        intentions.match(token, "destination", ["y"])


@pytest.mark.django_db
def test_check_needs_service_read_and_authorize_service_write():
    reader = rules('service "db" { policy = "read" }')
    assert intentions.check(reader, ref("web"), ref("db"))[1] is False
    with pytest.raises(PermissionDenied) as err:
        intentions.check(reader, ref("web"), ref("cache"))
    assert "service:read" in err.value.message
    with pytest.raises(PermissionDenied) as err:
        intentions.authorize(reader, "db", "spiffe://a.mesh/ns/default/dc/dc1/svc/web")
    assert "service:write" in err.value.message
    writer = rules('service "db" { policy = "write" }')
    assert intentions.authorize(writer, "db", "spiffe://a.mesh/ns/default/dc/dc1/svc/web").default


@pytest.mark.django_db
def test_match_lists_by_destination_and_by_source_in_precedence_order():
    for src, dst, action in [
        ("web", "db", "allow"),
        ("*", "db", "deny"),
        ("web", "*", "allow"),
        ("api", "cache", "allow"),
    ]:
        intentions.upsert_exact(ALL, ref(src), ref(dst), {"Action": action})
    intentions.create(
        ALL,
        {
            "SourceNS": "*",
            "SourceName": "*",
            "DestinationNS": "*",
            "DestinationName": "*",
            "Action": "deny",
        },
    )
    _, by_dest = intentions.match(ALL, "destination", ["db"])
    assert [(r.source_name, r.destination_name, r.precedence) for r in by_dest["db"]] == [
        ("web", "db", 9),
        ("*", "db", 8),
        ("web", "*", 6),
        ("*", "*", 1),
    ]
    _, by_src = intentions.match(ALL, "source", ["web"])
    assert [(r.source_name, r.destination_name) for r in by_src["web"]] == [
        ("web", "db"),
        ("*", "db"),
        ("web", "*"),
        ("*", "*"),
    ]
    with pytest.raises(BadRequest):
        intentions.match(ALL, "sideways", ["web"])
    with pytest.raises(BadRequest):
        intentions.match(ALL, "source", [])


@pytest.mark.django_db
def test_bad_intentions_are_refused_with_clear_messages_and_nothing_is_stored():
    _http_service("db")
    cases = [
        ({"Action": "maybe"}, "Action must be set to 'allow' or 'deny'"),
        ({}, "Action must be set to 'allow' or 'deny'"),
        ({"Action": "allow", "Permissions": L7}, "Action must be omitted if Permissions"),
        (
            {"Permissions": [{"Action": "allow", "HTTP": {"PathRegex": "(["}}]},
            "PathRegex is not a valid regular expression",
        ),
        (
            {"Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/", "Colour": 1}}]},
            "unknown field 'Colour'",
        ),
        ({"Permissions": [{"HTTP": {"PathExact": "/"}}]}, "Permissions[0].Action must be set"),
        ({"Permissions": [{"Action": "allow"}]}, "Permissions[0].HTTP is required"),
        (
            {"Permissions": [{"Action": "allow", "HTTP": {}}]},
            "Permissions[0].HTTP should not be empty",
        ),
        (
            {"Permissions": [{"Action": "allow", "HTTP": {"Methods": ["YOINK"]}}]},
            "invalid method 'YOINK'",
        ),
        (
            {
                "Permissions": [
                    {
                        "Action": "allow",
                        "HTTP": {"Header": [{"Name": "x", "Regex": "(", "Invert": True}]},
                    }
                ]
            },
            "Header[0].Regex is not a valid regular expression",
        ),
        ({"Action": "allow", "SourceType": "aws"}, "SourceType must be set to 'consul'"),
        ({"Action": "allow", "Description": "x" * 513}, "Description exceeds maximum length 512"),
    ]
    for spec, message in cases:
        with pytest.raises(BadRequest) as err:
            intentions.upsert_exact(ALL, ref("web"), ref("db"), spec)
        assert message in err.value.message, (spec, err.value.message)
    for source, destination, message in [
        (
            ref("web*"),
            ref("db"),
            "SourceName: wildcard character '*' cannot be used with partial values",
        ),
        (ref("web"), ref("d*b"), "DestinationName: wildcard character '*' cannot be used"),
        (("*", "web"), ref("db"), "SourceName: exact value cannot follow wildcard namespace"),
        (ref(""), ref("db"), "SourceName is required"),
    ]:
        with pytest.raises(BadRequest) as err:
            intentions.upsert_exact(ALL, source, destination, {"Action": "allow"})
        assert message in err.value.message
    with pytest.raises(BadRequest) as err:
        intentions.upsert_exact(ALL, ref("web"), ref("*"), {"Permissions": L7})
    assert "wildcarded destinations" in err.value.message
    assert Intention.objects.count() == 0


@pytest.mark.django_db
def test_l7_needs_an_http_destination():
    with pytest.raises(BadRequest) as err:
        intentions.upsert_exact(ALL, ref("web"), ref("tcp-svc"), {"Permissions": L7})
    assert "has protocol 'tcp'" in err.value.message
    ConfigEntry.objects.create(
        kind="proxy-defaults", name="global", data={"Config": {"protocol": "http"}}
    )
    intentions.upsert_exact(ALL, ref("web"), ref("tcp-svc"), {"Permissions": L7})


@pytest.mark.django_db
def test_legacy_create_refuses_a_duplicate_pair_and_id_routes_work():
    row = intentions.create(
        ALL, {"SourceName": "web", "DestinationName": "db", "Action": "allow", "Meta": {"a": "b"}}
    )
    with pytest.raises(Conflict) as err:
        intentions.create(ALL, {"SourceName": "web", "DestinationName": "db", "Action": "deny"})
    assert "duplicate intention found: web => db" in err.value.message
    updated = intentions.update_by_id(
        ALL, row.id, {"SourceName": "web", "DestinationName": "cache", "Action": "deny"}
    )
    assert (updated.id, updated.destination_name, updated.action) == (row.id, "cache", "deny")
    assert intentions.delete_by_id(ALL, row.id) is True
    with pytest.raises(NotFound):
        intentions.delete_by_id(ALL, row.id)
    with pytest.raises(NotFound):
        intentions.get_by_id(row.id)


@pytest.mark.django_db
def test_each_write_records_before_and_after_in_the_audit_log():
    with audit.scope(OPERATOR, "intentions.exact", "PUT", "/v1/connect/intentions/exact"):
        row = intentions.upsert_exact(ALL, ref("web"), ref("db"), {"Action": "allow"})
    with audit.scope(OPERATOR, "intentions.exact", "PUT", "/v1/connect/intentions/exact"):
        intentions.upsert_exact(ALL, ref("web"), ref("db"), {"Action": "deny"})
    with audit.scope(OPERATOR, "intentions.exact", "DELETE", "/v1/connect/intentions/exact"):
        intentions.delete_exact(ALL, ref("web"), ref("db"))
    entries = list(AuditEntry.objects.filter(resource_type="intention").order_by("index"))
    assert [e.action for e in entries] == [
        "intention.create",
        "intention.update",
        "intention.delete",
    ]
    assert {e.resource_id for e in entries} == {row.id}
    assert entries[0].before is None and entries[0].after["Action"] == "allow"
    assert (entries[1].before["Action"], entries[1].after["Action"]) == ("allow", "deny")
    assert entries[2].before["Action"] == "deny" and entries[2].after is None
    assert entries[0].actor == OPERATOR.id


# --- a real server: /v1 with py-consul and raw HTTP --------------------------------------------


def _spiffe(http, service: str) -> str:
    """A client certificate URI for `service` in this server's trust domain (once its CA exists)."""
    r = http.get("/v1/connect/ca/roots")
    domain = r.json().get("TrustDomain") if r.status_code == 200 else ""
    return f"spiffe://{domain or '11111111-2222-3333-4444-555555555555.mesh'}/ns/default/dc/dc1/svc/{service}"


def _acl_token(acl_server, unique, rules_text: str) -> str:
    with acl_server.client() as admin:
        policy = admin.put("/v1/acl/policy", json={"Name": unique("pol"), "Rules": rules_text})
        assert policy.status_code == 200, policy.text
        token = admin.put("/v1/acl/token", json={"Policies": [{"ID": policy.json()["ID"]}]})
        assert token.status_code == 200, token.text
        return token.json()["SecretID"]


@pytest.mark.slow
def test_py_consul_creates_reads_lists_matches_checks_and_deletes(consul_client, http, unique):
    web, db = unique("web"), unique("db")
    c = consul_client.connect.intentions
    assert c.upsert(web, db, action="allow", description="front end") is True
    got = c.read(web, db)
    assert (got["SourceName"], got["DestinationName"], got["Action"]) == (web, db, "allow")
    assert got["SourceNS"] == got["DestinationNS"] == "default"
    assert got["Precedence"] == 9 and got["SourceType"] == "consul"
    assert got["Description"] == "front end"
    assert got["CreateIndex"] == got["ModifyIndex"] > 0
    assert got["ID"] and got["CreatedAt"].endswith("Z")
    assert c.upsert("*", db, action="deny") is True
    listed = [i for i in c.list() if i["DestinationName"] == db]
    assert [(i["SourceName"], i["Precedence"]) for i in listed] == [(web, 9), ("*", 8)]
    only = c.list(filter_expr=f'DestinationName == "{db}" and Action == "deny"')
    assert [i["SourceName"] for i in only] == ["*"]
    matched = c.match("destination", db)
    assert [i["SourceName"] for i in matched[db]][:2] == [web, "*"]
    assert c.check(web, db) is True
    assert c.check(unique("api"), db) is False  # * => db deny
    assert c.check(web, unique("other")) is False  # nothing matches: default deny
    assert c.delete(web, db) is True
    assert c.read(web, db) is None
    assert c.check(web, db) is False
    assert c.delete(web, db) is True  # idempotent, as Consul's


@pytest.mark.slow
def test_py_consul_agent_connect_authorize_answers_with_consuls_reasons(
    consul_client, http, unique
):
    web, db, api = unique("web"), unique("db"), unique("api")
    consul_client.connect.intentions.upsert(web, db, action="allow")
    consul_client.connect.intentions.upsert(api, db, action="deny")
    ixn = consul_client.connect.intentions.read(web, db)
    ok = consul_client.agent.connect.authorize(db, _spiffe(http, web), "01:02")
    assert ok == {
        "Authorized": True,
        "Reason": f"Matched L4 intention: {web} => {db} (ID: {ixn['ID']}, Precedence: 9, Action: ALLOW)",
    }
    denied = consul_client.agent.connect.authorize(db, _spiffe(http, api), "01:03")
    assert denied["Authorized"] is False
    assert denied["Reason"].startswith(f"Matched L4 intention: {api} => {db} (ID: ")
    default = consul_client.agent.connect.authorize(unique("cache"), _spiffe(http, web), "01:04")
    assert default["Authorized"] is False
    assert default["Reason"].startswith("Default behavior: deny.")
    # Consul's method is POST; py-consul sends PUT. Both work.
    r = http.post(
        "/v1/agent/connect/authorize",
        json={"Target": db, "ClientCertURI": _spiffe(http, web), "ClientCertSerial": "01"},
    )
    assert r.status_code == 200 and r.json()["Authorized"] is True


@pytest.mark.slow
def test_authorize_refuses_bad_input_with_400_text(http):
    for body, message in [
        (
            {"ClientCertURI": "spiffe://a.mesh/ns/default/dc/dc1/svc/web"},
            "Target service must be specified",
        ),
        ({"Target": "db"}, "ClientCertURI must be specified"),
        ({"Target": "db", "ClientCertURI": "web"}, "ClientCertURI not a valid Connect identifier"),
    ]:
        r = http.post("/v1/agent/connect/authorize", json=body)
        assert r.status_code == 400
        assert message in r.text
    r = http.post("/v1/agent/connect/authorize", content=b"{nope")
    assert r.status_code == 400


@pytest.mark.slow
def test_legacy_id_routes_create_read_update_and_delete(http, unique):
    web, db = unique("web"), unique("db")
    body = {"SourceName": web, "DestinationName": db, "Action": "allow", "Meta": {"team": "a"}}
    r = http.post("/v1/connect/intentions", json=body)
    assert r.status_code == 200, r.text
    ixn_id = r.json()["ID"]
    assert len(ixn_id) == 36
    r = http.post("/v1/connect/intentions", json=body)
    assert r.status_code == 409 and "duplicate intention found" in r.text
    got = http.get(f"/v1/connect/intentions/{ixn_id}")
    assert got.status_code == 200 and got.json()["Meta"] == {"team": "a"}
    assert "X-Consul-Index" in got.headers
    r = http.put(f"/v1/connect/intentions/{ixn_id}", json={**body, "Action": "deny"})
    assert r.status_code == 200 and r.json() is True
    assert http.get(f"/v1/connect/intentions/{ixn_id}").json()["Action"] == "deny"
    r = http.delete(f"/v1/connect/intentions/{ixn_id}")
    assert r.status_code == 200 and r.json() is True
    missing = http.get(f"/v1/connect/intentions/{ixn_id}")
    assert missing.status_code == 404 and missing.text == "Intention not found"
    assert http.delete(f"/v1/connect/intentions/{ixn_id}").status_code == 404


@pytest.mark.slow
def test_an_exact_read_that_finds_nothing_is_a_404_with_an_index(http, unique):
    r = http.get(
        "/v1/connect/intentions/exact",
        params={"source": unique("web"), "destination": unique("db")},
    )
    assert r.status_code == 404
    assert r.text == "Intention not found"
    assert int(r.headers["X-Consul-Index"]) >= 1


@pytest.mark.slow
def test_a_blocking_exact_read_returns_when_that_destination_changes(http, consul_client, unique):
    import threading

    web, db = unique("web"), unique("db")
    consul_client.connect.intentions.upsert(web, db, action="allow")
    first = http.get("/v1/connect/intentions/exact", params={"source": web, "destination": db})
    index = int(first.headers["X-Consul-Index"])
    timer = threading.Timer(
        0.3, lambda: consul_client.connect.intentions.upsert(web, db, action="deny")
    )
    timer.start()
    try:
        r = http.get(
            "/v1/connect/intentions/exact",
            params={"source": web, "destination": db, "index": index, "wait": "10s"},
            timeout=15,
        )
    finally:
        timer.join()
    assert r.status_code == 200
    assert r.json()["Action"] == "deny"
    assert int(r.headers["X-Consul-Index"]) > index


@pytest.mark.slow
def test_bad_intentions_over_http_are_400_text_and_store_nothing(http, unique):
    web, db = unique("web"), unique("db")
    exact = {"source": web, "destination": db}
    for body, message in [
        ({"Action": "sometimes"}, "Action must be set to 'allow' or 'deny'"),
        (
            {"Permissions": [{"Action": "allow", "HTTP": {"PathRegex": "(unclosed"}}]},
            "is not a valid regular expression",
        ),
        (
            {"Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/", "Verb": "GET"}}]},
            "unknown field 'Verb'",
        ),
        (
            {"Permissions": [{"HTTP": {"PathExact": "/"}}]},
            "Permissions[0].Action must be set to 'allow' or 'deny'",
        ),
        ({"Action": 7}, "Action: expected string"),
    ]:
        r = http.put("/v1/connect/intentions/exact", params=exact, json=body)
        assert r.status_code == 400, (body, r.text)
        assert message in r.text
        assert r.headers["Content-Type"].startswith("text/plain")
    r = http.put(
        "/v1/connect/intentions/exact",
        params={"source": "we*", "destination": db},
        json={"Action": "allow"},
    )
    assert r.status_code == 400 and "cannot be used with partial values" in r.text
    r = http.put(
        "/v1/connect/intentions/exact", params={"destination": db}, json={"Action": "allow"}
    )
    assert r.status_code == 400 and "required query parameter 'source' not set" in r.text
    r = http.post("/v1/connect/intentions", json={"DestinationName": db, "Action": "allow"})
    assert r.status_code == 400 and "SourceName is required" in r.text
    r = http.get("/v1/connect/intentions/match", params={"by": "sideways", "name": db})
    assert r.status_code == 400
    assert [
        i for i in http.get("/v1/connect/intentions").json() if i["DestinationName"] == db
    ] == []


# --- ACLs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_acl_intention_writes_need_intentions_write_on_the_destination(acl_server, unique):
    web, db = unique("web"), unique("db")
    token = _acl_token(
        acl_server, unique, f'service "{db}" {{ policy = "read" intentions = "write" }}'
    )
    c = acl_server.consul(token=token).connect.intentions
    assert c.upsert(web, db, action="allow") is True
    with pytest.raises(consul.ACLPermissionDenied) as err:
        c.upsert(db, web, action="allow")
    assert "intentions:write" in str(err.value)
    with pytest.raises(consul.ACLPermissionDenied):
        c.upsert(web, "*", action="allow")
    anonymous = acl_server.consul(token="").connect.intentions
    with pytest.raises(consul.ACLPermissionDenied):
        anonymous.delete(web, db)
    admin = acl_server.consul(token=acl_server.token).connect.intentions
    assert admin.read(web, db)["Action"] == "allow"


@pytest.mark.slow
def test_acl_reads_are_filtered_to_either_end_and_match_needs_read(acl_server, unique):
    web, db, x, y = unique("web"), unique("db"), unique("x"), unique("y")
    admin = acl_server.consul(token=acl_server.token).connect.intentions
    admin.upsert(web, db, action="allow")
    admin.upsert(x, y, action="deny")
    token = _acl_token(acl_server, unique, f'service "{web}" {{ policy = "read" }}')
    with acl_server.client(token=token) as h:
        r = h.get("/v1/connect/intentions")
        assert r.status_code == 200
        assert [(i["SourceName"], i["DestinationName"]) for i in r.json()] == [(web, db)]
        assert r.headers.get("X-Consul-Results-Filtered-By-ACLs") == "true"
        assert (
            h.get(
                "/v1/connect/intentions/exact", params={"source": web, "destination": db}
            ).status_code
            == 200
        )
        assert (
            h.get(
                "/v1/connect/intentions/exact", params={"source": x, "destination": y}
            ).status_code
            == 403
        )
        assert (
            h.get(
                "/v1/connect/intentions/match", params={"by": "destination", "name": y}
            ).status_code
            == 403
        )
        assert (
            h.get("/v1/connect/intentions/match", params={"by": "source", "name": web}).status_code
            == 200
        )


@pytest.mark.slow
def test_acl_check_needs_service_read_and_authorize_service_write(acl_server, unique):
    web, db = unique("web"), unique("db")
    acl_server.consul(token=acl_server.token).connect.intentions.upsert(web, db, action="allow")
    reader = _acl_token(acl_server, unique, f'service "{db}" {{ policy = "read" }}')
    writer = _acl_token(acl_server, unique, f'service "{db}" {{ policy = "write" }}')
    assert acl_server.consul(token=reader).connect.intentions.check(web, db) is True
    with pytest.raises(consul.ACLPermissionDenied):
        acl_server.consul(token=reader).connect.intentions.check(db, web)
    with acl_server.client() as h:
        uri = _spiffe(h, web)
    with pytest.raises(consul.ACLPermissionDenied):
        acl_server.consul(token=reader).agent.connect.authorize(db, uri, "01")
    answer = acl_server.consul(token=writer).agent.connect.authorize(db, uri, "01")
    assert answer["Authorized"] is True
    assert answer["Reason"].startswith(f"Matched L4 intention: {web} => {db}")


# --- /api/intentions/ ------------------------------------------------------------------------


@pytest.mark.slow
def test_api_creates_lists_checks_matches_and_deletes_intentions(http, consul_client, unique):
    web, db = unique("web"), unique("db")
    r = http.post(
        "/api/intentions/",
        json={"source_name": web, "destination_name": db, "action": "allow", "meta": {"t": "1"}},
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert (created["source_name"], created["action"], created["precedence"]) == (web, "allow", 9)
    assert created["meta"] == {"t": "1"}
    # The same data on /v1.
    assert consul_client.connect.intentions.read(web, db)["ID"] == created["id"]
    assert (
        http.post(
            "/api/intentions/", json={"source_name": web, "destination_name": db, "action": "deny"}
        ).status_code
        == 409
    )
    listed = http.get("/api/intentions/", params={"destination": db}).json()
    assert [i["id"] for i in listed["results"]] == [created["id"]]
    check = http.get("/api/intentions/check/", params={"source": web, "destination": db}).json()
    assert check["allowed"] is True and check["intention_id"] == created["id"]
    assert check["reason"].startswith(f"Matched L4 intention: {web} => {db}")
    other = http.get("/api/intentions/check/", params={"source": unique("x"), "destination": db})
    assert other.json()["allowed"] is False and other.json()["default"] is True
    matched = http.get("/api/intentions/match/", params={"by": "source", "name": web}).json()
    # Other tests' `* => x` intentions match any source too: look at this one's.
    assert [i["destination_name"] for i in matched[web] if i["source_name"] == web] == [db]
    assert all(i["source_name"] in (web, "*") for i in matched[web])
    r = http.put(
        f"/api/intentions/{created['id']}/",
        json={"source_name": web, "destination_name": db, "action": "deny"},
    )
    assert r.status_code == 200 and r.json()["action"] == "deny"
    assert http.delete(f"/api/intentions/{created['id']}/").status_code == 204
    assert http.get(f"/api/intentions/{created['id']}/").status_code == 404


@pytest.mark.slow
def test_api_refuses_bad_intentions_with_json_errors(http, unique):
    db = unique("db")
    for body, message in [
        ({"source_name": "w*b", "destination_name": db, "action": "allow"}, "wildcard"),
        ({"source_name": "web", "destination_name": db}, "Action must be set"),
        (
            {
                "source_name": "web",
                "destination_name": db,
                "permissions": [{"Action": "allow", "HTTP": {"PathRegex": "[z-a]"}}],
            },
            "not a valid regular expression",
        ),
        ({"source_name": "web", "destination_name": db, "action": "perhaps"}, "action"),
    ]:
        r = http.post("/api/intentions/", json=body)
        assert r.status_code == 400, (body, r.text)
        assert message in r.json()["error"]
    assert http.get("/api/intentions/", params={"destination": db}).json()["count"] == 0


@pytest.mark.slow
def test_api_lists_only_what_the_token_may_read(acl_server, unique):
    web, db, x = unique("web"), unique("db"), unique("x")
    admin = acl_server.consul(token=acl_server.token).connect.intentions
    admin.upsert(web, db, action="allow")
    admin.upsert(x, db, action="deny")
    token = _acl_token(acl_server, unique, f'service "{web}" {{ policy = "read" }}')
    with acl_server.client(token=token) as h:
        rows = h.get("/api/intentions/", params={"destination": db}).json()["results"]
        assert [r["source_name"] for r in rows] == [web]
        r = h.post(
            "/api/intentions/", json={"source_name": web, "destination_name": x, "action": "allow"}
        )
        assert r.status_code == 403 and "intentions:write" in r.json()["error"]


# --- the CLI ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_creates_lists_gets_checks_matches_and_deletes(server, unique, tmp_path):
    from tests.test_cli import ok, run_mesh

    web, db, api = unique("web"), unique("db"), unique("api")
    assert ok(run_mesh("intention", "create", "-meta", "team=a", web, db, server=server)) == (
        f"Created: {web} => {db} (allow)\n"
    )
    assert ok(run_mesh("intention", "create", "-deny", "*", db, server=server)) == (
        f"Created: * => {db} (deny)\n"
    )
    dup = run_mesh("intention", "create", web, db, server=server)
    assert dup.returncode == 1 and "duplicate intention found" in dup.stderr
    assert ok(run_mesh("intention", "create", "-replace", "-deny", web, db, server=server)) == (
        f"Created: {web} => {db} (deny)\n"
    )
    shown = ok(run_mesh("intention", "get", web, db, server=server))
    assert f"Source:       {web}" in shown and "Action:       deny" in shown
    assert "Precedence:   9" in shown
    listed = ok(
        run_mesh("intention", "list", "-filter", f'DestinationName == "{db}"', server=server)
    )
    lines = listed.splitlines()
    assert lines[0].split() == ["ID", "Source", "Action", "Destination", "Precedence"]
    assert [line.split()[1:] for line in lines[1:]] == [
        [web, "deny", db, "9"],
        ["*", "deny", db, "8"],
    ]
    denied = run_mesh("intention", "check", api, db, server=server)
    assert (denied.returncode, denied.stdout) == (2, "Denied\n")
    file = tmp_path / "ixn.json"
    file.write_text(json.dumps({"SourceName": api, "DestinationName": db, "Action": "allow"}))
    ok(run_mesh("intention", "create", "-file", str(file), server=server))
    assert ok(run_mesh("intention", "check", api, db, server=server)) == "Allowed\n"
    explained = ok(run_mesh("intention", "check", "-explain", api, db, server=server))
    assert explained.startswith(f"Allowed\nMatched L4 intention: {api} => {db}")
    matched = ok(run_mesh("intention", "match", db, server=server)).splitlines()
    assert matched[:2] == sorted([f"{api} => {db} (allow)", f"{web} => {db} (deny)"])
    assert matched[2] == f"* => {db} (deny)"
    assert ok(run_mesh("intention", "delete", web, db, server=server)) == "Intention deleted.\n"
    missing = run_mesh("intention", "get", web, db, server=server)
    assert missing.returncode == 1 and "Intention not found" in missing.stderr


@pytest.mark.slow
def test_cli_reports_bad_input_in_one_line(server, unique):
    from tests.test_cli import run_mesh

    bad = run_mesh("intention", "create", "we*b", unique("db"), server=server)
    assert bad.returncode == 1
    assert "wildcard character '*' cannot be used with partial values" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    usage = run_mesh("intention", "check", "onlyone", server=server)
    assert usage.returncode == 1 and "needs SRC and DST" in usage.stderr


# --- with config entries ---------------------------------------------------------------------


@pytest.mark.slow
def test_l7_intentions_over_http_with_an_http_service(http, consul_client, unique):
    web, db = unique("web"), unique("db")
    perms = [
        {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
        {"Action": "allow", "HTTP": {"PathPrefix": "/", "Methods": ["GET"]}},
    ]
    refused = http.put(
        "/v1/connect/intentions/exact",
        params={"source": web, "destination": db},
        json={"Permissions": perms},
    )
    assert refused.status_code == 400 and "has protocol 'tcp'" in refused.text
    r = http.put("/v1/config", json={"Kind": "service-defaults", "Name": db, "Protocol": "http"})
    assert r.status_code == 200, r.text
    assert consul_client.connect.intentions.upsert(web, db, permissions=perms) is True
    got = consul_client.connect.intentions.read(web, db)
    assert got["Permissions"] == perms and got["Action"] == ""
    assert consul_client.connect.intentions.check(web, db) is False
    answer = consul_client.agent.connect.authorize(db, _spiffe(http, web), "01")
    assert answer["Authorized"] is False
    assert answer["Reason"] == (
        f"Matched L7 intention: {web} => {db} (ID: {got['ID']}, Precedence: 9, Permissions: 2)"
    )


@pytest.mark.slow
def test_the_service_intentions_entry_and_the_intentions_api_show_the_same_data(
    http, consul_client, unique
):
    web, api, db = unique("web"), unique("api"), unique("db")
    entry = {
        "Kind": "service-intentions",
        "Name": db,
        "Sources": [{"Name": web, "Action": "allow"}, {"Name": "*", "Action": "deny"}],
    }
    assert http.put("/v1/config", json=entry).status_code == 200
    assert consul_client.connect.intentions.read(web, db)["Action"] == "allow"
    assert consul_client.connect.intentions.check(api, db) is False
    consul_client.connect.intentions.upsert(api, db, action="allow")
    read = http.get(f"/v1/config/service-intentions/{db}").json()
    assert [(s["Name"], s.get("Action")) for s in read["Sources"]] == [
        (api, "allow"),
        (web, "allow"),
        ("*", "deny"),
    ]


@pytest.mark.slow
def test_the_mesh_entry_switches_authorize_to_default_allow_and_says_so(http, unique):
    web, db = unique("web"), unique("db")
    body = {"Target": db, "ClientCertURI": _spiffe(http, web), "ClientCertSerial": "01"}
    before = http.get("/v1/config/mesh/mesh")
    try:
        assert (
            http.put(
                "/v1/config", json={"Kind": "mesh", "Name": "mesh", "AllowByDefault": True}
            ).status_code
            == 200
        )
        allowed = http.post("/v1/agent/connect/authorize", json=body).json()
        assert allowed["Authorized"] is True
        assert allowed["Reason"].startswith("DEFAULT ALLOW:")
        check = http.get("/v1/connect/intentions/check", params={"source": web, "destination": db})
        assert check.json() == {"Allowed": True}
    finally:
        if before.status_code == 200:
            restored = {
                k: v for k, v in before.json().items() if k not in ("CreateIndex", "ModifyIndex")
            }
            http.put("/v1/config", json=restored)
        else:
            http.delete("/v1/config/mesh/mesh")
    denied = http.post("/v1/agent/connect/authorize", json=body).json()
    assert denied["Authorized"] is False and denied["Reason"].startswith("Default behavior: deny.")


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["create", "delete", "get", "list", "check", "match"])
def test_every_intention_command_explains_itself_and_takes_the_global_options(verb):
    from tests.test_cli import ok, run_mesh

    text = ok(run_mesh("intention", verb, "--help"))
    assert text.startswith(f"usage: mesh intention {verb} ")
    assert "examples:\n  $ mesh intention " + verb in text
    for option in ("-http-addr", "-token", "-datacenter"):
        assert option in text
