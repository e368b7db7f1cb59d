"""Config entries through the service layer (registry.domain.config_entries):
CAS, cross-entry rules on the database, the service-intentions view, audit,
topics. Single-entry decoding is tested without a database in
tests/test_config_entries_pure.py; the HTTP surfaces in test_config_api.py."""

from __future__ import annotations

import logging

import pytest

from registry import audit
from registry import topics as topic
from registry.acl_rules import Authorizer, parse_rules
from registry.domain import config_entries as entries
from registry.domain import intentions
from registry.errors import BadRequest
from registry.models import AuditEntry, ConfigEntry, Intention
from registry.txn import topic_index

pytestmark = pytest.mark.django_db

ALL = Authorizer.management()
OPERATOR = audit.Actor("9d4a8c2e-0000-4000-8000-000000000002", "operator token", "v1")


@pytest.fixture(autouse=True)
def _fresh_caches():
    intentions.reset_caches()
    yield
    intentions.reset_caches()


def put(raw: dict, cas: int | None = None) -> bool:
    return entries.write(entries.decode(raw), cas=cas)


def stored(kind: str, name: str) -> dict | None:
    return entries.get(kind, name)[1]


def http(name: str) -> None:
    put({"Kind": "service-defaults", "Name": name, "Protocol": "http"})


def test_a_written_entry_reads_back_with_its_indexes_and_topics():
    assert put({"Kind": "service-defaults", "Name": "web", "Protocol": "http"}) is True
    e = stored("service-defaults", "web")
    assert e == {
        "Kind": "service-defaults",
        "Name": "web",
        "Protocol": "http",
        "CreateIndex": e["ModifyIndex"],
        "ModifyIndex": e["ModifyIndex"],
    }
    assert topic_index(topic.config_entry("service-defaults", "web")) == e["ModifyIndex"]
    assert topic_index(topic.config_kind("service-defaults")) == e["ModifyIndex"]
    assert topic_index(topic.DISCOVERY_CHAIN) == e["ModifyIndex"]
    assert entries.service_protocol("web") == "http"
    assert entries.service_protocol("other") == "tcp"


def test_cas_writes_only_over_the_index_it_names():
    assert put({"Kind": "service-defaults", "Name": "web", "Protocol": "http"}, cas=0) is True
    first = stored("service-defaults", "web")
    # cas=0: only if it does not exist yet.
    assert put({"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"}, cas=0) is False
    assert (
        put(
            {"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"},
            cas=first["ModifyIndex"] + 7,
        )
        is False
    )
    assert stored("service-defaults", "web")["Protocol"] == "http"
    assert (
        put(
            {"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"},
            cas=first["ModifyIndex"],
        )
        is True
    )
    second = stored("service-defaults", "web")
    assert second["Protocol"] == "grpc"
    assert second["CreateIndex"] == first["CreateIndex"] < second["ModifyIndex"]
    assert entries.delete("service-defaults", "web", cas=first["ModifyIndex"]) is False
    assert entries.delete("service-defaults", "web", cas=second["ModifyIndex"]) is True
    assert stored("service-defaults", "web") is None
    assert entries.delete("service-defaults", "web", cas=second["ModifyIndex"]) is False
    assert entries.delete("service-defaults", "web") is True  # a plain delete of nothing is fine


def test_each_write_is_audited_with_before_and_after():
    with audit.scope(OPERATOR, "config.write", "PUT", "/v1/config"):
        put({"Kind": "service-resolver", "Name": "web", "ConnectTimeout": "3s"})
    with audit.scope(OPERATOR, "config.write", "PUT", "/v1/config"):
        put({"Kind": "service-resolver", "Name": "web", "ConnectTimeout": "4s"})
    with audit.scope(OPERATOR, "config.entry", "DELETE", "/v1/config/service-resolver/web"):
        entries.delete("service-resolver", "web")
    rows = list(AuditEntry.objects.filter(resource_type="config-entry").order_by("index"))
    assert [(r.action, r.resource_id) for r in rows] == [
        ("config.write", "service-resolver/web"),
        ("config.write", "service-resolver/web"),
        ("config.delete", "service-resolver/web"),
    ]
    assert rows[0].before is None and rows[0].after["ConnectTimeout"] == "3s"
    assert (rows[1].before["ConnectTimeout"], rows[1].after["ConnectTimeout"]) == ("3s", "4s")
    assert rows[2].before["ConnectTimeout"] == "4s" and rows[2].after is None
    assert rows[0].actor == OPERATOR.id


def test_allow_by_default_is_written_loudly(caplog):
    with caplog.at_level(logging.WARNING), audit.scope(OPERATOR, "config.write"):
        put({"Kind": "mesh", "AllowByDefault": True})
    assert any("AllowByDefault=true" in r.getMessage() for r in caplog.records)
    loud = AuditEntry.objects.get(action="config.mesh.allow-by-default")
    assert loud.before == {"AllowByDefault": False}
    assert loud.after["AllowByDefault"] is True and "ALLOW" in loud.after["Warning"]
    # The intentions engineer's decision reads the same field.
    assert intentions.default_allow() is True
    put({"Kind": "mesh", "AllowByDefault": False})
    assert intentions.default_allow() is False


def test_a_router_needs_its_service_to_speak_http():
    router = {
        "Kind": "service-router",
        "Name": "web",
        "Routes": [{"Match": {"HTTP": {"PathPrefix": "/a"}}}],
    }
    with pytest.raises(
        BadRequest, match='service-router "web" needs an HTTP-family protocol.*"tcp"'
    ):
        put(router)
    assert stored("service-router", "web") is None
    http("web")
    put(router)
    # Turning the service back to TCP, or dropping its defaults, would break the router.
    with pytest.raises(BadRequest, match='has protocol "tcp" from service-defaults "web"'):
        put({"Kind": "service-defaults", "Name": "web", "Protocol": "tcp"})
    with pytest.raises(BadRequest, match="needs an HTTP-family protocol"):
        entries.delete("service-defaults", "web")
    assert stored("service-defaults", "web")["Protocol"] == "http"


def test_routes_and_splits_must_name_subsets_the_resolver_has():
    http("web")
    put(
        {
            "Kind": "service-resolver",
            "Name": "web",
            "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}},
        }
    )
    with pytest.raises(BadRequest, match='service "web" does not have a subset named "v2"'):
        put(
            {
                "Kind": "service-splitter",
                "Name": "web",
                "Splits": [
                    {"Weight": 50, "ServiceSubset": "v1"},
                    {"Weight": 50, "ServiceSubset": "v2"},
                ],
            }
        )
    assert stored("service-splitter", "web") is None


def test_a_resolver_that_others_name_subsets_of_cannot_be_deleted_or_lose_them():
    http("web")
    put({"Kind": "service-resolver", "Name": "web", "Subsets": {"v1": {}, "v2": {}}})
    put(
        {
            "Kind": "service-splitter",
            "Name": "web",
            "Splits": [
                {"Weight": 90, "ServiceSubset": "v1"},
                {"Weight": 10, "ServiceSubset": "v2"},
            ],
        }
    )
    with pytest.raises(
        BadRequest,
        match='service-resolver "web" is still referenced by service-splitter "web" Splits\\[0\\]',
    ):
        entries.delete("service-resolver", "web")
    with pytest.raises(BadRequest, match='does not have a subset named "v2"'):
        put({"Kind": "service-resolver", "Name": "web", "Subsets": {"v1": {}}})
    assert stored("service-resolver", "web")["Subsets"] == {"v1": {}, "v2": {}}
    entries.delete("service-splitter", "web")
    assert entries.delete("service-resolver", "web") is True


def test_a_service_with_l7_intentions_keeps_an_http_protocol():
    http("api")
    intentions.upsert_exact(
        ALL,
        ("default", "web"),
        ("default", "api"),
        {"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]},
    )
    with pytest.raises(BadRequest, match='service "api" has intentions with L7 Permissions'):
        put({"Kind": "service-defaults", "Name": "api", "Protocol": "tcp"})


def test_the_service_intentions_entry_is_a_view_of_the_intentions():
    assert put(
        {
            "Kind": "service-intentions",
            "Name": "db",
            "Sources": [
                {"Name": "web", "Action": "allow", "Description": "front end"},
                {"Name": "*", "Action": "deny"},
            ],
        }
    )
    rows = {r.source_name: r for r in Intention.objects.filter(destination_name="db")}
    assert (rows["web"].action, rows["web"].description, rows["*"].action) == (
        "allow",
        "front end",
        "deny",
    )
    # And the other way: an intention made by the intentions API shows in the entry.
    intentions.upsert_exact(ALL, ("default", "api"), ("default", "db"), {"Action": "deny"})
    e = stored("service-intentions", "db")
    assert [(s["Name"], s["Action"], s["Precedence"]) for s in e["Sources"]] == [
        ("api", "deny", 9),
        ("web", "allow", 9),
        ("*", "deny", 8),
    ]
    assert e["ModifyIndex"] >= e["CreateIndex"] > 0
    listed = entries.list_kind(ALL, "service-intentions")[1]
    assert [x["Name"] for x in listed] == ["db"]


def test_service_intentions_cas_sees_a_removed_source():
    put(
        {
            "Kind": "service-intentions",
            "Name": "db",
            "Sources": [{"Name": "a", "Action": "allow"}, {"Name": "b", "Action": "allow"}],
        }
    )
    before = stored("service-intentions", "db")["ModifyIndex"]
    assert put(
        {"Kind": "service-intentions", "Name": "db", "Sources": [{"Name": "a", "Action": "allow"}]},
        cas=before,
    )
    after = stored("service-intentions", "db")["ModifyIndex"]
    assert after > before  # no remaining row changed, yet the entry did
    assert put({"Kind": "service-intentions", "Name": "db", "Sources": []}, cas=before) is False
    assert entries.delete("service-intentions", "db", cas=after) is True
    assert stored("service-intentions", "db") is None
    assert not Intention.objects.filter(destination_name="db").exists()


def test_bad_service_intentions_are_refused_by_the_intentions_rules_and_nothing_is_stored():
    with pytest.raises(BadRequest, match="Sources\\[1\\]"):
        put(
            {
                "Kind": "service-intentions",
                "Name": "db",
                "Sources": [{"Name": "web", "Action": "allow"}, {"Name": "api", "Action": "maybe"}],
            }
        )
    assert not Intention.objects.exists()


def test_reads_and_writes_need_the_kinds_permissions():
    reader = Authorizer.from_rules([parse_rules('service "web" { policy = "read" }')])
    assert entries.can_read(reader, "service-defaults", "web") == (True, "service:read", "web")
    assert entries.can_write(reader, "service-defaults", "web") == (False, "service:write", "web")
    assert entries.can_read(reader, "proxy-defaults", "global")[:2] == (False, "operator:read")
    assert entries.can_write(reader, "mesh", "mesh")[:2] == (False, "mesh:write")
    operator = Authorizer.from_rules([parse_rules('operator = "write"')])
    assert entries.can_write(operator, "proxy-defaults", "global")[0] is True
    assert entries.can_write(operator, "mesh", "mesh")[0] is True
    http("web")
    http("api")
    listed = entries.list_kind(reader, "service-defaults")[1]
    assert [e["Name"] for e in listed] == ["web"]


def test_an_unknown_kind_is_a_bad_request():
    with pytest.raises(BadRequest, match="invalid config entry kind: 'ingress-gateway'"):
        entries.get("ingress-gateway", "x")
    with pytest.raises(BadRequest, match="Invalid config entry: Protocl: unknown field"):
        entries.decode({"Kind": "service-defaults", "Name": "web", "Protocl": "http"})
    assert not ConfigEntry.objects.exists()
