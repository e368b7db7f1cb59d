"""SPIFFE, SNI and key helpers shared by the control plane and agents."""

from __future__ import annotations

import pytest

from meshproto import pki, spiffe


def test_a_service_id_round_trips_through_its_uri():
    sid = spiffe.service_id("abc123.mesh", "web", "dc1")
    assert sid.uri == "spiffe://abc123.mesh/ns/default/dc/dc1/svc/web"
    assert spiffe.parse(sid.uri) == sid


def test_an_agent_id_round_trips_through_its_uri():
    aid = spiffe.agent_id("abc123.mesh", "host-a", "dc2")
    assert aid.uri == "spiffe://abc123.mesh/agent/client/dc/dc2/id/host-a"
    assert spiffe.parse(aid.uri) == aid


@pytest.mark.parametrize(
    "uri",
    [
        "http://abc.mesh/ns/default/dc/dc1/svc/web",
        "spiffe://ABC.mesh/ns/default/dc/dc1/svc/web",
        "spiffe://abc.mesh/ns/default/dc/dc1/svc/",
        "spiffe://abc.mesh/ns/default/dc/dc1/svc/we b",
        "spiffe://abc.mesh/ns/default/dc/dc1",
        "spiffe://abc.mesh/agent/client/dc/dc1/node/x",
        "",
    ],
)
def test_malformed_ids_are_refused(uri):
    with pytest.raises(spiffe.SpiffeError):
        spiffe.parse(uri)


def test_gateway_sni_names_round_trip():
    sni = spiffe.gateway_sni("api", "default", "dc2", "abc.mesh")
    assert sni == "api.default.dc2.internal.abc.mesh"
    assert spiffe.parse_sni(sni, "abc.mesh") == ("api", "default", "dc2")
    assert spiffe.parse_sni(sni, "other.mesh") is None
    assert spiffe.parse_sni("api.dc2.internal.abc.mesh", "abc.mesh") is None


def test_a_csr_carries_only_the_spiffe_uri_and_dns_names_asked_for():
    from cryptography import x509

    key = pki.generate_key()
    csr = x509.load_pem_x509_csr(
        pki.make_csr(key, "spiffe://a.mesh/ns/default/dc/dc1/svc/web", ["web.local"]).encode()
    )
    assert pki.uri_sans(csr) == ["spiffe://a.mesh/ns/default/dc/dc1/svc/web"]
    assert pki.dns_sans(csr) == ["web.local"]
    assert csr.is_signature_valid


@pytest.mark.parametrize(("kind", "bits"), [("ec", 256), ("ec", 384), ("rsa", 2048)])
def test_keys_of_each_supported_kind_are_generated(kind, bits):
    key = pki.generate_key(kind, bits)
    assert key.key_size == bits
    assert pki.load_key(pki.key_pem(key)).key_size == bits


@pytest.mark.parametrize(("kind", "bits"), [("ec", 521), ("rsa", 1024), ("dsa", 2048)])
def test_unsupported_keys_are_refused(kind, bits):
    with pytest.raises(ValueError):
        pki.generate_key(kind, bits)
