"""The KV store and sessions in the service layer (registry.domain.kv / .sessions).

Time-dependent rules (TTL expiry, lock-delay) are tested here by passing
the clock in or using sub-second delays; the HTTP shapes live in
test_kv_api.py and test_sessions_api.py.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from registry import topics as topic
from registry.acl_rules import Authorizer, parse_rules
from registry.domain import catalog, kv, sessions
from registry.errors import BadRequest, NotFound, TooLarge
from registry.models import Check, KVEntry, Session
from registry.txn import topic_index

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_lock_delays():
    kv.lock_delays.clear()
    yield
    kv.lock_delays.clear()


@pytest.fixture
def node():
    return catalog.local_node()


def _session(node, **spec) -> Session:
    return sessions.create_session(spec, node.name)


def _authz(rules: str) -> Authorizer:
    return Authorizer.from_rules([parse_rules(rules)])


def _value(key: str) -> bytes | None:
    entry = KVEntry.objects.filter(key=key).first()
    return None if entry is None else bytes(entry.value or b"")


# --- keys and values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, message",
    [
        ("", "Missing key name"),
        ("/lead", "must not begin with a '/'"),
        ("a\x00b", "NUL"),
        ("bad\ufffd", "valid UTF-8"),
        ("k" * 2049, "longer than 2048"),
    ],
)
def test_it_refuses_keys_consul_or_the_database_cannot_take(key, message):
    with pytest.raises(BadRequest, match=message):
        kv.put(key, b"v")
    assert KVEntry.objects.count() == 0


def test_a_non_utf8_raw_path_is_refused_and_an_encoded_one_is_decoded():
    assert kv.key_from_raw_path(b"/v1/kv/caf%C3%A9/x%20y") == "café/x y"
    with pytest.raises(BadRequest, match="valid UTF-8"):
        kv.key_from_raw_path(b"/v1/kv/bad%FFkey")


@pytest.mark.parametrize("raw", ["", "-1", "1.5", "abc", "+3", str(2**64)])
def test_flags_and_cas_must_be_unsigned_64_bit_integers(raw):
    with pytest.raises(BadRequest, match=r"\?flags"):
        kv.parse_uint64("flags", raw)


def test_flags_keep_all_64_bits():
    kv.put("flags/max", b"v", flags=2**64 - 1)
    assert kv.entry_json(KVEntry.objects.get(key="flags/max"))["Flags"] == 2**64 - 1


def test_an_empty_value_reads_as_null():
    kv.put("empty", b"")
    assert kv.entry_json(KVEntry.objects.get(key="empty"))["Value"] is None


def test_an_oversized_value_is_refused_with_consuls_text(settings):
    settings.MESH_KV_MAX_VALUE_SIZE = 8
    with pytest.raises(TooLarge, match=r"^Request body\(9 bytes\) too large, max size: 8 bytes"):
        kv.put("big", b"123456789")
    assert not KVEntry.objects.filter(key="big").exists()


def test_an_unchanged_write_keeps_its_modify_index():
    kv.put("same", b"v", flags=3)
    before = KVEntry.objects.get(key="same").modify_index
    assert kv.put("same", b"v", flags=3) is True
    assert KVEntry.objects.get(key="same").modify_index == before
    assert kv.put("same", b"w", flags=3) is True
    assert KVEntry.objects.get(key="same").modify_index > before


def test_cas_zero_only_creates_and_a_stale_index_does_not_write():
    assert kv.put("cas/k", b"one", cas=0) is True
    assert kv.put("cas/k", b"two", cas=0) is False
    index = KVEntry.objects.get(key="cas/k").modify_index
    assert kv.put("cas/k", b"three", cas=index + 100) is False
    assert kv.put("cas/k", b"three", cas=index) is True
    assert _value("cas/k") == b"three"


def test_a_cas_delete_of_a_missing_key_answers_true_as_consul():
    assert kv.delete("cas/missing", cas=5) is True


def test_a_recursive_delete_is_case_sensitive_and_moves_each_deleted_keys_index():
    for key in ("tree/a", "tree/b/c", "Tree/x", "treehouse"):
        kv.put(key, b"v")
    assert kv.delete("tree/", recurse=True) is True
    assert sorted(KVEntry.objects.values_list("key", flat=True)) == ["Tree/x", "treehouse"]
    assert (
        topic_index(topic.kv("tree/a"))
        == topic_index(topic.kv("tree/b/c"))
        > topic_index(topic.kv("Tree/x"))
    )


# --- listing --------------------------------------------------------------------------------


def test_recurse_lists_in_byte_order_and_only_under_the_prefix():
    for key in ("p/b", "p/B", "p/a/1", "P/a", "q"):
        kv.put(key, b"v")
    listing = kv.list_prefix(Authorizer.allow_all(), "p/")
    assert [e.key for e in listing.items] == ["p/B", "p/a/1", "p/b"]
    assert listing.filtered is False
    assert listing.index >= max(topic_index(topic.kv(k)) for k in ("p/b", "p/B", "p/a/1"))


@pytest.mark.parametrize(
    "prefix, separator, expected",
    [
        ("s/", "", ["s/a", "s/b/c", "s/b/d", "s/e/f/g"]),
        ("s/", "/", ["s/a", "s/b/", "s/e/"]),
        ("s/b", "/", ["s/b/"]),
        ("s/", "b/", ["s/a", "s/b/", "s/e/f/g"]),
    ],
)
def test_keys_fold_at_the_separator_as_consul(prefix, separator, expected):
    for key in ("s/a", "s/b/c", "s/b/d", "s/e/f/g"):
        kv.put(key, b"v")
    assert kv.list_keys(Authorizer.allow_all(), prefix, separator).items == expected


def test_listings_show_only_what_the_token_may_read():
    for key in ("team/a", "team/secret/b", "other/c"):
        kv.put(key, b"v")
    authz = _authz(
        'key_prefix "team/" { policy = "read" }\nkey_prefix "team/secret/" { policy = "deny" }'
    )
    listing = kv.list_prefix(authz, "")
    assert [e.key for e in listing.items] == ["team/a"]
    assert listing.filtered is True
    assert kv.list_keys(authz, "team/").items == ["team/a"]


def test_a_prefix_index_never_goes_backwards_after_a_delete():
    kv.put("idx/a", b"v")
    kv.put("idx/b", b"v")
    before = kv.list_prefix(Authorizer.allow_all(), "idx/").index
    kv.delete("idx/b")
    after = kv.list_prefix(Authorizer.allow_all(), "idx/").index
    assert after > before


# --- sessions: create ------------------------------------------------------------------------


def test_a_default_session_binds_the_nodes_serf_check_and_releases_with_15s_lock_delay(node):
    s = _session(node)
    data = sessions.session_json(s)
    assert data["Node"] == node.name
    assert data["NodeChecks"] == ["serfHealth"]
    assert data["ServiceChecks"] is None
    assert data["LockDelay"] == 15_000_000_000
    assert data["Behavior"] == "release"
    assert data["TTL"] == ""
    assert data["CreateIndex"] == data["ModifyIndex"] == topic_index(topic.session(s.id))
    assert s.expires_at is None


@pytest.mark.parametrize(
    "value, ns",
    [
        ("15s", 15_000_000_000),
        ("1m", 60_000_000_000),
        ("250ms", 250_000_000),
        (5, 5_000_000_000),  # Consul: a number under 1000 is seconds
        (2_000_000_000, 2_000_000_000),
        ("0", 0),
        (None, 15_000_000_000),
    ],
)
def test_lock_delay_accepts_durations_and_nanoseconds_like_consul(value, ns):
    assert sessions.lock_delay_ns(value) == ns


@pytest.mark.parametrize("value", ["soon", -1, True, [1]])
def test_a_bad_lock_delay_is_a_400(value):
    with pytest.raises(BadRequest, match="LockDelay"):
        sessions.lock_delay_ns(value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"TTL": "5s"}, r"Invalid Session TTL '5s', must be between \[10s=24h0m0s\]"),
        ({"TTL": "86401s"}, "Invalid Session TTL"),
        ({"TTL": "10"}, "Session TTL '10' invalid"),
        ({"Behavior": "keep"}, "Invalid Behavior setting 'keep'"),
        ({"NodeChecks": ["nope"]}, "Missing check 'nope' registration"),
        ({"ServiceChecks": [{"ID": "nope"}]}, "Missing check 'nope' registration"),
        ({"ServiceChecks": [{"Namespace": "x"}]}, r"ServiceChecks\[0\].ID is required"),
    ],
)
def test_bad_sessions_are_refused_and_nothing_is_written(node, spec, message):
    with pytest.raises(BadRequest, match=message):
        _session(node, **spec)
    assert Session.objects.count() == 0


def test_a_session_for_an_unknown_node_is_refused(node):
    with pytest.raises(BadRequest, match="^Missing node registration$"):
        sessions.create_session({}, "no-such-node")


def test_a_session_bound_to_a_critical_check_is_refused(node):
    Check.objects.create(node=node, check_id="db", name="db", status=Check.CRITICAL)
    with pytest.raises(BadRequest, match="^Check 'db' is in critical state$"):
        _session(node, NodeChecks=["serfHealth", "db"])


def test_the_ttl_minimum_comes_from_settings(node, settings):
    settings.MESH_SESSION_TTL_MIN = 1.0
    s = _session(node, TTL="1s")
    assert s.ttl == "1s"


def test_checks_and_node_checks_merge_and_an_empty_list_binds_none(node):
    Check.objects.create(node=node, check_id="app", name="app", status=Check.PASSING)
    assert _session(node, Checks=["app"]).node_checks == ["app"]
    assert _session(node, NodeChecks=["serfHealth"], Checks=["app"]).node_checks == [
        "serfHealth",
        "app",
    ]
    assert _session(node, Checks=[]).node_checks == []


# --- locks ------------------------------------------------------------------------------------


def test_a_lock_is_exclusive_and_lock_index_counts_acquisitions(node):
    one, two = _session(node, LockDelay=0), _session(node, LockDelay=0)
    assert kv.put("lock/a", b"1", acquire=one.id) is True
    assert kv.put("lock/a", b"1", acquire=one.id) is True  # re-acquire by the holder
    assert kv.put("lock/a", b"2", acquire=two.id) is False
    assert kv.put("lock/a", b"2", release=two.id) is False
    entry = KVEntry.objects.get(key="lock/a")
    assert (entry.session_id, entry.lock_index, bytes(entry.value)) == (one.id, 1, b"1")
    assert kv.put("lock/a", b"", release=one.id) is True
    assert kv.put("lock/a", b"2", acquire=two.id) is True
    entry.refresh_from_db()
    assert (entry.session_id, entry.lock_index) == (two.id, 2)


def test_a_plain_write_to_a_locked_key_keeps_the_holder(node):
    s = _session(node)
    kv.put("lock/plain", b"1", acquire=s.id)
    kv.put("lock/plain", b"2")
    entry = KVEntry.objects.get(key="lock/plain")
    assert (entry.session_id, bytes(entry.value)) == (s.id, b"2")


def test_acquiring_with_an_unknown_session_is_a_400_that_writes_nothing(node):
    before = topic_index(topic.kv("lock/ghost"))
    with pytest.raises(BadRequest, match="Invalid session"):
        kv.put("lock/ghost", b"v", acquire=str(uuid.uuid4()))
    assert not KVEntry.objects.filter(key="lock/ghost").exists()
    assert topic_index(topic.kv("lock/ghost")) == before


def test_conflicting_lock_flags_are_refused(node):
    s = _session(node)
    with pytest.raises(BadRequest, match="Conflicting flags"):
        kv.put("lock/c", b"v", cas=0, acquire=s.id)


def test_an_ended_session_releases_its_locks_or_deletes_them(
    node, django_capture_on_commit_callbacks
):
    keep = _session(node, LockDelay=0)
    drop = _session(node, LockDelay=0, Behavior="delete")
    kv.put("end/keep", b"v", acquire=keep.id)
    kv.put("end/drop", b"v", acquire=drop.id)
    with django_capture_on_commit_callbacks(execute=True):
        sessions.destroy_session(keep.id)
        sessions.destroy_session(drop.id)
    entry = KVEntry.objects.get(key="end/keep")
    assert entry.session_id is None and entry.lock_index == 1
    assert not KVEntry.objects.filter(key="end/drop").exists()
    assert Session.objects.count() == 0
    assert sessions.destroy_session(keep.id) is True  # idempotent


def test_lock_delay_refuses_a_new_holder_until_it_lapses(node, django_capture_on_commit_callbacks):
    first = _session(node, LockDelay="400ms")
    second = _session(node, LockDelay=0)
    kv.put("delay/k", b"v", acquire=first.id)
    with django_capture_on_commit_callbacks(execute=True):
        sessions.destroy_session(first.id)
    assert kv.put("delay/k", b"v", acquire=second.id) is False
    deadline = time.monotonic() + 5
    while not kv.put("delay/k", b"v", acquire=second.id):
        assert time.monotonic() < deadline, "lock-delay never lapsed"
        time.sleep(0.05)
    assert KVEntry.objects.get(key="delay/k").session_id == second.id


def test_a_critical_check_ends_the_sessions_bound_to_it(node, django_capture_on_commit_callbacks):
    Check.objects.create(node=node, check_id="web-ok", name="web", status=Check.PASSING)
    s = _session(node, NodeChecks=["web-ok"], LockDelay=0)
    kv.put("crit/k", b"v", acquire=s.id)
    with django_capture_on_commit_callbacks(execute=True):
        catalog.update_check_status(node, "web-ok", Check.CRITICAL)
    assert not Session.objects.filter(id=s.id).exists()
    assert KVEntry.objects.get(key="crit/k").session_id is None


# --- TTL -------------------------------------------------------------------------------------


def test_a_session_expires_after_twice_its_ttl_and_renewing_pushes_that_back(node):
    s = _session(node, TTL="10s", LockDelay=0)
    kv.put("ttl/k", b"v", acquire=s.id)
    now = timezone.now()
    assert sessions.expire_sessions(now + timedelta(seconds=15)) == 0  # past TTL, not 2 x TTL
    renewed = sessions.renew_session(s.id)
    assert renewed.expires_at >= now + timedelta(seconds=20)
    assert sessions.expire_sessions(now + timedelta(seconds=19)) == 0
    assert sessions.expire_sessions(renewed.expires_at + timedelta(seconds=1)) == 1
    assert not Session.objects.filter(id=s.id).exists()
    assert KVEntry.objects.get(key="ttl/k").session_id is None


def test_expiry_leaves_sessions_without_ttl_and_deletes_keys_of_delete_sessions(node):
    forever = _session(node)
    ephemeral = _session(node, TTL="10s", Behavior="delete", LockDelay=0)
    kv.put("ttl/eph", b"v", acquire=ephemeral.id)
    assert sessions.expire_sessions(timezone.now() + timedelta(hours=1)) == 1
    assert list(Session.objects.values_list("id", flat=True)) == [forever.id]
    assert not KVEntry.objects.filter(key="ttl/eph").exists()
    assert sessions.expire_sessions() == 0


def test_renewing_an_unknown_session_is_not_found():
    with pytest.raises(NotFound, match="Session id '.*' not found"):
        sessions.renew_session(str(uuid.uuid4()))


def test_session_reads_filter_by_session_read_on_the_node(node):
    s = _session(node)
    allowed = _authz(f'session "{node.name}" {{ policy = "read" }}')
    denied = _authz('session "elsewhere" { policy = "read" }')
    assert [x["ID"] for x in sessions.list_sessions(allowed)[1]] == [s.id]
    index, shown, filtered = sessions.session_info(denied, s.id)
    assert (shown, filtered) == ([], True)
    assert index == topic_index(topic.session(s.id))
