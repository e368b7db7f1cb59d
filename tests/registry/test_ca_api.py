"""The Connect CA over HTTP against real `mesh server` processes: Consul's
`/v1/connect/ca/...` and `/v1/agent/connect/ca/...` read by the unmodified
py-consul client, `/api/ca/...`, ACLs, blocking queries, the rate limit,
rotation and retirement, start-up races, and the `mesh ca` commands."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import consul
import httpx
import pytest
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization

from meshproto import pki, spiffe
from tests.support.servers import ROOT, create_database, make_server, postgres_url

pytestmark = pytest.mark.slow


def _policy_token(server, unique, rules: str) -> str:
    name = unique("policy")
    with server.client() as c:
        r = c.put("/v1/acl/policy", json={"Name": name, "Rules": rules})
        assert r.status_code == 200, r.text
        r = c.put("/v1/acl/token", json={"Policies": [{"Name": name}]})
        assert r.status_code == 200, r.text
    return r.json()["SecretID"]


def _csr(trust_domain: str, service: str, **kw) -> str:
    return pki.make_csr(
        pki.generate_key(), spiffe.service_id(trust_domain, service, "dc1").uri, **kw
    )


def _trust_domain(server) -> str:
    with server.client() as c:
        return c.get("/v1/connect/ca/roots").json()["TrustDomain"]


@pytest.fixture(scope="module")
def ca_server(tmp_path_factory):
    """A server of this module's own: these tests rotate and reconfigure its CA."""
    srv = make_server(tmp_path_factory.mktemp("ca-api"), acl=True)
    yield srv
    srv.close()


def run_mesh(server, *args: str, token: str | None = None, stdin: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))}
    env["MESH_HTTP_ADDR"] = server.addr
    if token:
        env["MESH_HTTP_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, "-m", "meshweb.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# --- py-consul reads ----------------------------------------------------------------------------


def test_py_consul_reads_the_roots_from_both_endpoints(server):
    c = server.consul()
    agent_roots = c.agent.connect.ca.roots()
    roots = c.connect.ca.roots()  # sends ?pem=0
    assert agent_roots == roots
    assert roots["TrustDomain"].endswith(".mesh")
    root = next(r for r in roots["Roots"] if r["Active"])
    assert root["ID"] == roots["ActiveRootID"]
    assert root["Name"] and root["SigningKeyID"] and isinstance(root["SerialNumber"], int)
    assert root["ExternalTrustDomain"] == roots["TrustDomain"].removesuffix(".mesh")
    assert root["PrivateKeyType"] == "ec" and root["PrivateKeyBits"] == 256
    cert = pki.load_cert(root["RootCert"])
    assert pki.uri_sans(cert) == [f"spiffe://{roots['TrustDomain']}"]
    assert "PRIVATE" not in json.dumps(roots)


def test_roots_answer_a_pem_bundle_and_an_index(server):
    with server.client() as c:
        r = c.get("/v1/connect/ca/roots", params={"pem": "true"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/pem-certificate-chain"
        certs = pki.load_certs(r.text)
        data = c.get("/v1/agent/connect/ca/roots").json()
        assert [pki.cert_pem(x) for x in certs][0] == data["Roots"][0]["RootCert"]
        assert int(c.get("/v1/connect/ca/roots").headers["X-Consul-Index"]) >= 1
        assert c.get("/v1/connect/ca/roots", params={"pem": "maybe"}).status_code == 400


def test_py_consul_reads_a_leaf_for_a_service(server, unique):
    name = unique("web")
    c = server.consul()
    leaf = c.agent.connect.ca.leaf(name)
    assert set(leaf) == {
        "SerialNumber", "CertPEM", "PrivateKeyPEM", "Service", "ServiceURI",
        "ValidAfter", "ValidBefore", "CreateIndex", "ModifyIndex",
    }  # fmt: skip
    roots = c.agent.connect.ca.roots()
    assert leaf["Service"] == name
    assert leaf["ServiceURI"] == f"spiffe://{roots['TrustDomain']}/ns/default/dc/dc1/svc/{name}"
    cert = pki.load_cert(leaf["CertPEM"])
    key = pki.load_key(leaf["PrivateKeyPEM"])
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert pki.info(cert).serial == leaf["SerialNumber"]
    assert leaf["ValidBefore"].endswith("Z") and leaf["ValidAfter"] < leaf["ValidBefore"]
    active = next(r for r in roots["Roots"] if r["Active"])
    cert.verify_directly_issued_by(pki.load_cert(active["RootCert"]))
    assert c.agent.connect.ca.leaf(name)["SerialNumber"] == leaf["SerialNumber"]  # cached


def test_py_consul_reads_the_ca_configuration(server):
    config = server.consul().connect.ca.configuration()
    assert config["Provider"] == "consul"
    assert config["Config"]["LeafCertTTL"] == "72h"
    assert config["Config"]["PrivateKeyType"] == "ec" and config["Config"]["PrivateKeyBits"] == 256
    assert config["Config"]["CSRMaxPerSecond"] == 50
    assert config["ForceWithoutCrossSigning"] is False
    assert config["CreateIndex"] <= config["ModifyIndex"]


# --- ACLs ---------------------------------------------------------------------------------------


def test_a_token_with_service_write_on_web_gets_webs_leaf_and_nothing_else(acl_server, unique):
    web, api = unique("web"), unique("api")
    secret = _policy_token(acl_server, unique, f'service "{web}" {{ policy = "write" }}')
    c = acl_server.consul(token=secret)
    assert c.agent.connect.ca.leaf(web)["Service"] == web
    with pytest.raises(
        consul.ACLPermissionDenied, match=f"lacks permission 'service:write' on \\\\?\"{api}"
    ):
        c.agent.connect.ca.leaf(api)
    trust_domain = _trust_domain(acl_server)
    with acl_server.client(token=secret) as h:
        ok = h.post("/api/ca/sign", json={"csr": _csr(trust_domain, web)})
        assert ok.status_code == 200, ok.text
        assert ok.json()["spiffe_id"].endswith(f"/svc/{web}")
        refused = h.post("/api/ca/sign", json={"csr": _csr(trust_domain, api)})
        assert refused.status_code == 403
        assert refused.json()["error"].endswith(f"lacks permission 'service:write' on \"{api}\"")
        assert h.post("/api/ca/rotate").status_code == 403
        assert h.get("/v1/connect/ca/configuration").status_code == 403
    # The roots need no token at all (as Consul's).
    assert acl_server.consul(token="").agent.connect.ca.roots()["Roots"]


def test_the_configuration_needs_operator_read_and_write(ca_server, unique):
    reader = _policy_token(ca_server, unique, 'operator = "read"')
    assert ca_server.consul(token=reader).connect.ca.configuration()["Provider"] == "consul"
    with pytest.raises(consul.ACLPermissionDenied, match="operator:write"):
        ca_server.consul(token=reader).connect.ca.update_configuration("consul", {})
    with pytest.raises(consul.ACLPermissionDenied, match="operator:read"):
        ca_server.consul(token="").connect.ca.configuration()


def test_node_write_alone_gets_no_node_identity_here_acl_write_does(acl_server, unique):
    node = unique("host")
    secret = _policy_token(acl_server, unique, f'node "{node}" {{ policy = "write" }}')
    uri = spiffe.agent_id(_trust_domain(acl_server), node, "dc1").uri
    with acl_server.client(token=secret) as h:
        r = h.post("/api/ca/sign", json={"csr": pki.make_csr(pki.generate_key(), uri)})
    assert r.status_code == 403, r.text
    assert "issued by the join flow" in r.json()["error"]
    with acl_server.client() as h:  # the management token
        r = h.post("/api/ca/sign", json={"csr": pki.make_csr(pki.generate_key(), uri)})
    assert r.status_code == 200, r.text
    assert r.json()["spiffe_id"] == uri


# --- bad CSRs over HTTP -------------------------------------------------------------------


def _tampered(td: str) -> dict:
    der = bytearray(
        x509.load_pem_x509_csr(_csr(td, "web").encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-3] ^= 1  # inside the signature
    b64 = base64.encodebytes(bytes(der)).decode()
    return {"csr": f"-----BEGIN CERTIFICATE REQUEST-----\n{b64}-----END CERTIFICATE REQUEST-----\n"}


def _two_uris(td: str) -> dict:
    uri = spiffe.service_id(td, "web", "dc1").uri
    sans = [x509.UniformResourceIdentifier(uri), x509.UniformResourceIdentifier(uri + "x")]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(pki.generate_key(), hashes.SHA256())
    )
    return {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}


@pytest.mark.parametrize(
    "body,status,message",
    [
        (lambda td: {"csr": "garbage"}, 400, "Invalid CSR: expected a PEM-encoded PKCS#10"),
        (lambda td: {}, 400, "csr"),
        (lambda td: {"csr": ""}, 400, "csr"),
        (_tampered, 400, "signature does not verify"),
        (_two_uris, 403, "exactly one URI SAN"),
        (lambda td: {"csr": _csr("elsewhere.mesh", "web")}, 403, 'trust domain "elsewhere.mesh"'),
        (
            lambda td: {"csr": _csr(td, "web", dns_names=["www.bank.example"])},
            403,
            'DNS SAN "www.bank.example"',
        ),
    ],
    ids=["garbage", "missing", "empty", "tampered", "two-uris", "foreign", "unexpected-dns"],
)
def test_a_bad_csr_is_a_clear_json_error(server, body, status, message):
    with server.client() as c:
        r = c.post("/api/ca/sign", json=body(_trust_domain(server)))
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_a_bad_configuration_is_a_plain_text_400_and_changes_nothing(server):
    with server.client() as c:
        before = c.get("/v1/connect/ca/configuration").json()
        r = c.put(
            "/v1/connect/ca/configuration",
            json={"Provider": "consul", "Config": {"LeafCertTTL": "1m"}},
        )
        assert r.status_code == 400
        assert r.text == "Config.LeafCertTTL: must be between 1h0m0s and 8760h0m0s"
        r = c.put("/v1/connect/ca/configuration", content=b"{nope")
        assert r.status_code == 400 and "invalid JSON" in r.text
        assert c.get("/v1/connect/ca/configuration").json() == before


def test_an_unknown_field_is_a_400_naming_it_and_never_resets_the_configuration(server):
    with server.client() as c:
        r = c.put("/v1/connect/ca/configuration", json={"Config": {"LeafCertTTL": "30h"}})
        assert r.status_code == 200, r.text
        before = c.get("/v1/connect/ca/configuration").json()
        r = c.put("/v1/connect/ca/configuration", json={"Name": "b"})
        assert r.status_code == 400 and r.text.startswith("Name: unknown field"), r.text
        r = c.put("/v1/connect/ca/configuration", json={"Provider": "b"})
        assert r.status_code == 400 and "unknown CA provider 'b'" in r.text, r.text
        after = c.get("/v1/connect/ca/configuration").json()
    assert after == before
    assert after["Config"]["LeafCertTTL"] == "30h"


# --- configuration writes, rotation, blocking queries -----------------------------------------


def test_py_consul_updates_the_configuration_and_a_new_key_type_rotates(ca_server):
    c = ca_server.consul()
    before = c.connect.ca.roots()
    index, _ = c.http.get(
        consul.callback.CB.json(index=True),
        "/v1/connect/ca/configuration",
        headers=c.prepare_headers(None),
    )
    assert c.connect.ca.update_configuration(
        "consul", {"LeafCertTTL": "24h", "PrivateKeyType": "rsa", "PrivateKeyBits": 2048}
    )
    config = c.connect.ca.configuration()
    assert config["Config"]["LeafCertTTL"] == "24h" and config["ModifyIndex"] > int(index)
    after = c.connect.ca.roots()
    assert after["ActiveRootID"] != before["ActiveRootID"]
    active = next(r for r in after["Roots"] if r["Active"])
    assert (active["PrivateKeyType"], active["PrivateKeyBits"]) == ("rsa", 2048)
    assert len(after["Roots"]) == len(before["Roots"]) + 1
    leaf = c.agent.connect.ca.leaf("web")
    assert pki.load_cert(leaf["CertPEM"]).public_key().key_size == 2048


def test_a_blocking_roots_query_wakes_on_rotation(ca_server):
    with ca_server.client() as c:
        first = c.get("/v1/connect/ca/roots")
        index = int(first.headers["X-Consul-Index"])
        result: dict = {}

        def wait() -> None:
            with ca_server.client() as w:
                result["r"] = w.get("/v1/connect/ca/roots", params={"index": index, "wait": "20s"})

        waiter = threading.Thread(target=wait)
        started = time.monotonic()
        waiter.start()
        time.sleep(0.5)
        assert "r" not in result
        rotated = c.post("/api/ca/rotate")
        assert rotated.status_code == 200, rotated.text
        waiter.join(20)
    answer = result["r"]
    assert time.monotonic() - started < 10
    assert int(answer.headers["X-Consul-Index"]) > index
    assert answer.json()["ActiveRootID"] == rotated.json()["active_root_id"]
    assert answer.json()["ActiveRootID"] != first.json()["ActiveRootID"]


def test_a_blocking_leaf_query_answers_a_leaf_from_the_new_root_after_rotation(ca_server):
    with ca_server.client() as c:
        leaf = c.get("/v1/agent/connect/ca/leaf/billing")
        index = int(leaf.headers["X-Consul-Index"])
        assert index == leaf.json()["ModifyIndex"]
        result: dict = {}

        def wait() -> None:
            with ca_server.client() as w:
                result["r"] = w.get(
                    "/v1/agent/connect/ca/leaf/billing", params={"index": index, "wait": "20s"}
                )

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.5)
        assert "r" not in result
        new_root = c.post("/api/ca/rotate").json()
        waiter.join(20)
    renewed = result["r"].json()
    assert renewed["SerialNumber"] != leaf.json()["SerialNumber"]
    assert renewed["ModifyIndex"] > index
    active = next(r for r in new_root["roots"] if r["active"])
    chain = pki.load_certs(renewed["CertPEM"])
    chain[0].verify_directly_issued_by(pki.load_cert(active["root_cert"]))


def test_the_cli_lists_rotates_and_configures_the_ca(ca_server):
    token = ca_server.token
    roots = run_mesh(ca_server, "ca", "roots", token=token)
    assert roots.returncode == 0, roots.stderr
    active_before = ca_server.consul().connect.ca.roots()["ActiveRootID"]
    assert active_before in roots.stdout and "Trust domain:" in roots.stdout
    pem = run_mesh(ca_server, "ca", "roots", "-pem", token=token)
    assert pem.returncode == 0 and pki.load_certs(pem.stdout)
    rotated = run_mesh(ca_server, "ca", "rotate", token=token)
    assert rotated.returncode == 0, rotated.stderr
    active_after = ca_server.consul().connect.ca.roots()["ActiveRootID"]
    assert active_after != active_before and active_after in rotated.stdout
    assert active_before in rotated.stdout  # still trusted
    config = run_mesh(ca_server, "ca", "get-config", token=token)
    assert json.loads(config.stdout)["Provider"] == "consul"
    update = json.dumps(
        {
            "Provider": "consul",
            "Config": {"LeafCertTTL": "48h", "PrivateKeyType": "rsa", "PrivateKeyBits": 2048},
        }
    )
    result = run_mesh(ca_server, "ca", "set-config", "-config-file", "-", token=token, stdin=update)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Configuration updated!"
    assert ca_server.consul().connect.ca.configuration()["Config"]["LeafCertTTL"] == "48h"
    denied = run_mesh(ca_server, "ca", "rotate")
    assert denied.returncode == 1 and "403" in denied.stderr
    assert "lacks permission 'operator:write'" in denied.stderr
    bad = run_mesh(
        ca_server,
        "ca",
        "set-config",
        "-config-file",
        "-",
        token=token,
        stdin='{"Config": {"Colour": 1}}',
    )
    assert bad.returncode == 1 and "unknown field" in bad.stderr


# --- rate limit, retirement, start-up ------------------------------------------------------------


def test_a_burst_of_csrs_beyond_the_rate_limit_gets_429(tmp_path):
    srv = make_server(
        tmp_path / "limited", extra_env={"MESH_CA_CSR_RATE": "2", "MESH_CA_CSR_MAX_CONCURRENT": "1"}
    )
    try:
        td = _trust_domain(srv)
        csrs = [_csr(td, f"svc-{i}") for i in range(24)]

        def post(csr: str) -> httpx.Response:
            with srv.client() as c:
                return c.post("/api/ca/sign", json={"csr": csr})

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(post, csrs))
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 2 and statuses.count(429) >= 10, statuses
        limited = next(r for r in answers if r.status_code == 429)
        assert limited.json() == {"error": "rate limit reached, try again later"}
        time.sleep(1.1)
        assert post(csrs[0]).status_code == 200  # the bucket refills
    finally:
        srv.close()


def test_an_old_root_is_retired_in_the_background_once_its_leaves_expired(tmp_path):
    srv = make_server(tmp_path / "retire", extra_env={"MESH_CA_LEAF_TTL": "1s"})
    try:
        with srv.client() as c:
            c.get("/v1/agent/connect/ca/leaf/web")
            rotated = c.post("/api/ca/rotate").json()
            assert len(rotated["roots"]) == 2
            index = int(c.get("/v1/connect/ca/roots").headers["X-Consul-Index"])
            deadline = time.monotonic() + 30
            roots = None
            while time.monotonic() < deadline:
                r = c.get("/v1/connect/ca/roots", params={"index": index, "wait": "10s"})
                index = int(r.headers["X-Consul-Index"])
                roots = r.json()
                if len(roots["Roots"]) == 1:
                    break
        assert roots is not None and len(roots["Roots"]) == 1
        (only,) = roots["Roots"]
        assert only["ID"] == rotated["active_root_id"] and only["IntermediateCerts"] is None
    finally:
        srv.close()


def test_two_servers_starting_at_once_on_one_database_share_one_trust_domain_and_root(tmp_path):
    if postgres_url():
        database_url = create_database(postgres_url())
    else:
        database_url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    servers = [
        make_server(tmp_path / f"s{i}", database_url=database_url, start=False) for i in range(2)
    ]
    servers[0].owns_database = bool(postgres_url())
    # Django's migrate is not safe to run twice at once; the race under test is the CA's.
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=ROOT,
        env=servers[0].env,
        check=True,
        timeout=120,
    )
    try:
        errors: list[Exception] = []

        def start(s) -> None:
            try:
                s.start()
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(s,)) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert errors == []
        answers = [s.consul().connect.ca.roots() for s in servers]
        assert answers[0] == answers[1]
        assert len(answers[0]["Roots"]) == 1
    finally:
        for s in reversed(servers):
            s.close()


def test_a_server_whose_key_cannot_decrypt_the_root_refuses_to_start(tmp_path):
    srv = make_server(tmp_path / "keys")
    try:
        srv.stop()
        srv.env["MESH_ENCRYPTION_KEY"] = Fernet.generate_key().decode()
        with pytest.raises(RuntimeError, match="cannot decrypt the CA root private key"):
            srv.start()
    finally:
        srv.close()


def test_a_blocking_leaf_query_answers_the_renewed_leaf_at_half_life(tmp_path):
    srv = make_server(tmp_path / "renew", extra_env={"MESH_CA_LEAF_TTL": "2s"})
    try:
        with srv.client() as c:
            first = c.get("/v1/agent/connect/ca/leaf/web")
            index = int(first.headers["X-Consul-Index"])
            started = time.monotonic()
            renewed = c.get("/v1/agent/connect/ca/leaf/web", params={"index": index, "wait": "20s"})
        took = time.monotonic() - started
        assert renewed.status_code == 200
        assert renewed.json()["SerialNumber"] != first.json()["SerialNumber"]
        assert int(renewed.headers["X-Consul-Index"]) > index
        assert took < 5  # renewed at half of the 2 s lifetime, not at the end of the wait
    finally:
        srv.close()
