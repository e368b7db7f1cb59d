"""Peering rules without servers: the token (sign, verify, refusals), the
exported-services entry, and intentions naming a source peer (pure decisions
and the stored service-intentions view)."""

from __future__ import annotations

import base64
import json

import pytest

from meshproto import config_entries as entries
from meshproto import intentions as ix
from meshproto import peering as pure
from registry.domain import config_entries, intentions
from registry.errors import BadRequest
from registry.models import Intention
from registry.txn import Change

KEY = pure.signing_key("a cluster's secret key")


def payload(**over) -> pure.TokenPayload:
    base = dict(
        PeerID="6a1a4c52-0000-4000-8000-000000000001",
        PeerName="cluster-b",
        ServerAddresses=("127.0.0.1:8500",),
        TrustDomain="11111111-2222-3333-4444-555555555555.mesh",
        Datacenter="dc1",
        CAPin=pure.roots_pin(["-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"]),
        ExpiresAt=2_000,
        EstablishmentSecret="s" * 43,
    )
    base.update(over)
    return pure.TokenPayload(**base)


def test_a_token_verifies_under_the_key_that_signed_it_only():
    token = pure.encode_token(payload(), KEY)
    assert pure.verify(token, KEY, now=1_000) == payload()
    with pytest.raises(pure.PeeringError, match="signature is invalid"):
        pure.verify(token, pure.signing_key("another cluster"), now=1_000)


@pytest.mark.parametrize(
    "field,value",
    [
        ("ServerAddresses", ["10.0.0.9:8500"]),
        ("TrustDomain", "evil.mesh"),
        ("CAPin", "sha256:" + "0" * 64),
        ("ExpiresAt", 9_999_999_999),
        ("EstablishmentSecret", "t" * 43),
    ],
)
def test_any_altered_field_breaks_the_signature(field, value):
    body = json.loads(base64.b64decode(pure.encode_token(payload(), KEY)))
    body["Payload"][field] = value
    altered = base64.b64encode(json.dumps(body).encode()).decode()
    with pytest.raises(pure.PeeringError, match="signature is invalid"):
        pure.verify(altered, KEY, now=1_000)


def test_an_expired_token_is_refused_saying_so():
    token = pure.encode_token(payload(ExpiresAt=1_000), KEY)
    with pytest.raises(pure.PeeringError, match=r"expired 5s ago"):
        pure.verify(token, KEY, now=1_005)


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "PeeringToken is required"),
        (None, "PeeringToken is required"),
        ("%%%", "not base64-encoded JSON"),
        (base64.b64encode(b"[1]").decode(), "no payload"),
        (base64.b64encode(b'{"Payload": {"Version": 1}}').decode(), "no signature"),
        (
            base64.b64encode(b'{"Payload": {"Version": 7}, "Signature": "x"}').decode(),
            "version 7 is not supported",
        ),
        ("A" * (pure.MAX_TOKEN_BYTES + 4), "longer than"),
    ],
)
def test_malformed_tokens_are_refused_with_a_message(text, message):
    with pytest.raises(pure.PeeringError, match=message):
        pure.decode_token(text)


def test_the_roots_pin_ignores_order_and_surrounding_space():
    a, b = "-----BEGIN CERTIFICATE-----\nA\n", "-----BEGIN CERTIFICATE-----\nB\n"
    assert pure.roots_pin([a, b]) == pure.roots_pin([b.strip(), a])
    assert pure.roots_pin([a]) != pure.roots_pin([a, b])


def test_peer_names_are_dns_labels():
    assert pure.check_peer_name("cluster-2") == "cluster-2"
    for bad in ("", "Cluster", "-x", "x-", "a" * 64, "a.b", 7):
        with pytest.raises(pure.PeeringError):
            pure.check_peer_name(bad)


# --- exported-services ---------------------------------------------------------------------


def exported(services) -> dict:
    return entries.decode_entry(
        {"Kind": "exported-services", "Name": "default", "Services": services}
    )


def test_exported_services_decode_and_answer_per_peer():
    entry = exported(
        [
            {"Name": "api", "Consumers": [{"Peer": "cluster-b"}, {"Peer": "cluster-c"}]},
            {"Name": "*", "Consumers": [{"Peer": "cluster-c"}]},
        ]
    )
    assert entries.exported_to(entry, "cluster-b") == (False, {"api"})
    assert entries.exported_to(entry, "cluster-c") == (True, {"api"})
    assert entries.exported_to(entry, "nobody") == (False, set())
    assert entries.exported_to(None, "cluster-b") == (False, set())


@pytest.mark.parametrize(
    "services,message",
    [
        ([{"Consumers": [{"Peer": "b"}]}], r"Services\[0\].Name: is required"),
        ([{"Name": "api"}], "at least one consumer"),
        ([{"Name": "api", "Consumers": [{}]}], r"Consumers\[0\].Peer: is required"),
        ([{"Name": "api", "Consumers": [{"Peer": "Not_A_Label"}]}], "invalid peer name"),
        ([{"Name": "api", "Consumers": [{"Partition": "p"}]}], "only Peer consumers"),
        ([{"Name": "api", "Consumers": [{"Peer": "b"}, {"Peer": "b"}]}], "more than once"),
        (
            [
                {"Name": "api", "Consumers": [{"Peer": "b"}]},
                {"Name": "api", "Consumers": [{"Peer": "c"}]},
            ],
            'service "api" is listed more than once',
        ),
        ([{"Name": "api", "Namespace": "ops", "Consumers": [{"Peer": "b"}]}], 'only "default"'),
        ([{"Name": "api", "Consumers": [{"Peer": "b"}], "Colour": 1}], "Colour"),
    ],
)
def test_bad_exported_services_entries_name_the_field(services, message):
    with pytest.raises(entries.ConfigEntryError, match=message):
        exported(services)


def test_the_exported_services_entry_is_named_default():
    with pytest.raises(entries.ConfigEntryError, match='partition, "default"'):
        entries.decode_entry({"Kind": "exported-services", "Name": "mine", "Services": []})


# --- intentions naming a source peer -------------------------------------------------------


def test_a_peer_source_matches_only_intentions_naming_that_peer():
    index = ix.IntentionIndex(
        [
            ix.validate(source_name="web", destination_name="api", action="deny"),
            ix.validate(
                source_name="web", destination_name="api", action="allow", source_peer="cluster-b"
            ),
            ix.validate(source_name="*", destination_name="db", action="allow"),
        ]
    )
    assert not index.decide("web", "api").allowed  # ours: denied
    decision = index.decide("web", "api", source_peer="cluster-b")
    assert decision.allowed and "peer:cluster-b/web => api" in decision.reason
    assert not index.decide("web", "api", source_peer="cluster-c").allowed
    # A local `*` source never covers a peer's services.
    assert index.decide("web", "db").allowed
    assert not index.decide("web", "db", source_peer="cluster-b").allowed


def test_default_allow_never_lets_a_peer_in():
    index = ix.IntentionIndex([], default_allow=True)
    assert index.decide("web", "api").allowed
    peer = index.decide("web", "api", source_peer="cluster-b")
    assert not peer.allowed and "deny" in peer.reason


def test_a_bad_source_peer_is_refused():
    with pytest.raises(ix.IntentionError, match="not a valid peer name"):
        ix.validate(source_name="web", destination_name="api", action="allow", source_peer="B!")


@pytest.mark.django_db
def test_service_intentions_sources_with_peer_are_stored_and_shown():
    entry = config_entries.decode(
        {
            "Kind": "service-intentions",
            "Name": "api",
            "Sources": [
                {"Name": "web", "Peer": "cluster-b", "Action": "allow"},
                {"Name": "web", "Action": "deny"},
            ],
        }
    )
    assert config_entries.write(entry) is True
    rows = {(r.source_peer, r.source_name): r.action for r in Intention.objects.all()}
    assert rows == {("cluster-b", "web"): "allow", ("", "web"): "deny"}
    _, shown = config_entries.get("service-intentions", "api")
    assert {(s.get("Peer", ""), s["Name"], s["Action"]) for s in shown["Sources"]} == {
        ("cluster-b", "web", "allow"),
        ("", "web", "deny"),
    }
    as_json = [intentions.intention_json(r) for r in Intention.objects.all()]
    assert sorted(j.get("SourcePeer", "") for j in as_json) == ["", "cluster-b"]
    # The same source and peer twice in one entry is refused, nothing changes.
    with pytest.raises(BadRequest, match="more than once"), Change() as change:
        intentions.replace_for_destination(
            change,
            "api",
            [{"Name": "web", "Peer": "cluster-b", "Action": "allow"}] * 2,
        )
    assert Intention.objects.count() == 2
