"""Intentions through the service layer (registry.domain.intentions) and through
a real server: `/v1/connect/intentions`, `/v1/agent/connect/authorize`,
`/api/intentions/`, with the unmodified py-consul client and raw HTTP.

Pure decision rules (precedence, L7 matching) are tested without a database
in tests/test_intentions_pure.py.
"""

from __future__ import annotations

import pytest

from registry import audit
from registry.acl_rules import Authorizer, parse_rules
from registry.domain import intentions
from registry.domain.txn import Change, topic_index
from registry.errors import BadRequest
from registry.models import ConfigEntry, Intention

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
    assert topic_index("intentions:db") == change.index
    assert topic_index("config:service-intentions:db") == change.index


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
            "ModifyIndex": topic_index("intentions:db"),
        }
    ]
    assert topic_index("intentions:db") > first.index
