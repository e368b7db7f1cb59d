"""Inbound authorisation decisions (pure: no sockets)."""

from __future__ import annotations

import pytest

from agents.proxy.authz import Authorizer
from meshproto.intentions import IntentionError, from_consul_json
from meshproto.proxycfg import ProxyConfig
from tests.proxy.support import TRUST_DOMAIN, allow, proxy_config, spiffe


def authorizer(intentions=(), default_allow=False) -> Authorizer:
    cfg = proxy_config(
        "api",
        version=1,
        inbound_port=1,
        app_port=2,
        intentions=intentions,
        default_allow=default_allow,
    )
    return Authorizer(ProxyConfig.from_json(cfg))


@pytest.mark.parametrize(
    ("intentions", "default_allow", "source", "allowed"),
    [
        ((), False, "web", False),
        ((), True, "web", True),
        ((allow("web"),), False, "web", True),
        ((allow("web"),), False, "lb", False),
        ((allow("web", action="deny"),), True, "web", False),
        ((allow("*"),), False, "lb", True),
        ((allow("*"), allow("web", action="deny")), False, "web", False),
        ((allow("*", action="deny"), allow("web")), False, "web", True),
        # An intention for another destination does not apply.
        ((allow("web", "db"),), False, "web", False),
    ],
)
def test_it_decides_by_intention_precedence_then_the_default(
    intentions, default_allow, source, allowed
):
    verdict = authorizer(intentions, default_allow).check(spiffe(source))
    assert verdict.allowed is allowed
    assert verdict.identity_ok
    assert verdict.source == source
    assert verdict.reason


def test_intentions_without_a_destination_name_are_for_this_service():
    # The schema's own example: Consul-shaped items scoped to this proxy.
    verdict = authorizer(({"SourceName": "web", "Action": "allow"},)).check(spiffe("web"))
    assert verdict.allowed


@pytest.mark.parametrize(
    ("uri", "code"),
    [
        (None, "no_spiffe_id"),
        ("spiffe://bad domain/ns/default/dc/dc1/svc/web", "bad_spiffe_id"),
        (f"spiffe://{TRUST_DOMAIN}/agent/client/dc/dc1/id/node-a", "bad_spiffe_id"),
        (spiffe("web", "other.mesh"), "foreign_trust_domain"),
    ],
)
def test_unusable_identities_are_refused_before_intentions_are_asked(uri, code):
    verdict = authorizer((allow("*"),), default_allow=True).check(uri)
    assert not verdict.allowed
    assert not verdict.identity_ok
    assert verdict.code == code


def test_an_l7_intention_denies_at_l4_and_says_why():
    l7 = {"SourceName": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}
    verdict = authorizer((l7,)).check(spiffe("web"))
    assert not verdict.allowed
    assert "L7 intentions need the HTTP proxy" in verdict.reason


def test_decisions_are_cached_per_caller_and_a_new_config_starts_afresh():
    first = authorizer((allow("web"),))
    assert first.check(spiffe("web")) is first.check(spiffe("web"))
    second = authorizer((allow("web", action="deny"),))
    assert not second.check(spiffe("web")).allowed
    assert first.check(spiffe("web")).allowed


def test_a_bad_intention_makes_the_config_unusable():
    with pytest.raises(IntentionError):
        authorizer(({"SourceName": "we*b", "Action": "allow"},))
    with pytest.raises(IntentionError):
        authorizer(({"SourceName": "web", "Action": "maybe"},))


def test_from_consul_json_reads_what_a_decision_needs_and_ignores_display_fields():
    ix = from_consul_json(
        {
            "ID": "8f6d7c2a",
            "SourceNS": "default",
            "SourceName": "web",
            "DestinationNS": "default",
            "DestinationName": "api",
            "SourceType": "consul",
            "Action": "allow",
            "Precedence": 9,
            "Meta": {"team": "x"},
            "CreateIndex": 5,
        }
    )
    assert (ix.source_name, ix.destination_name, ix.action, ix.id) == ("web", "api", "allow",
                                                                       "8f6d7c2a")  # fmt: skip
    assert ix.precedence == 9
    with pytest.raises(IntentionError, match="must be a string"):
        from_consul_json({"SourceName": 3, "DestinationName": "api", "Action": "allow"})
    with pytest.raises(IntentionError, match="JSON object"):
        from_consul_json(["web"])
