"""The ACL service layer: tokens, policies, bootstrap and token resolution (registry.domain.acl)."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from registry import topics as topic
from registry.domain import acl
from registry.errors import BadRequest, NotFound, PermissionDenied
from registry.models import ACLPolicy, ACLToken
from registry.models.acl import ANONYMOUS_TOKEN_ACCESSOR, GLOBAL_MANAGEMENT_POLICY_ID
from registry.txn import topic_index

WEB_WRITE = 'service "web" { policy = "write" }'


@pytest.fixture(autouse=True)
def _acl_on(settings, db):
    settings.MESH_ACL_ENABLED = True
    settings.MESH_ACL_DEFAULT_POLICY = "deny"
    settings.MESH_ACL_TOKEN_MIN_EXPIRATION_SECONDS = 60
    settings.MESH_ACL_TOKEN_MAX_EXPIRATION_SECONDS = 24 * 3600
    # Each test's database starts again at index 0: a cached identity from an
    # earlier test could otherwise look current.
    acl._cache.clear()
    yield
    acl._cache.clear()


@pytest.fixture
def booted():
    token, secret = acl.bootstrap()
    return token, secret


# --- bootstrap ------------------------------------------------------------------------


def test_bootstrap_creates_a_management_token_the_builtin_policy_and_the_anonymous_token():
    token, secret = acl.bootstrap()
    assert token.secret_hash == acl.hash_secret(secret) != secret
    assert [p.id for p in token.policies.all()] == [GLOBAL_MANAGEMENT_POLICY_ID]
    builtin = ACLPolicy.objects.get(id=GLOBAL_MANAGEMENT_POLICY_ID)
    assert builtin.name == "global-management"
    assert 'acl = "write"' in builtin.rules
    assert ACLToken.objects.filter(accessor_id=ANONYMOUS_TOKEN_ACCESSOR).exists()
    assert acl.resolve_token(secret).authorizer.is_management()


def test_bootstrap_is_refused_the_second_time_with_the_reset_index():
    acl.bootstrap()
    with pytest.raises(
        PermissionDenied, match=r"^ACL bootstrap no longer allowed \(reset index: \d+\)$"
    ):
        acl.bootstrap()
    assert ACLToken.objects.exclude(accessor_id=ANONYMOUS_TOKEN_ACCESSOR).count() == 1


def test_bootstrap_takes_a_chosen_secret_only_if_it_is_a_uuid():
    with pytest.raises(BadRequest, match="BootstrapSecret must be a UUID"):
        acl.bootstrap("not-a-uuid")
    assert not acl.bootstrapped()
    chosen = str(uuid.uuid4())
    _, secret = acl.bootstrap(chosen)
    assert secret == chosen
    assert acl.resolve_token(chosen).authorizer.is_management()


def test_acl_management_is_refused_with_401_while_acls_are_disabled(settings):
    settings.MESH_ACL_ENABLED = False
    with pytest.raises(acl.ACLDisabled) as err:
        acl.ensure_enabled()
    assert err.value.status == 401
    assert err.value.message == "ACL support disabled"


# --- tokens ---------------------------------------------------------------------------


def test_a_token_links_policies_by_id_or_name_once_and_stores_only_a_hash(booted):
    policy = acl.create_policy(name="web-write", rules=WEB_WRITE)
    token, secret = acl.create_token(
        description="web", policies=[{"ID": policy.id}, {"Name": "web-write"}]
    )
    assert [p.id for p in token.policies.all()] == [policy.id]
    assert token.secret_hash == acl.hash_secret(secret)
    assert not ACLToken.objects.filter(secret_hash=secret).exists()
    shown = acl.token_json(token)
    assert shown["SecretID"] == "<hidden>"
    assert shown["Policies"] == [{"ID": policy.id, "Name": "web-write"}]
    assert acl.token_json(token, secret=secret)["SecretID"] == secret


def test_a_token_grants_what_its_policies_say_and_nothing_else(booted):
    acl.create_policy(name="web-write", rules=WEB_WRITE)
    _, secret = acl.create_token(policies=[{"Name": "web-write"}])
    authz = acl.resolve_token(secret).authorizer
    assert authz.service_write("web")
    assert not authz.service_write("api")
    assert not authz.acl_read()


def test_a_policy_limited_to_other_datacenters_grants_nothing_here(booted, settings):
    settings.MESH_DC = "dc1"
    acl.create_policy(name="elsewhere", rules=WEB_WRITE, datacenters=["dc2"])
    acl.create_policy(name="here", rules='node "n1" { policy = "write" }', datacenters=["dc1"])
    _, secret = acl.create_token(policies=[{"Name": "elsewhere"}, {"Name": "here"}])
    authz = acl.resolve_token(secret).authorizer
    assert not authz.service_write("web")
    assert authz.node_write("n1")


def test_a_caller_may_choose_the_accessor_and_secret(booted):
    accessor, secret = str(uuid.uuid4()), str(uuid.uuid4())
    token, shown = acl.create_token(accessor_id=accessor, secret_id=secret)
    assert (token.accessor_id, shown) == (accessor, secret)
    assert acl.resolve_token(secret).accessor_id == accessor


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("accessor_id", "nope", "AccessorID is not a valid UUID"),
        ("secret_id", "nope", "SecretID is not a valid UUID"),
        ("accessor_id", "00000000-0000-0000-0000-000000000042", "are reserved"),
        ("accessor_id", ANONYMOUS_TOKEN_ACCESSOR, "are reserved"),
    ],
)
def test_a_chosen_id_must_be_a_free_unreserved_uuid(booted, field, value, message):
    before = ACLToken.objects.count()
    with pytest.raises(BadRequest, match=message):
        acl.create_token(**{field: value})
    assert ACLToken.objects.count() == before


def test_a_chosen_id_already_used_as_an_accessor_or_a_secret_is_refused(booted):
    token, secret = acl.create_token()
    with pytest.raises(BadRequest, match="AccessorID is already in use"):
        acl.create_token(accessor_id=token.accessor_id)
    with pytest.raises(BadRequest, match="SecretID is already in use"):
        acl.create_token(secret_id=secret)
    with pytest.raises(BadRequest, match="AccessorID is already in use"):
        acl.create_token(accessor_id=secret)


def test_a_token_linking_an_unknown_policy_is_not_created(booted):
    before = ACLToken.objects.count()
    with pytest.raises(BadRequest, match='No such ACL policy with name "ghost"'):
        acl.create_token(policies=[{"Name": "ghost"}])
    with pytest.raises(BadRequest, match="No such ACL policy with ID"):
        acl.create_token(policies=[{"ID": str(uuid.uuid4())}])
    assert ACLToken.objects.count() == before


def test_expiration_ttl_sets_an_expiration_time_within_consuls_bounds(booted):
    token, _ = acl.create_token(expiration_ttl=3600)
    left = token.expiration_time - timezone.now()
    assert timedelta(minutes=59) < left <= timedelta(hours=1)
    assert acl.token_json(token)["ExpirationTime"].endswith("Z")
    with pytest.raises(BadRequest, match="cannot be less than 1m0s"):
        acl.create_token(expiration_ttl=30)
    with pytest.raises(BadRequest, match="cannot be more than 24h0m0s"):
        acl.create_token(expiration_ttl=25 * 3600)
    with pytest.raises(BadRequest, match="cannot both be set"):
        acl.create_token(expiration_ttl=3600, expiration_time=timezone.now() + timedelta(hours=1))
    with pytest.raises(BadRequest, match="cannot be before CreateTime"):
        acl.create_token(expiration_time=timezone.now() - timedelta(hours=1))


def test_an_rfc3339_expiration_time_round_trips_through_the_json_shape(booted):
    at = acl.parse_time("2031-05-01T10:00:00.123456789+02:00")
    assert acl.format_time(at) == "2031-05-01T08:00:00.123456Z"
    assert acl.parse_time(acl.format_time(at)) == at
    with pytest.raises(BadRequest, match="not an RFC 3339 time"):
        acl.parse_time("tomorrow")


def test_an_expired_token_is_refused_even_while_its_identity_is_cached(booted, settings):
    settings.MESH_ACL_TOKEN_MIN_EXPIRATION_SECONDS = 1
    token, secret = acl.create_token(expiration_ttl=1)
    assert acl.resolve_token(secret).accessor_id == token.accessor_id  # now cached
    # Expiry is not an ACL write: the `acl` index (the cache key) does not move.
    index = topic_index(topic.ACL)
    time.sleep(max(0.0, (token.expiration_time - timezone.now()).total_seconds()) + 0.05)
    assert topic_index(topic.ACL) == index
    with pytest.raises(PermissionDenied, match="ACL not found"):
        acl.resolve_token(secret)
    with pytest.raises(NotFound):
        acl.get_token(token.accessor_id)
    assert token.accessor_id not in [t.accessor_id for t in acl.list_tokens()]
    with pytest.raises(NotFound):
        acl.clone_token(token.accessor_id)


def test_an_unknown_secret_is_refused(booted):
    with pytest.raises(PermissionDenied, match="ACL not found"):
        acl.resolve_token(str(uuid.uuid4()))


def test_the_anonymous_token_gets_the_policies_attached_to_it(booted):
    assert not acl.resolve_token(None).authorizer.service_read("web")
    acl.create_policy(name="anon-read", rules='service_prefix "" { policy = "read" }')
    acl.update_token(
        ANONYMOUS_TOKEN_ACCESSOR, description="Anonymous Token", policies=[{"Name": "anon-read"}]
    )
    anonymous = acl.resolve_token("")
    assert anonymous.accessor_id == ANONYMOUS_TOKEN_ACCESSOR
    assert anonymous.authorizer.service_read("web")
    assert not anonymous.authorizer.service_write("web")


def test_update_replaces_description_and_policies(booted):
    acl.create_policy(name="p-one", rules=WEB_WRITE)
    two = acl.create_policy(name="p-two", rules='node_prefix "" { policy = "read" }')
    token, secret = acl.create_token(description="old", policies=[{"Name": "p-one"}])
    updated = acl.update_token(token.accessor_id, description="new", policies=[{"ID": two.id}])
    assert updated.description == "new"
    assert [p.name for p in updated.policies.all()] == ["p-two"]
    assert updated.modify_index > token.modify_index == updated.create_index
    authz = acl.resolve_token(secret).authorizer
    assert authz.node_read("n1") and not authz.service_write("web")


def test_update_refuses_to_change_the_secret_locality_or_expiry(booted):
    token, secret = acl.create_token(description="keep", expiration_ttl=3600)
    accessor = token.accessor_id
    with pytest.raises(BadRequest, match="SecretID is not permitted"):
        acl.update_token(accessor, secret_id=str(uuid.uuid4()))
    with pytest.raises(BadRequest, match="Cannot toggle local mode"):
        acl.update_token(accessor, local=True)
    with pytest.raises(BadRequest, match="Cannot change expiration time"):
        acl.update_token(accessor, expiration_ttl=60)
    with pytest.raises(BadRequest, match="Cannot change expiration time"):
        acl.update_token(accessor, expiration_time=timezone.now() + timedelta(hours=2))
    same = acl.update_token(
        accessor,
        description="ok",
        secret_id=secret,
        local=False,
        expiration_time=acl.parse_time(acl.token_json(token)["ExpirationTime"]),
    )
    assert same.description == "ok"
    assert ACLToken.objects.get(pk=accessor).description == "ok"


def test_update_of_an_unknown_token_is_not_found(booted):
    with pytest.raises(NotFound, match="Cannot find token"):
        acl.update_token(str(uuid.uuid4()), description="x")
    with pytest.raises(BadRequest, match="not a valid UUID"):
        acl.update_token("abc", description="x")


def test_delete_refuses_the_anonymous_token_and_the_callers_own(booted):
    token, _ = acl.create_token()
    with pytest.raises(BadRequest, match="anonymous token"):
        acl.delete_token(ANONYMOUS_TOKEN_ACCESSOR)
    with pytest.raises(BadRequest, match="authorization token is not permitted"):
        acl.delete_token(token.accessor_id, caller_accessor=token.accessor_id)
    assert acl.delete_token(token.accessor_id, caller_accessor=booted[0].accessor_id) is True
    assert not ACLToken.objects.filter(pk=token.accessor_id).exists()
    assert acl.delete_token(token.accessor_id) is True  # already gone: still true, as Consul


def test_clone_copies_policies_with_a_new_accessor_and_secret(booted):
    acl.create_policy(name="clone-me", rules=WEB_WRITE)
    source, source_secret = acl.create_token(description="src", policies=[{"Name": "clone-me"}])
    clone, secret = acl.clone_token(source.accessor_id)
    assert clone.accessor_id != source.accessor_id and secret != source_secret
    assert clone.description == "src"
    assert [p.name for p in clone.policies.all()] == ["clone-me"]
    renamed, _ = acl.clone_token(source.accessor_id, description="copy")
    assert renamed.description == "copy"
    assert acl.resolve_token(secret).authorizer.service_write("web")
    with pytest.raises(NotFound):
        acl.clone_token(str(uuid.uuid4()))


def test_list_filters_tokens_by_policy(booted):
    policy = acl.create_policy(name="listed", rules=WEB_WRITE)
    linked, _ = acl.create_token(policies=[{"ID": policy.id}])
    acl.create_token()
    assert [t.accessor_id for t in acl.list_tokens(policy=policy.id)] == [linked.accessor_id]
    everyone = [t.accessor_id for t in acl.list_tokens()]
    assert everyone == sorted(everyone)
    assert ANONYMOUS_TOKEN_ACCESSOR in everyone and linked.accessor_id in everyone


def test_token_self_finds_the_anonymous_token_without_a_secret(booted):
    assert acl.get_token_by_secret(None).accessor_id == ANONYMOUS_TOKEN_ACCESSOR
    assert acl.get_token_by_secret(booted[1]).accessor_id == booted[0].accessor_id
    with pytest.raises(NotFound):
        acl.get_token_by_secret(str(uuid.uuid4()))


# --- policies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, rules, message",
    [
        ("", "", "no Name is set"),
        ("has space", "", "invalid Name"),
        ("x" * 129, "", "invalid Name"),
        ("bad-hcl", 'service "web" { policy = ', "Failed to parse ACL rules"),
        ("bad-json", '{"service": ', "invalid JSON"),
        ("unknown-resource", 'servise "web" { policy = "read" }', "Unknown ACL resource 'servise'"),
        ("bad-value", 'service "web" { policy = "admin" }', "admin"),
    ],
)
def test_a_bad_policy_is_refused_and_not_stored(booted, name, rules, message):
    before = ACLPolicy.objects.count()
    with pytest.raises(BadRequest, match=message):
        acl.create_policy(name=name, rules=rules)
    assert ACLPolicy.objects.count() == before


def test_policy_names_are_unique(booted):
    acl.create_policy(name="dup", rules=WEB_WRITE)
    with pytest.raises(BadRequest, match='A Policy with Name "dup" already exists'):
        acl.create_policy(name="dup")
    other = acl.create_policy(name="other")
    with pytest.raises(BadRequest, match='name "dup" already exists'):
        acl.update_policy(other.id, name="dup")
    assert ACLPolicy.objects.filter(name="dup").count() == 1


def test_a_policy_update_replaces_its_fields_and_reaches_its_tokens(booted):
    policy = acl.create_policy(name="evolving", description="d", rules=WEB_WRITE)
    _, secret = acl.create_token(policies=[{"ID": policy.id}])
    assert acl.resolve_token(secret).authorizer.service_write("web")
    updated = acl.update_policy(
        policy.id,
        name="evolved",
        rules='service "api" { policy = "write" }',
        datacenters=["dc1"],
    )
    assert (updated.name, updated.description, updated.datacenters) == ("evolved", "", ["dc1"])
    assert updated.modify_index > policy.create_index
    authz = acl.resolve_token(secret).authorizer
    assert authz.service_write("api") and not authz.service_write("web")
    with pytest.raises(NotFound):
        acl.update_policy(str(uuid.uuid4()), name="ghost")


def test_the_builtin_policy_keeps_its_rules_and_cannot_be_deleted(booted):
    builtin = acl.get_policy(GLOBAL_MANAGEMENT_POLICY_ID)
    with pytest.raises(BadRequest, match="Changing the Rules"):
        acl.update_policy(builtin.id, name=builtin.name, rules=WEB_WRITE)
    with pytest.raises(BadRequest, match="Changing the Datacenters"):
        acl.update_policy(builtin.id, name=builtin.name, rules=builtin.rules, datacenters=["dc1"])
    with pytest.raises(BadRequest, match="not permitted on the builtin global-management"):
        acl.delete_policy(builtin.id)
    assert acl.get_policy(builtin.id).rules == builtin.rules
    assert acl.resolve_token(booted[1]).authorizer.is_management()


def test_deleting_a_policy_unlinks_it_from_its_tokens(booted):
    policy = acl.create_policy(name="doomed", rules=WEB_WRITE)
    token, secret = acl.create_token(policies=[{"ID": policy.id}])
    assert acl.delete_policy(policy.id) is True
    assert not ACLPolicy.objects.filter(id=policy.id).exists()
    assert list(acl.get_token(token.accessor_id).policies.all()) == []
    assert not acl.resolve_token(secret).authorizer.service_write("web")
    assert acl.delete_policy(policy.id) is True


def test_policies_are_found_by_id_or_name_and_listed_builtin_first(booted):
    policy = acl.create_policy(name="findable", rules=WEB_WRITE, datacenters=["dc1"])
    assert acl.get_policy(policy.id).name == "findable"
    assert acl.get_policy_by_name("findable").id == policy.id
    with pytest.raises(NotFound):
        acl.get_policy_by_name("nothing")
    assert acl.list_policies()[0].id == GLOBAL_MANAGEMENT_POLICY_ID
    shown = acl.policy_json(policy)
    assert shown["Rules"] == WEB_WRITE and shown["Datacenters"] == ["dc1"]
    assert "Rules" not in acl.policy_json(policy, stub=True)
    assert set(shown) == {
        "ID", "Name", "Description", "Rules", "Datacenters", "Hash", "CreateIndex", "ModifyIndex"
    }  # fmt: skip


def test_every_acl_write_moves_the_acl_index(booted):
    seen = [topic_index(topic.ACL)]

    def moved() -> bool:
        seen.append(topic_index(topic.ACL))
        return seen[-1] > seen[-2]

    policy = acl.create_policy(name="indexed")
    assert moved()
    token, _ = acl.create_token(policies=[{"ID": policy.id}])
    assert moved()
    acl.update_token(token.accessor_id, description="x")
    assert moved()
    acl.clone_token(token.accessor_id)
    assert moved()
    acl.update_policy(policy.id, name="indexed2")
    assert moved()
    acl.delete_token(token.accessor_id)
    assert moved()
    acl.delete_policy(policy.id)
    assert moved()
    with pytest.raises(BadRequest):
        acl.create_policy(name="bad name")
    assert not moved()
