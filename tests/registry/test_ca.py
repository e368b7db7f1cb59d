"""The Connect CA's service layer: providers, key encryption, the rate limit,
the manager's transitions, and every rule `sign_csr` applies to a CSR."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import threading
import time

import pytest
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

from meshproto import pki, spiffe
from registry import audit, decode
from registry.acl_rules import Authorizer, parse_rules
from registry.ca import secrets
from registry.ca.manager import CAState, ensure_initialized, manager, validate_config
from registry.ca.provider import BACKDATE, PROVIDERS, ROOT_PATH_LENGTH, get_provider
from registry.ca.ratelimit import RATE_LIMITED, CSRRateLimiter
from registry.domain import catalog, connect_ca, health
from registry.domain.acl import Identity
from registry.errors import BadRequest, PermissionDenied, TooManyRequests
from registry.models import (
    AuditEntry,
    CAConfig,
    CARoot,
    ClusterIdentity,
    IssuedCert,
    TopicIndex,
)

MANAGEMENT = Identity("mgmt-accessor", Authorizer.management(), "management")


def token_for(rules: str, accessor: str = "9a0b7c1d-0000-4000-8000-00000000beef") -> Identity:
    return Identity(accessor, Authorizer.from_rules([parse_rules(rules)]), "test token")


def service_uri(service: str, dc: str = "dc1", ns: str = "default") -> str:
    return spiffe.service_id(connect_ca.trust_domain(), service, dc, ns).uri


def csr_for(uri: str, dns: tuple[str, ...] = (), key=None) -> str:
    return pki.make_csr(key or pki.generate_key(), uri, dns)


def raw_csr(key, sans: list[x509.GeneralName], *, extensions=(), hash_alg=None) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    csr = builder.sign(key, hash_alg or hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def ca(db, settings):
    settings.MESH_CA_CSR_RATE = "0"  # the limit has its own tests
    settings.MESH_CA_LEAF_TTL = ""
    ensure_initialized()
    CAConfig.objects.filter(id=1).update(
        config={**CAConfig.objects.get(id=1).config, "CSRMaxPerSecond": 0}
    )
    return connect_ca


# --- provider contract (every registered provider) -------------------------------------------


@pytest.fixture(params=sorted(PROVIDERS))
def provider(request):
    return get_provider(request.param)


@pytest.mark.parametrize("key_type,bits", [("ec", 256), ("ec", 384), ("rsa", 2048)])
def test_a_provider_makes_a_root_ca_for_the_trust_domain(provider, key_type, bits):
    material = provider.generate_root(
        "abc.mesh", key_type=key_type, key_bits=bits, ttl=dt.timedelta(days=3650)
    )
    cert = pki.load_cert(material.cert_pem)
    key = pki.load_key(material.key_pem)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == ROOT_PATH_LENGTH
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert pki.uri_sans(cert) == ["spiffe://abc.mesh"]
    assert cert.issuer == cert.subject
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=3650) + BACKDATE
    cert.verify_directly_issued_by(cert)


def test_two_roots_never_share_a_subject(provider):
    a, b = (
        provider.generate_root("abc.mesh", key_type="ec", key_bits=256, ttl=dt.timedelta(days=1))
        for _ in range(2)
    )
    assert pki.load_cert(a.cert_pem).subject != pki.load_cert(b.cert_pem).subject


@pytest.mark.parametrize("leaf_key", ["ec", "rsa"])
def test_a_provider_signs_a_leaf_with_only_the_identity_given(provider, leaf_key):
    root = provider.generate_root("abc.mesh", key_type="ec", key_bits=256, ttl=dt.timedelta(days=9))
    signer = provider.load_signer(root.cert_pem, root.key_pem)
    key = pki.generate_key(leaf_key, 256 if leaf_key == "ec" else 2048)
    csr = x509.load_pem_x509_csr(
        pki.make_csr(key, "spiffe://evil.mesh/x", ["evil.example"]).encode()
    )
    uri = "spiffe://abc.mesh/ns/default/dc/dc1/svc/web"
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = provider.sign_leaf(
        signer, csr, uri, ["web.service.consul"], dt.timedelta(hours=2), "web"
    )
    assert pki.uri_sans(cert) == [uri]
    assert pki.dns_sans(cert) == ["web.service.consul"]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment == (leaf_key == "rsa")
    assert not ku.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = signer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert (
        before - BACKDATE - dt.timedelta(seconds=1)
        <= cert.not_valid_before_utc
        <= before - BACKDATE + dt.timedelta(seconds=2)
    )
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(hours=2) + BACKDATE
    cert.verify_directly_issued_by(signer.cert)


def test_a_leaf_never_outlives_its_root(provider):
    root = provider.generate_root(
        "abc.mesh", key_type="ec", key_bits=256, ttl=dt.timedelta(hours=1)
    )
    signer = provider.load_signer(root.cert_pem, root.key_pem)
    csr = x509.load_pem_x509_csr(csr_for("spiffe://abc.mesh/ns/default/dc/dc1/svc/web").encode())
    cert = provider.sign_leaf(
        signer, csr, "spiffe://abc.mesh/ns/default/dc/dc1/svc/web", [], dt.timedelta(days=3), "web"
    )
    assert cert.not_valid_after_utc == signer.cert.not_valid_after_utc


def test_a_cross_signed_root_carries_the_other_roots_subject_and_key(provider):
    old = provider.generate_root("abc.mesh", key_type="ec", key_bits=256, ttl=dt.timedelta(days=9))
    new = provider.generate_root(
        "abc.mesh", key_type="rsa", key_bits=2048, ttl=dt.timedelta(days=9)
    )
    old_signer = provider.load_signer(old.cert_pem, old.key_pem)
    new_cert = pki.load_cert(new.cert_pem)
    cross = provider.cross_sign(old_signer, new_cert)
    assert cross.subject == new_cert.subject
    assert cross.issuer == old_signer.cert.subject
    assert cross.public_key().public_numbers() == new_cert.public_key().public_numbers()
    assert pki.key_id(cross.public_key()) == pki.key_id(new_cert.public_key())
    bc = cross.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert pki.uri_sans(cross) == ["spiffe://abc.mesh"]
    cross.verify_directly_issued_by(old_signer.cert)


# --- encryption at rest ------------------------------------------------------------------


def test_a_key_is_stored_encrypted_and_decrypts_to_itself(settings):
    settings.MESH_ENCRYPTION_KEY = Fernet.generate_key().decode()
    pem = pki.key_pem(pki.generate_key())
    stored = secrets.encrypt(pem)
    assert stored.startswith("fernet:") and "PRIVATE KEY" not in stored
    assert secrets.decrypt(stored) == pem


def test_without_an_encryption_key_the_key_is_derived_from_the_secret_key_with_hkdf(settings):
    settings.MESH_ENCRYPTION_KEY = ""
    settings.SECRET_KEY = "a-secret-for-this-test"
    stored = secrets.encrypt("hello")
    derived = Fernet(secrets.derive_key("a-secret-for-this-test"))
    assert derived.decrypt(stored.removeprefix("fernet:").encode()) == b"hello"
    assert len(base64.urlsafe_b64decode(secrets.derive_key("x"))) == 32


def test_a_wrong_key_refuses_to_decrypt(settings):
    settings.MESH_ENCRYPTION_KEY = Fernet.generate_key().decode()
    stored = secrets.encrypt("hello")
    settings.MESH_ENCRYPTION_KEY = Fernet.generate_key().decode()
    with pytest.raises(secrets.KeyDecryptionError, match="MESH_ENCRYPTION_KEY"):
        secrets.decrypt(stored)


def test_an_old_key_listed_second_still_decrypts(settings):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.MESH_ENCRYPTION_KEY = old
    stored = secrets.encrypt("hello")
    settings.MESH_ENCRYPTION_KEY = f"{new},{old}"
    assert secrets.decrypt(stored) == "hello"
    assert Fernet(new.encode()).decrypt(secrets.encrypt("x").removeprefix("fernet:").encode())


def test_a_malformed_encryption_key_stops_with_the_settings_name(settings):
    settings.MESH_ENCRYPTION_KEY = "not-a-fernet-key"
    with pytest.raises(ImproperlyConfigured, match="MESH_ENCRYPTION_KEY"):
        secrets.encrypt("x")


def test_the_root_key_in_the_database_is_never_plaintext(ca):
    root = CARoot.objects.get(active=True)
    assert "PRIVATE KEY" not in root.private_key_encrypted
    assert "PRIVATE KEY" in secrets.decrypt(root.private_key_encrypted)


def test_start_up_fails_loudly_when_the_key_does_not_decrypt_the_root(ca, settings):
    settings.MESH_ENCRYPTION_KEY = Fernet.generate_key().decode()
    with pytest.raises(ImproperlyConfigured, match="cannot decrypt"):
        ensure_initialized()


# --- rate limit ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def test_the_limiter_allows_a_burst_then_queues_then_refuses():
    clock = FakeClock()
    limiter = CSRRateLimiter(10, 3, clock=clock, sleep=clock.sleep)
    assert [limiter.reserve() for _ in range(10)] == [0.0] * 10
    waits = [limiter.reserve() for _ in range(3)]
    assert waits == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(TooManyRequests, match=RATE_LIMITED):
        limiter.reserve()
    clock.now += 0.1  # the first waiter's token is due: one place in the queue frees up
    assert limiter.reserve() == pytest.approx(0.3)


def test_the_limiter_refills_at_its_rate_and_a_zero_rate_is_no_limit():
    clock = FakeClock()
    limiter = CSRRateLimiter(2, 0, clock=clock, sleep=clock.sleep)
    limiter.acquire()
    limiter.acquire()
    with pytest.raises(TooManyRequests):
        limiter.acquire()
    clock.now += 0.5
    limiter.acquire()
    assert clock.slept == []
    unlimited = CSRRateLimiter(0, 0, clock=clock, sleep=clock.sleep)
    assert all(unlimited.reserve() == 0.0 for _ in range(1000))


def test_signing_is_rate_limited_from_the_ca_configuration(ca):
    ca.set_configuration({"Config": {"CSRMaxPerSecond": 1, "CSRMaxConcurrent": 0}})
    csr = csr_for(service_uri("web"))
    ca.sign_csr(MANAGEMENT, csr)
    with pytest.raises(TooManyRequests) as err:
        ca.sign_csr(MANAGEMENT, csr)
    assert err.value.status == 429


# --- the manager ---------------------------------------------------------------------------


def test_initialization_creates_a_trust_domain_one_root_and_the_default_configuration(ca):
    identity = ClusterIdentity.objects.get(id=1)
    assert identity.trust_domain == f"{identity.cluster_id}.mesh"
    spiffe.check_trust_domain(identity.trust_domain)
    assert manager.state() is CAState.READY
    root = CARoot.objects.get()
    assert root.active and root.private_key_type == "ec" and root.private_key_bits == 256
    cert = pki.load_cert(root.root_cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert (root.not_after - root.not_before) >= dt.timedelta(days=3650)
    assert CAConfig.objects.get().config["LeafCertTTL"] == "72h"


def test_initialization_is_idempotent(ca):
    td = connect_ca.trust_domain()
    assert ensure_initialized() is False
    assert CARoot.objects.count() == 1 and connect_ca.trust_domain() == td


@pytest.mark.django_db(transaction=True)
def test_two_servers_initializing_at_once_make_one_trust_domain_and_one_root():
    if connection.vendor == "sqlite":
        pytest.skip(
            "the test database is in-memory shared-cache SQLite, whose table locks ignore the "
            "busy timeout; test_ca_api starts servers at once on one SQLite file instead"
        )
    barrier = threading.Barrier(4)
    results, errors = [], []

    def start():
        try:
            barrier.wait(5)
            results.append(ensure_initialized())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(results) == [False, False, False, True]
    assert CARoot.objects.count() == 1 and ClusterIdentity.objects.count() == 1


def test_roots_json_has_consuls_fields_and_never_a_private_key(ca):
    index, data = ca.roots_json()
    assert index > 0
    root = CARoot.objects.get()
    assert data["ActiveRootID"] == root.id and data["TrustDomain"] == ca.trust_domain()
    (r,) = data["Roots"]
    assert set(r) == {
        "ID", "Name", "SerialNumber", "SigningKeyID", "ExternalTrustDomain", "NotBefore",
        "NotAfter", "RootCert", "IntermediateCerts", "Active", "RotatedOutAt",
        "PrivateKeyType", "PrivateKeyBits", "CreateIndex", "ModifyIndex",
    }  # fmt: skip
    assert r["Active"] is True and r["IntermediateCerts"] is None
    assert isinstance(r["SerialNumber"], int) and r["SigningKeyID"].count(":") == 19
    assert r["NotAfter"].endswith("Z") and r["RotatedOutAt"] == "0001-01-01T00:00:00Z"
    assert "PRIVATE" not in str(data)
    _index, bundle = ca.roots_pem()
    assert pki.load_certs(bundle)[0] == pki.load_cert(r["RootCert"])


def test_a_rotation_cross_signs_both_ways_and_keeps_the_old_root_until_its_leaves_expire(ca):
    old = CARoot.objects.get()
    leaf = ca.sign_csr(MANAGEMENT, csr_for(service_uri("web")))
    roots_index = TopicIndex.objects.get(topic="ca-roots").index
    new = ca.rotate()
    assert manager.state() is CAState.ROTATED
    old.refresh_from_db()
    assert new.active and not old.active and old.rotated_out_at is not None
    assert old.retire_after >= leaf.not_after
    assert TopicIndex.objects.get(topic="ca-roots").index > roots_index
    old_cert, new_cert = pki.load_cert(old.root_cert), pki.load_cert(new.root_cert)
    (new_by_old,) = [pki.load_cert(p) for p in new.intermediate_certs]
    (old_by_new,) = [pki.load_cert(p) for p in old.intermediate_certs]
    new_by_old.verify_directly_issued_by(old_cert)
    assert new_by_old.subject == new_cert.subject
    old_by_new.verify_directly_issued_by(new_cert)
    assert old_by_new.subject == old_cert.subject
    _index, data = ca.roots_json()
    assert data["ActiveRootID"] == new.id and [r["Active"] for r in data["Roots"]] == [False, True]
    after = ca.sign_csr(MANAGEMENT, csr_for(service_uri("web")))
    assert after.root_id == new.id and after.intermediates == tuple(new.intermediate_certs)


def test_old_roots_retire_once_their_last_leaf_expired(ca, settings):
    settings.MESH_CA_LEAF_TTL = "1s"
    old = CARoot.objects.get()
    ca.sign_csr(MANAGEMENT, csr_for(service_uri("web")))
    new = ca.rotate()
    assert manager.retire_expired_roots(force=True) == 0  # its leaf is still valid
    old.refresh_from_db()
    time.sleep(max(0.0, (old.retire_after - dt.datetime.now(dt.UTC)).total_seconds()) + 0.1)
    index = TopicIndex.objects.get(topic="ca-roots").index
    assert manager.retire_expired_roots(force=True) == 1
    assert list(CARoot.objects.values_list("id", flat=True)) == [new.id]
    new.refresh_from_db()
    assert new.intermediate_certs == []  # the link to the retired root went with it
    assert manager.state() is CAState.READY
    assert TopicIndex.objects.get(topic="ca-roots").index > index
    assert IssuedCert.objects.filter(root__isnull=True).count() == 1  # the record stays


def test_a_root_is_kept_while_a_leaf_signed_during_the_rotation_is_valid(ca, settings):
    settings.MESH_CA_LEAF_TTL = "1s"
    old = CARoot.objects.get()
    ca.rotate()
    late = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    IssuedCert.objects.create(serial="01:02", spiffe_id="x", name="web", root=old, not_after=late)
    CARoot.objects.filter(id=old.id).update(retire_after=dt.datetime.now(dt.UTC))
    assert manager.retire_expired_roots(force=True) == 0
    old.refresh_from_db()
    assert old.retire_after == late


def test_the_background_tick_retires_roots(ca, settings):
    settings.MESH_CA_LEAF_TTL = "1s"
    catalog.local_node()
    old = CARoot.objects.get()
    ca.rotate()
    CARoot.objects.filter(id=old.id).update(retire_after=dt.datetime.now(dt.UTC))
    manager._next_retire_check = 0.0
    health.tick()
    assert not CARoot.objects.filter(id=old.id).exists()


def test_a_configuration_update_is_stored_with_consuls_defaults(ca):
    rotated = ca.set_configuration(
        {"provider": "consul", "config": {"leaf_cert_ttl": "24h", "CSRMaxPerSecond": 10.5}}
    )
    assert rotated is False
    index, data = ca.configuration_json()
    assert data["Provider"] == "consul" and data["ModifyIndex"] == index
    assert data["Config"]["LeafCertTTL"] == "24h"
    assert data["Config"]["CSRMaxPerSecond"] == 10.5
    assert data["Config"]["PrivateKeyType"] == "ec" and data["Config"]["RootCertTTL"] == "87600h"
    assert CARoot.objects.count() == 1


def test_a_new_key_type_in_the_configuration_rotates_to_a_root_of_that_type(ca):
    old = CARoot.objects.get()
    assert ca.set_configuration({"Config": {"PrivateKeyType": "rsa", "PrivateKeyBits": 2048}})
    new = CARoot.objects.get(active=True)
    assert new.id != old.id and (new.private_key_type, new.private_key_bits) == ("rsa", 2048)
    assert isinstance(pki.load_cert(new.root_cert).public_key(), rsa.RSAPublicKey)
    leaf = ca.sign_csr(MANAGEMENT, csr_for(service_uri("web")))
    assert leaf.root_id == new.id


def test_p384_roots_are_selectable(ca):
    ca.set_configuration({"Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}})
    root = CARoot.objects.get(active=True)
    assert pki.load_cert(root.root_cert).public_key().curve.name == "secp384r1"


@pytest.mark.parametrize(
    "body,message",
    [
        ({"Config": {"LeafCertTTL": "10m"}}, "LeafCertTTL: must be between"),
        ({"Config": {"LeafCertTTL": "soon"}}, "LeafCertTTL: invalid duration"),
        ({"Config": {"LeafCertTTL": 72}}, "LeafCertTTL: expected a duration string"),
        ({"Config": {"PrivateKeyType": "dsa"}}, "PrivateKeyType"),
        ({"Config": {"PrivateKeyType": "rsa", "PrivateKeyBits": 1024}}, "2048 or 4096"),
        ({"Config": {"PrivateKeyBits": 192}}, "256 or 384"),
        ({"Config": {"Colour": "blue"}}, "unknown field 'Colour'"),
        ({"Config": {"RootCertTTL": "1h"}}, "RootCertTTL"),
        ({"Config": {"CSRMaxPerSecond": -1}}, "CSRMaxPerSecond"),
        ({"Config": {"CSRMaxConcurrent": 1.5}}, "CSRMaxConcurrent"),
        ({"Config": {"PrivateKey": "-----BEGIN..."}}, "not supported"),
        ({"Provider": "vault"}, "unknown CA provider"),
        ({"Config": []}, "Config: expected an object"),
        ({"ForceWithoutCrossSigning": "yes"}, "ForceWithoutCrossSigning"),
    ],
)
def test_a_bad_configuration_is_refused_and_nothing_changes(ca, body, message):
    before = CAConfig.objects.get()
    roots = list(CARoot.objects.values_list("id", flat=True))
    with pytest.raises(BadRequest, match=message):
        ca.set_configuration(body)
    after = CAConfig.objects.get()
    assert (after.config, after.modify_index) == (before.config, before.modify_index)
    assert list(CARoot.objects.values_list("id", flat=True)) == roots


@pytest.mark.parametrize(
    "body,message",
    [
        ({"Name": "b"}, "Name: unknown field"),
        ({"Provider": "b"}, "unknown CA provider 'b'"),
        ({"Provider": ""}, "unknown CA provider ''"),
        ({"Provider": 7}, "Provider: expected a string"),
        ({"State": {"x": "y"}}, "State"),
    ],
)
def test_an_unknown_field_or_provider_is_refused_and_never_resets_the_configuration(
    ca, body, message
):
    ca.set_configuration({"Config": {"LeafCertTTL": "24h"}})
    before = CAConfig.objects.get()
    with pytest.raises(BadRequest, match=message):
        ca.set_configuration(body)
    after = CAConfig.objects.get()
    assert after.config["LeafCertTTL"] == "24h"
    assert (after.config, after.modify_index) == (before.config, before.modify_index)


def test_a_partial_update_keeps_what_it_does_not_give(ca):
    ca.set_configuration({"Config": {"LeafCertTTL": "24h", "CSRMaxPerSecond": 7}})
    ca.set_configuration({"Config": {"CSRMaxConcurrent": 3}})
    ca.set_configuration({"Provider": "consul"})
    ca.set_configuration({"ForceWithoutCrossSigning": False})
    _index, data = ca.configuration_json()
    assert data["Provider"] == "consul"
    assert data["Config"]["LeafCertTTL"] == "24h"
    assert (data["Config"]["CSRMaxPerSecond"], data["Config"]["CSRMaxConcurrent"]) == (7, 3)


def test_a_read_modify_write_of_the_whole_configuration_is_accepted(ca):
    _index, data = ca.configuration_json()
    data["Config"]["LeafCertTTL"] = "48h"
    ca.set_configuration(data)
    assert ca.configuration_json()[1]["Config"]["LeafCertTTL"] == "48h"


def test_an_update_that_changes_nothing_writes_nothing(ca):
    before = CAConfig.objects.get().modify_index
    assert ca.set_configuration({}) is False
    assert ca.set_configuration({"Provider": "consul", "Config": {"LeafCertTTL": "72h"}}) is False
    assert CAConfig.objects.get().modify_index == before


def test_a_new_key_type_alone_takes_that_types_default_size(ca):
    ca.set_configuration({"Config": {"PrivateKeyType": "rsa", "PrivateKeyBits": 4096}})
    assert ca.set_configuration({"Config": {"PrivateKeyType": "ec"}})
    root = CARoot.objects.get(active=True)
    assert (root.private_key_type, root.private_key_bits) == ("ec", 256)


def test_validate_config_fills_in_defaults():
    assert validate_config({})["LeafCertTTL"] == "72h"


# --- signing CSRs -------------------------------------------------------------------------


def test_a_signed_leaf_is_recorded_with_a_unique_serial(ca):
    key = pki.generate_key()
    uri = service_uri("web")
    leaves = [ca.sign_csr(MANAGEMENT, csr_for(uri, key=key)) for _ in range(20)]
    assert len({leaf.serial for leaf in leaves}) == 20
    recorded = IssuedCert.objects.get(serial=leaves[0].serial)
    assert (recorded.spiffe_id, recorded.kind, recorded.name) == (uri, "service", "web")
    assert recorded.root_id == CARoot.objects.get().id
    assert recorded.not_after == leaves[0].not_after
    cert = pki.load_cert(leaves[0].cert_pem)
    assert pki.spiffe_id_of(cert) == uri and pki.info(cert).serial == leaves[0].serial


def test_a_leaf_lives_for_the_configured_ttl_from_a_minute_ago(ca, settings):
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    leaf = ca.sign_csr(MANAGEMENT, csr_for(service_uri("web")))
    assert start - dt.timedelta(seconds=61) <= leaf.not_before <= start - dt.timedelta(seconds=59)
    assert leaf.not_after - leaf.not_before == dt.timedelta(hours=72, minutes=1)
    settings.MESH_CA_LEAF_TTL = "5s"
    short = ca.sign_csr(MANAGEMENT, csr_for(service_uri("web")))
    assert short.not_after - short.not_before == dt.timedelta(seconds=65)


def test_the_leaf_chain_verifies_against_the_root(ca):
    leaf = ca.sign_csr(MANAGEMENT, csr_for(service_uri("web")))
    root = pki.load_cert(CARoot.objects.get().root_cert)
    pki.load_cert(leaf.cert_pem).verify_directly_issued_by(root)


def test_a_node_identity_needs_the_join_flow_or_acl_write_besides_node_write(ca):
    uri = spiffe.agent_id(ca.trust_domain(), "host-7", "dc1").uri
    token = token_for('node "host-7" { policy = "write" }')
    with pytest.raises(PermissionDenied, match="issued by the join flow"):
        ca.sign_csr(token, csr_for(uri, ("host-7.node.consul",)))
    leaf = ca.sign_csr(token, csr_for(uri, ("host-7.node.consul",)), agent=True)
    assert leaf.kind == "agent" and leaf.name == "host-7" and leaf.spiffe_id == uri
    operator = token_for('node "host-7" { policy = "write" } acl = "write"')
    assert ca.sign_csr(operator, csr_for(uri)).name == "host-7"
    with pytest.raises(PermissionDenied, match="lacks permission 'node:write' on \"host-8\""):
        ca.sign_csr(token, csr_for(spiffe.agent_id(ca.trust_domain(), "host-8", "dc1").uri))


def test_a_token_with_service_write_on_web_gets_webs_leaf_and_nothing_else(ca):
    token = token_for('service "web" { policy = "write" }')
    assert ca.sign_csr(token, csr_for(service_uri("web"))).name == "web"
    with pytest.raises(PermissionDenied) as err:
        ca.sign_csr(token, csr_for(service_uri("api")))
    assert err.value.status == 403
    assert err.value.message == (
        "Permission denied: token with AccessorID '9a0b7c1d-0000-4000-8000-00000000beef' "
        "lacks permission 'service:write' on \"api\""
    )
    with pytest.raises(PermissionDenied):
        ca.sign_csr(token, csr_for(spiffe.agent_id(ca.trust_domain(), "web", "dc1").uri))
    with pytest.raises(PermissionDenied):
        ca.agent_leaf(token, "api")
    assert ca.agent_leaf(token, "web").leaf.name == "web"
    reader = token_for('service "web" { policy = "read" }')
    with pytest.raises(PermissionDenied):
        ca.sign_csr(reader, csr_for(service_uri("web")))


def _tampered(pem: str) -> str:
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature value
    b64 = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{b64}-----END CERTIFICATE REQUEST-----\n"


def _bad_key_csr(kind: str, uri: str) -> str:
    if kind == "dsa":
        key = dsa.generate_private_key(2048)
    elif kind == "rsa1024":
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    else:
        key = ec.generate_private_key(ec.SECP192R1())
    return raw_csr(key, [x509.UniformResourceIdentifier(uri)])


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda uri: "hello", "expected a PEM-encoded PKCS#10"),
        (lambda uri: "", "Invalid CSR: empty"),
        (lambda uri: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "Invalid CSR"),
        (lambda uri: _tampered(csr_for(uri)), "signature does not verify"),
        (lambda uri: _bad_key_csr("dsa", uri), "keys are not supported"),
        (lambda uri: _bad_key_csr("rsa1024", uri), "RSA keys must be 2048"),
        (lambda uri: _bad_key_csr("p192", uri), "curve secp192r1 is not supported"),
        (
            lambda uri: raw_csr(
                pki.generate_key(),
                [x509.UniformResourceIdentifier(uri)],
                extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)],
            ),
            "CA:true",
        ),
        (
            lambda uri: raw_csr(
                pki.generate_key(),
                [x509.UniformResourceIdentifier(uri)],
                extensions=[(x509.BasicConstraints(ca=False, path_length=None), True)],
            ),
            "extension basicConstraints is not accepted",
        ),
        (
            lambda uri: raw_csr(
                pki.generate_key(),
                [x509.UniformResourceIdentifier(uri)],
                extensions=[(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False)],
            ),
            "extension extendedKeyUsage is not accepted",
        ),
        (
            lambda uri: raw_csr(
                pki.generate_key(),
                [x509.UniformResourceIdentifier(uri), x509.IPAddress(ipaddress.ip_address("10.0.0.1"))],
            ),
            "SAN of type IP address",
        ),
        (
            lambda uri: raw_csr(
                pki.generate_key(), [x509.UniformResourceIdentifier(uri), x509.RFC822Name("a@b.c")]
            ),
            "SAN of type email",
        ),
    ],
    ids=[
        "garbage", "empty", "bad-base64", "bad-signature", "dsa-key", "rsa-1024", "p-192",
        "ca-true", "basic-constraints", "extra-extension", "ip-san", "email-san",
    ],
)  # fmt: skip
def test_a_csr_that_is_not_a_good_leaf_request_is_a_400_and_nothing_is_recorded(ca, make, message):
    csr = make(service_uri("web"))
    with pytest.raises(BadRequest, match=message) as err:
        ca.sign_csr(MANAGEMENT, csr)
    assert err.value.status == 400
    assert IssuedCert.objects.count() == 0


@pytest.mark.parametrize(
    "sans,message",
    [
        (lambda uri: [], "exactly one URI SAN"),
        (lambda uri: [x509.DNSName("web.service.consul")], "exactly one URI SAN"),
        (
            lambda uri: [x509.UniformResourceIdentifier(uri), x509.UniformResourceIdentifier(uri + "2")],
            "exactly one URI SAN",
        ),
        (
            lambda uri: [x509.UniformResourceIdentifier("spiffe://other.mesh/ns/default/dc/dc1/svc/web")],
            'trust domain "other.mesh"',
        ),
        (lambda uri: [x509.UniformResourceIdentifier("https://example.com/web")], "not a SPIFFE ID"),
        (
            lambda uri: [x509.UniformResourceIdentifier(uri.replace("/dc/dc1/", "/dc/mars/"))],
            'unknown datacenter "mars"',
        ),
        (
            lambda uri: [x509.UniformResourceIdentifier(uri.replace("/ns/default/", "/ns/team/"))],
            'namespace "team"',
        ),
        (
            lambda uri: [x509.UniformResourceIdentifier(uri), x509.DNSName("bank.example.com")],
            'DNS SAN "bank.example.com" is not a name of service "web"',
        ),
    ],
    ids=["no-san", "dns-only", "two-uris", "foreign-trust-domain", "not-spiffe", "unknown-dc", "other-namespace", "unexpected-dns"],
)  # fmt: skip
def test_a_csr_asking_for_an_identity_it_may_not_have_is_a_403(ca, sans, message):
    csr = raw_csr(pki.generate_key(), sans(service_uri("web")))
    with pytest.raises(PermissionDenied, match=message) as err:
        ca.sign_csr(MANAGEMENT, csr)
    assert err.value.status == 403
    assert IssuedCert.objects.count() == 0


def test_dns_names_of_the_service_and_host_names_the_catalog_lists_are_allowed(ca):
    catalog.catalog_register(
        decode.CATALOG_REGISTER(
            {
                "Node": "box-1",
                "Address": "10.0.0.5",
                "Service": {"Service": "web", "ID": "web-1", "Address": "web-1.internal.example"},
            }
        )
    )
    names = ("web.service.consul", "web.service.dc1.consul", "web", "web-1.internal.example")
    leaf = ca.sign_csr(MANAGEMENT, csr_for(service_uri("web"), names))
    assert pki.dns_sans(pki.load_cert(leaf.cert_pem)) == list(names)


def test_a_known_datacenter_other_than_the_servers_is_accepted(ca):
    catalog.catalog_register(
        decode.CATALOG_REGISTER({"Node": "far-1", "Address": "10.1.0.5", "Datacenter": "dc2"})
    )
    leaf = ca.sign_csr(MANAGEMENT, csr_for(service_uri("web", dc="dc2")))
    assert "/dc/dc2/" in leaf.spiffe_id


# --- the server agent's leaves -----------------------------------------------------------


def test_the_agent_leaf_is_cached_until_half_its_life(ca, settings):
    settings.MESH_CA_LEAF_TTL = "2s"
    first = ca.agent_leaf(MANAGEMENT, "web")
    assert ca.agent_leaf(MANAGEMENT, "web") is first
    body = first.json()
    assert body["Service"] == "web" and body["ServiceURI"] == service_uri("web")
    key = pki.load_key(body["PrivateKeyPEM"])
    cert = pki.load_cert(body["CertPEM"])
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert body["SerialNumber"] == pki.info(cert).serial
    assert body["CreateIndex"] == body["ModifyIndex"] > 0
    time.sleep(max(0.0, (first.renew_at - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
    renewed = ca.agent_leaf(MANAGEMENT, "web")
    assert renewed.leaf.serial != first.leaf.serial
    assert renewed.json()["ModifyIndex"] > body["ModifyIndex"]


def test_the_agent_leaf_is_renewed_when_the_root_rotates(ca):
    first = ca.agent_leaf(MANAGEMENT, "web")
    new = ca.rotate()
    renewed = ca.agent_leaf(MANAGEMENT, "web")
    assert renewed.leaf.root_id == new.id != first.leaf.root_id
    chain = pki.load_certs(renewed.json()["CertPEM"])
    assert len(chain) == 2 and chain[1].subject == pki.load_cert(new.root_cert).subject


def test_the_agent_leaf_key_follows_the_configured_key_type(ca):
    ca.set_configuration({"Config": {"PrivateKeyType": "rsa", "PrivateKeyBits": 2048}})
    leaf = ca.agent_leaf(MANAGEMENT, "web")
    assert isinstance(pki.load_key(leaf.key_pem), rsa.RSAPrivateKey)


def test_names_that_cannot_be_in_a_spiffe_id_are_refused(ca):
    with pytest.raises(BadRequest, match="Invalid service name"):
        ca.agent_leaf(MANAGEMENT, "web/../api")


def test_a_common_name_is_set_to_the_service(ca):
    leaf = ca.sign_csr(MANAGEMENT, csr_for(service_uri("web")))
    cn = pki.load_cert(leaf.cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn[0].value == "web"


# --- audit -------------------------------------------------------------------------------------


OPERATOR = audit.Actor("9d4a8c2e-0000-4000-8000-000000000001", "operator token", "api")


def test_rotation_configuration_and_signing_are_audited_with_before_and_after(ca):
    old_id = CARoot.objects.get().id
    with audit.scope(OPERATOR, "ca.rotate", "POST", "/api/ca/rotate"):
        new = ca.rotate()
    entry = AuditEntry.objects.get(action="ca.rotate")
    assert (entry.actor, entry.via, entry.resource_id) == (OPERATOR.id, "api", new.id)
    assert entry.before == {"ActiveRootID": old_id}
    assert entry.after["ActiveRootID"] == new.id and entry.after["Previous"]["ID"] == old_id
    assert "PRIVATE" not in str(entry.after)
    with audit.scope(OPERATOR, "connect_ca.configuration", "PUT", "/v1/connect/ca/configuration"):
        ca.set_configuration({"Config": {"LeafCertTTL": "24h"}})
    entry = AuditEntry.objects.get(action="ca.configure")
    assert entry.before["Config"]["LeafCertTTL"] == "72h"
    assert entry.after["Config"]["LeafCertTTL"] == "24h"
    with audit.scope(OPERATOR, "ca.sign", "POST", "/api/ca/sign"):
        leaf = ca.sign_csr(MANAGEMENT, csr_for(service_uri("web")))
    entry = AuditEntry.objects.get(action="ca.sign")
    assert entry.resource_id == leaf.serial and entry.after["SpiffeID"] == leaf.spiffe_id
