"""Leaves from the Connect CA in real TLS handshakes (Python's `ssl`, loopback sockets).

Certificates come from a real `mesh server` through `POST /api/ca/sign`; keys
are made here and never sent. Each handshake is mutual: both sides present a
leaf (plus the chain the CA returned) and verify the other's against their
own trust bundle.
"""

from __future__ import annotations

import collections
import datetime as dt
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from meshproto import pki, spiffe
from registry.ca.provider import BuiltinProvider
from tests.support.servers import MeshServer, make_server

pytestmark = pytest.mark.slow

OPENSSL = shutil.which("openssl")


# --- endpoints and handshakes --------------------------------------------------------------


@dataclass
class Leaf:
    """What a workload holds: its key (made here) and the CA's answer."""

    service: str
    key_pem: str
    cert_pem: str
    chain: list[str] = field(default_factory=list)

    @property
    def spiffe_id(self) -> str:
        return pki.spiffe_id_of(pki.load_cert(self.cert_pem)) or ""


def sign(srv: MeshServer, service: str) -> Leaf:
    with srv.client() as http:
        trust_domain = http.get("/v1/connect/ca/roots").json()["TrustDomain"]
        key = pki.generate_key()
        uri = spiffe.service_id(trust_domain, service, "dc1").uri
        r = http.post("/api/ca/sign", json={"csr": pki.make_csr(key, uri)})
    assert r.status_code == 200, r.text
    body = r.json()
    return Leaf(service, pki.key_pem(key), body["cert"], list(body["chain"]))


def roots(srv: MeshServer) -> dict:
    with srv.client() as http:
        return http.get("/v1/connect/ca/roots").json()


class Workload:
    """A leaf, the chain it presents after it, and the roots it trusts, as TLS contexts."""

    def __init__(self, tmp: Path, leaf: Leaf, trusted: list[str], chain: list[str] | None = None):
        self.leaf = leaf
        directory = tmp / f"{leaf.service}-{pki.info(pki.load_cert(leaf.cert_pem)).serial[:11]}"
        directory.mkdir(parents=True, exist_ok=True)
        presented = [leaf.cert_pem, *(leaf.chain if chain is None else chain)]
        self.cert_file = directory / f"chain-{len(presented)}.pem"
        self.cert_file.write_text("".join(p if p.endswith("\n") else p + "\n" for p in presented))
        self.key_file = directory / "key.pem"
        self.key_file.write_text(leaf.key_pem)
        self.trusted = "".join(trusted)

    def context(self, server_side: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not server_side:
            ctx.check_hostname = False  # identity is the SPIFFE ID, checked by the caller
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.load_verify_locations(cadata=self.trusted)
        return ctx


def peer_spiffe_id(tls: ssl.SSLSocket) -> str | None:
    sans = (tls.getpeercert() or {}).get("subjectAltName", ())
    uris = [v for k, v in sans if k == "URI" and v.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None


@dataclass
class Handshake:
    server_peer: str | None = None
    client_peer: str | None = None
    server_error: Exception | None = None
    client_error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, timeout: float = 5.0) -> Handshake:
    """One mutual-TLS connection on loopback; each side exchanges a message after it,
    so a refusal on either side surfaces (TLS 1.3 checks the client after its Finished)."""
    result = Handshake()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(timeout)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(timeout)
            with server.wrap_socket(conn, server_side=True) as tls:
                result.server_peer = peer_spiffe_id(tls)
                if tls.recv(4) != b"ping":
                    raise ConnectionError("no ping")
                tls.sendall(b"pong")
        except Exception as exc:
            result.server_error = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=timeout) as raw,
            client.wrap_socket(raw) as tls,
        ):
            result.client_peer = peer_spiffe_id(tls)
            tls.sendall(b"ping")
            if tls.recv(4) != b"pong":
                raise ConnectionError("no pong")
    except Exception as exc:
        result.client_error = exc
    finally:
        thread.join(timeout + 1)
        listener.close()
    return result


def self_signed(uri: str) -> Leaf:
    key = pki.generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
        .sign(key, hashes.SHA256())
    )
    return Leaf("web", pki.key_pem(key), pki.cert_pem(cert))


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca_server(tmp_path_factory):
    srv = make_server(tmp_path_factory.mktemp("mtls"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def short_ttl_server(tmp_path_factory):
    """Another cluster (a foreign CA to `ca_server`) whose leaves live 2 seconds."""
    srv = make_server(tmp_path_factory.mktemp("mtls-short"), extra_env={"MESH_CA_LEAF_TTL": "2s"})
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def bundle(ca_server) -> str:
    return "".join(r["RootCert"] for r in roots(ca_server)["Roots"])


# --- tests -----------------------------------------------------------------------------------


def test_two_endpoints_with_leaves_complete_mtls_and_see_each_others_spiffe_ids(
    ca_server, bundle, tmp_path
):
    web = Workload(tmp_path, sign(ca_server, "web"), [bundle])
    api = Workload(tmp_path, sign(ca_server, "api"), [bundle])
    result = handshake(web.context(server_side=True), api.context(server_side=False))
    assert result.ok, result
    assert result.server_peer == api.leaf.spiffe_id
    assert result.client_peer == web.leaf.spiffe_id
    assert result.server_peer.endswith("/ns/default/dc/dc1/svc/api")
    assert result.client_peer.endswith("/ns/default/dc/dc1/svc/web")


def test_the_leafs_only_uri_san_is_the_services_spiffe_id(ca_server):
    leaf = sign(ca_server, "billing")
    cert = pki.load_cert(leaf.cert_pem)
    trust_domain = roots(ca_server)["TrustDomain"]
    assert pki.uri_sans(cert) == [f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/billing"]
    assert trust_domain.endswith(".mesh")


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")
def test_openssl_verify_accepts_the_leaf_for_tls_clients_and_servers(ca_server, tmp_path):
    leaf = sign(ca_server, "web")
    (tmp_path / "leaf.pem").write_text(leaf.cert_pem)
    root = next(r for r in roots(ca_server)["Roots"] if r["Active"])
    (tmp_path / "root.pem").write_text(root["RootCert"])
    for purpose in ("sslserver", "sslclient"):
        out = subprocess.run(
            [
                OPENSSL,
                "verify",
                "-x509_strict",
                "-purpose",
                purpose,
                "-CAfile",
                "root.pem",
                "leaf.pem",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "leaf.pem: OK"


def test_a_peer_with_a_self_signed_certificate_is_refused(ca_server, bundle, tmp_path):
    uri = spiffe.service_id(roots(ca_server)["TrustDomain"], "web", "dc1").uri
    impostor = Workload(tmp_path, self_signed(uri), [bundle])
    api = Workload(tmp_path, sign(ca_server, "api"), [bundle])
    as_server = handshake(impostor.context(True), api.context(False))
    assert isinstance(as_server.client_error, ssl.SSLCertVerificationError)
    assert as_server.client_peer is None
    as_client = handshake(api.context(True), impostor.context(False))
    assert isinstance(as_client.server_error, ssl.SSLError)
    assert as_client.server_peer is None


def test_an_expired_leaf_is_refused(short_ttl_server, tmp_path):
    bundle = "".join(r["RootCert"] for r in roots(short_ttl_server)["Roots"])
    stale = sign(short_ttl_server, "web")
    not_after = pki.load_cert(stale.cert_pem).not_valid_after_utc
    assert not_after - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=3)
    time.sleep(max(0.0, (not_after - dt.datetime.now(dt.UTC)).total_seconds()) + 1.1)
    web = Workload(tmp_path, stale, [bundle])
    api = Workload(tmp_path, sign(short_ttl_server, "api"), [bundle])
    as_server = handshake(web.context(True), api.context(False))
    assert isinstance(as_server.client_error, ssl.SSLCertVerificationError)
    assert "expired" in str(as_server.client_error)
    api = Workload(tmp_path, sign(short_ttl_server, "api"), [bundle])
    as_client = handshake(api.context(True), web.context(False))
    assert isinstance(as_client.server_error, ssl.SSLError)


def test_a_leaf_from_a_foreign_ca_is_refused(ca_server, short_ttl_server, bundle, tmp_path):
    foreign = Workload(tmp_path, sign(short_ttl_server, "web"), [bundle])
    api = Workload(tmp_path, sign(ca_server, "api"), [bundle])
    result = handshake(foreign.context(True), api.context(False))
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    result = handshake(api.context(True), foreign.context(False))
    assert isinstance(result.server_error, ssl.SSLError)


def test_a_forged_ca_for_the_same_trust_domain_is_refused(ca_server, bundle, tmp_path):
    """An attacker's CA naming our trust domain and our service: its key is not ours."""
    trust_domain = roots(ca_server)["TrustDomain"]
    provider = BuiltinProvider()
    fake_root = provider.generate_root(
        trust_domain, key_type="ec", key_bits=256, ttl=dt.timedelta(days=1)
    )
    key = pki.generate_key()
    uri = spiffe.service_id(trust_domain, "web", "dc1").uri
    csr = x509.load_pem_x509_csr(pki.make_csr(key, uri).encode())
    cert = provider.sign_leaf(
        provider.load_signer(fake_root.cert_pem, fake_root.key_pem),
        csr,
        uri,
        [],
        dt.timedelta(hours=1),
        "web",
    )
    forged = Workload(tmp_path, Leaf("web", pki.key_pem(key), pki.cert_pem(cert)), [bundle])
    api = Workload(tmp_path, sign(ca_server, "api"), [bundle])
    result = handshake(forged.context(True), api.context(False))
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_rotation_keeps_every_mix_of_old_and_new_leaves_and_bundles_talking(tmp_path_factory):
    """Handshakes run in a loop across a rotation; after it, endpoints that
    refreshed and endpoints that did not talk to each other in every mix."""
    srv = make_server(tmp_path_factory.mktemp("mtls-rotation"))
    tmp = tmp_path_factory.mktemp("mtls-rotation-certs")
    try:
        before = roots(srv)
        (old_root,) = [r["RootCert"] for r in before["Roots"]]
        web_old, api_old = sign(srv, "web"), sign(srv, "api")
        # Endpoints that never hear of the rotation: old leaf alone, old root only.
        stale_web = Workload(tmp, web_old, [old_root])
        stale_api = Workload(tmp, api_old, [old_root])
        pairs = {"stale web <- stale api": (stale_web.context(True), stale_api.context(False))}
        counts: collections.Counter[str] = collections.Counter()
        failures: list[tuple[str, Handshake]] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                for label, (server_ctx, client_ctx) in list(pairs.items()):
                    result = handshake(server_ctx, client_ctx)
                    counts[label] += 1
                    if not result.ok:
                        failures.append((label, result))

        runner = threading.Thread(target=loop, daemon=True)
        runner.start()
        deadline = time.monotonic() + 30
        while counts["stale web <- stale api"] < 10 and time.monotonic() < deadline:
            time.sleep(0.05)

        with srv.client() as http:
            rotated = http.post("/api/ca/rotate")
        assert rotated.status_code == 200, rotated.text
        after = roots(srv)
        new_id = after["ActiveRootID"]
        old = next(r for r in after["Roots"] if not r["Active"])
        new = next(r for r in after["Roots"] if r["Active"])
        assert old["RootCert"] == old_root and new_id != before["ActiveRootID"]
        current_bundle = [r["RootCert"] for r in after["Roots"]]
        web_new, api_new = sign(srv, "web"), sign(srv, "api")
        assert web_new.chain == new["IntermediateCerts"]  # new leaves carry new <- old

        # Refreshed endpoints with old leaves present the old root's cross-signed link.
        web_old_refreshed = Workload(tmp, web_old, current_bundle, chain=old["IntermediateCerts"])
        api_old_refreshed = Workload(tmp, api_old, current_bundle, chain=old["IntermediateCerts"])
        web_old_new_root_only = Workload(
            tmp, web_old, [new["RootCert"]], chain=old["IntermediateCerts"]
        )
        api_old_old_root_only = Workload(tmp, api_old, [old_root], chain=old["IntermediateCerts"])
        web_new_new_root_only = Workload(tmp, web_new, [new["RootCert"]])
        api_new_new_root_only = Workload(tmp, api_new, [new["RootCert"]])
        web_new_old_root_only = Workload(tmp, web_new, [old_root])
        api_new_bundle = Workload(tmp, api_new, current_bundle)
        pairs.update(
            {
                "old-leaf web <- client trusting only the new root": (
                    web_old_refreshed.context(True),
                    api_new_new_root_only.context(False),
                ),
                "new-leaf web <- old-leaf client trusting only the old root": (
                    web_new_new_root_only.context(True),
                    api_old_old_root_only.context(False),
                ),
                "stale web <- new-leaf client with the current bundle": (
                    stale_web.context(True),
                    api_new_bundle.context(False),
                ),
                "new-leaf web trusting the old root <- stale api": (
                    web_new_old_root_only.context(True),
                    stale_api.context(False),
                ),
                "old-leaf web trusting only the new root <- new-leaf api": (
                    web_old_new_root_only.context(True),
                    api_new_new_root_only.context(False),
                ),
                "old leaves both sides, current bundle": (
                    web_old_refreshed.context(True),
                    api_old_refreshed.context(False),
                ),
                "new leaves both sides, new root only": (
                    web_new_new_root_only.context(True),
                    api_new_new_root_only.context(False),
                ),
            }
        )
        deadline = time.monotonic() + 60
        while min(counts[label] for label in pairs) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        runner.join(30)
        assert failures == []
        assert all(counts[label] >= 10 for label in pairs), counts
        # The control: without its cross-signed link, a new leaf means nothing to an old root.
        unlinked = Workload(tmp, web_new, [new["RootCert"]], chain=[])
        refused = handshake(unlinked.context(True), api_old_old_root_only.context(False))
        assert isinstance(refused.client_error, ssl.SSLCertVerificationError)
    finally:
        srv.close()


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")
def test_openssl_verifies_leaves_across_a_rotation_with_the_cross_signed_intermediates(
    tmp_path_factory,
):
    srv = make_server(tmp_path_factory.mktemp("openssl-rotation"))
    tmp = tmp_path_factory.mktemp("openssl-rotation-files")
    try:
        old_leaf = sign(srv, "web")
        with srv.client() as http:
            assert http.post("/api/ca/rotate").status_code == 200
        new_leaf = sign(srv, "web")
        after = roots(srv)
        old = next(r for r in after["Roots"] if not r["Active"])
        new = next(r for r in after["Roots"] if r["Active"])
        files = {
            "old-root.pem": old["RootCert"],
            "new-root.pem": new["RootCert"],
            "old-leaf.pem": old_leaf.cert_pem,
            "new-leaf.pem": new_leaf.cert_pem,
            "new-by-old.pem": "".join(new["IntermediateCerts"]),
            "old-by-new.pem": "".join(old["IntermediateCerts"]),
        }
        for name, text in files.items():
            (tmp / name).write_text(text)

        def verify(ca: str, leaf: str, untrusted: str | None = None) -> subprocess.CompletedProcess:
            cmd = [OPENSSL, "verify", "-x509_strict", "-CAfile", ca]
            if untrusted:
                cmd += ["-untrusted", untrusted]
            return subprocess.run(cmd + [leaf], cwd=tmp, capture_output=True, text=True, timeout=30)

        assert verify("new-root.pem", "new-leaf.pem").returncode == 0
        assert verify("old-root.pem", "old-leaf.pem").returncode == 0
        assert verify("old-root.pem", "new-leaf.pem", "new-by-old.pem").returncode == 0
        assert verify("new-root.pem", "old-leaf.pem", "old-by-new.pem").returncode == 0
        # Without the cross-signed link, one root does not vouch for the other's leaves.
        assert verify("old-root.pem", "new-leaf.pem").returncode != 0
        assert verify("new-root.pem", "old-leaf.pem").returncode != 0
    finally:
        srv.close()
