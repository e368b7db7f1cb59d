"""The agent protocol's service layer (`registry.domain.join_tokens`, `enrollment`, `node_sync`): join tokens,
joining, anti-entropy, check updates and leaves, against the test database."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.utils import timezone

from meshproto import pki, spiffe
from registry import topics as topic
from registry.domain import catalog, connect_ca, enrollment, join_tokens, node_sync
from registry.errors import BadRequest, NotFound, PermissionDenied
from registry.models import AuditEntry, Check, IssuedCert, JoinToken, Node, ServiceInstance
from registry.txn import current_index, topic_index


def agent_csr(node: str, dc: str = "dc1") -> str:
    return pki.make_csr(
        pki.generate_key(), spiffe.agent_id(connect_ca.trust_domain(), node, dc).uri
    )


def service_csr(service: str, dc: str = "dc1") -> str:
    return pki.make_csr(
        pki.generate_key(), spiffe.service_id(connect_ca.trust_domain(), service, dc).uri
    )


def joined(node: str = "host-a") -> enrollment.Joined:
    token = join_tokens.create_token(services=["*"]).token
    return enrollment.join(token, node, agent_csr(node), address="10.0.0.5")


def web_state(**overrides) -> node_sync.NodeState:
    web = {
        "Name": "web",
        "Port": 9090,
        "Check": {"HTTP": "http://127.0.0.1:9090/health", "Interval": 10.0},
        "Connect": {
            "SidecarService": {
                "Proxy": {
                    "Upstreams": [{"DestinationName": "api", "LocalBindPort": 9191}],
                }
            }
        },
    }
    fields = {"address": "10.0.0.5", "meta": {"rack": "r1"}, "services": (web,), "checks": ()}
    fields.update(overrides)
    return node_sync.NodeState(**fields)


# --- join tokens -------------------------------------------------------------------------


def test_a_token_is_its_id_and_a_secret_and_only_the_secrets_hash_is_stored(db):
    new = join_tokens.create_token(description="rack 1", max_uses=3, ttl_seconds=600)
    token_id, _, secret = new.token.partition(".")
    row = JoinToken.objects.get(id=token_id)
    assert secret not in (row.secret_hash, row.description)
    assert len(row.secret_hash) == 64
    assert (row.max_uses, row.uses, row.datacenter) == (3, 0, "dc1")
    assert dt.timedelta(seconds=590) < row.expires_at - timezone.now() <= dt.timedelta(seconds=600)
    assert join_tokens.token_json(row)["state"] == "active"
    assert "secret_hash" not in join_tokens.token_json(row)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ttl_seconds": 0}, "ttl must be between"),
        ({"ttl_seconds": 10 * 365 * 86400}, "ttl must be between"),
        ({"max_uses": -1}, "uses must be 0"),
        ({"datacenter": "nowhere"}, 'unknown datacenter "nowhere"'),
        ({"description": "x" * 2000}, "description"),
    ],
)
def test_it_refuses_a_bad_token_request(db, kwargs, message):
    with pytest.raises(BadRequest, match=message):
        join_tokens.create_token(**kwargs)
    assert not JoinToken.objects.exists()


def test_joining_registers_the_agent_node_and_signs_its_identity(db):
    before = current_index()
    result = joined("host-a")
    node = Node.objects.get(name="host-a")
    assert node.meta == {"mesh-role": "agent"}
    assert node.address == "10.0.0.5"
    assert result.node_id == node.node_id
    leaf = pki.load_certs(result.cert_pem)[0]
    assert pki.spiffe_id_of(leaf) == f"spiffe://{result.trust_domain}/agent/client/dc/dc1/id/host-a"
    roots = [pki.load_cert(r) for r in result.roots_pem]
    assert leaf.issuer == roots[0].subject
    leaf.verify_directly_issued_by(roots[0])
    assert topic_index(topic.node("host-a")) > before
    assert IssuedCert.objects.filter(kind="agent", name="host-a").count() == 1
    assert AuditEntry.objects.filter(action="agent.join").count() == 0  # no audit scope here


def test_a_single_use_token_joins_once(db):
    token = join_tokens.create_token().token
    enrollment.join(token, "host-a", agent_csr("host-a"), address="10.0.0.5")
    with pytest.raises(join_tokens.Unauthenticated):
        enrollment.join(token, "host-b", agent_csr("host-b"), address="10.0.0.6")
    assert not Node.objects.filter(name="host-b").exists()
    assert JoinToken.objects.get().uses == 1


def test_a_multi_use_token_joins_until_its_uses_run_out_and_unlimited_ones_do_not(db):
    two = join_tokens.create_token(max_uses=2).token
    unlimited = join_tokens.create_token(max_uses=0).token
    for i in range(2):
        enrollment.join(two, f"n{i}", agent_csr(f"n{i}"), address="10.0.0.1")
    with pytest.raises(join_tokens.Unauthenticated):
        enrollment.join(two, "n9", agent_csr("n9"), address="10.0.0.1")
    for i in range(5):
        enrollment.join(unlimited, f"u{i}", agent_csr(f"u{i}"), address="10.0.0.1")
    assert JoinToken.objects.get(max_uses=0).uses == 5


@pytest.mark.parametrize(
    "spoil",
    [
        lambda t: "garbage",
        lambda t: t.split(".")[0] + ".wrong-secret",
        lambda t: "0123456789abcdef.whatever",
        lambda t: "",
        lambda t: t.split(".")[0],
    ],
)
def test_a_wrong_token_is_refused_and_registers_nothing(db, spoil):
    token = join_tokens.create_token().token
    with pytest.raises(join_tokens.Unauthenticated, match="invalid, expired, revoked or used up"):
        enrollment.join(spoil(token), "host-a", agent_csr("host-a"), address="10.0.0.5")
    assert not Node.objects.filter(name="host-a").exists()
    assert JoinToken.objects.get().uses == 0


def test_an_expired_or_revoked_token_is_refused(db):
    expired = join_tokens.create_token()
    JoinToken.objects.filter(id=expired.row.id).update(
        expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    revoked = join_tokens.create_token()
    join_tokens.revoke_token(revoked.row.id)
    for new in (expired, revoked):
        with pytest.raises(join_tokens.Unauthenticated):
            enrollment.join(new.token, "host-a", agent_csr("host-a"), address="10.0.0.5")
    assert not Node.objects.filter(name="host-a").exists()
    states = {
        join_tokens.token_json(r)["id"]: join_tokens.token_json(r)["state"]
        for r in join_tokens.list_tokens()
    }
    assert states == {expired.row.id: "expired", revoked.row.id: "revoked"}


def test_revoking_an_unknown_token_is_a_404(db):
    with pytest.raises(NotFound):
        join_tokens.revoke_token("0123456789abcdef")


def test_a_csr_for_another_identity_is_refused_without_using_the_token(db):
    token = join_tokens.create_token().token
    for csr in (agent_csr("other-host"), service_csr("web"), agent_csr("host-a", dc="dc9")):
        with pytest.raises(PermissionDenied):
            enrollment.join(token, "host-a", csr, address="10.0.0.5")
    with pytest.raises(BadRequest):
        enrollment.join(token, "host-a", "not a csr", address="10.0.0.5")
    assert JoinToken.objects.get().uses == 0
    assert not Node.objects.filter(name="host-a").exists()
    enrollment.join(token, "host-a", agent_csr("host-a"), address="10.0.0.5")


def test_an_agent_cannot_join_as_the_servers_node(db):
    catalog.ensure_local_node()
    token = join_tokens.create_token().token
    with pytest.raises(PermissionDenied, match="is a server"):
        enrollment.join(token, "mesh-server", agent_csr("mesh-server"), address="10.0.0.5")
    assert JoinToken.objects.get().uses == 0


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 200])
def test_a_bad_node_name_is_refused(db, name):
    token = join_tokens.create_token().token
    with pytest.raises(BadRequest, match="invalid node name"):
        enrollment.join(token, name, agent_csr("host-a"), address="10.0.0.5")


def test_the_ca_pin_is_the_sha256_of_the_active_roots_der(db):
    import hashlib

    from cryptography.hazmat.primitives import serialization

    pin = enrollment.ca_pin()
    der = pki.load_cert(enrollment.roots_pem()[0]).public_bytes(serialization.Encoding.DER)
    assert pin == "sha256:" + hashlib.sha256(der).hexdigest()


def test_the_server_certificate_names_its_hosts_and_chains_to_the_root(db):
    from cryptography import x509

    cert = enrollment.issue_server_certificate(["127.0.0.1", "cp.example"])
    certs = pki.load_certs(cert.chain_pem)
    leaf, root = certs[0], certs[-1]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "server.dc1.mesh",
        "localhost",
        "cp.example",
    }
    leaf.verify_directly_issued_by(root)
    assert pki.cert_pem(root) == cert.roots_pem[0]
    assert IssuedCert.objects.filter(kind="server").count() == 1
    assert cert.renew_at < cert.not_after


# --- anti-entropy -----------------------------------------------------------------------


def test_sync_registers_services_with_their_sidecars_and_checks(db):
    joined("host-a")
    index = node_sync.sync_node("host-a", "dc1", web_state())
    rows = {s.service_id: s for s in ServiceInstance.objects.filter(node__name="host-a")}
    assert set(rows) == {"web", "web-sidecar-proxy"}
    sidecar = rows["web-sidecar-proxy"]
    assert sidecar.kind == "connect-proxy"
    assert sidecar.destination_name == "web"
    assert sidecar.port == 21000
    assert sidecar.parent_service_id == "web"
    assert sidecar.proxy["Upstreams"][0]["DestinationName"] == "api"
    checks = {c.check_id: c for c in Check.objects.filter(node__name="host-a")}
    assert set(checks) == {
        "service:web",
        "service:web-sidecar-proxy:1",
        "service:web-sidecar-proxy:2",
    }
    assert checks["service:web"].status == "critical"
    assert Node.objects.get(name="host-a").meta == {"rack": "r1", "mesh-role": "agent"}
    assert index == topic_index(topic.node("host-a")) > 0


def test_a_second_identical_sync_writes_nothing(db):
    joined("host-a")
    state = web_state(
        checks=(
            {"CheckID": "service:web", "Status": "passing", "Output": "HTTP 200"},
            {"CheckID": "disk", "Name": "disk", "TTL": 30.0, "Status": "warning"},
        )
    )
    first = node_sync.sync_node("host-a", "dc1", state)
    global_index = current_index()
    assert node_sync.sync_node("host-a", "dc1", state) == first
    assert current_index() == global_index
    check = Check.objects.get(check_id="service:web")
    assert (check.status, check.output) == ("passing", "HTTP 200")
    assert Check.objects.get(check_id="disk").status == "warning"


def test_sync_removes_what_the_agent_no_longer_has_and_restores_what_was_lost(db):
    joined("host-a")
    db_state = {"Name": "db", "Port": 5432, "Check": {"TTL": 30.0}}
    node_sync.sync_node("host-a", "dc1", web_state(services=web_state().services + (db_state,)))
    assert ServiceInstance.objects.filter(node__name="host-a", service_id="db").exists()
    # Someone deregisters web behind the agent's back; the agent dropped db.
    catalog.deregister_agent_service(Node.objects.get(name="host-a"), "web")
    node_sync.sync_node("host-a", "dc1", web_state())
    ids = set(
        ServiceInstance.objects.filter(node__name="host-a").values_list("service_id", flat=True)
    )
    assert ids == {"web", "web-sidecar-proxy"}
    assert not Check.objects.filter(node__name="host-a", service_id="db").exists()


def test_sync_registers_a_node_the_catalog_lost(db):
    joined("host-a")
    catalog.catalog_deregister({"Node": "host-a"})
    node_sync.sync_node("host-a", "dc1", web_state())
    assert Node.objects.get(name="host-a").meta["mesh-role"] == "agent"
    assert ServiceInstance.objects.filter(node__name="host-a").count() == 2


def test_a_changed_service_is_updated_and_keeps_its_sidecar_port(db):
    joined("host-a")
    node_sync.sync_node("host-a", "dc1", web_state())
    changed = dict(web_state().services[0], Tags=["v2"])
    node_sync.sync_node("host-a", "dc1", web_state(services=(changed,)))
    web = ServiceInstance.objects.get(node__name="host-a", service_id="web")
    assert web.tags == ["v2"]
    assert ServiceInstance.objects.get(service_id="web-sidecar-proxy").port == 21000
    assert Check.objects.get(check_id="service:web").service_tags == ["v2"]


def test_two_new_sidecars_in_one_sync_get_different_ports(db):
    joined("host-a")
    api = {"Name": "api", "Port": 9091, "Connect": {"SidecarService": {}}}
    node_sync.sync_node("host-a", "dc1", web_state(services=web_state().services + (api,)))
    ports = dict(
        ServiceInstance.objects.filter(kind="connect-proxy").values_list("service_id", "port")
    )
    assert sorted(ports.values()) == [21000, 21001]


@pytest.mark.parametrize(
    "state, message",
    [
        ({"services": ({"Port": 1},)}, "Missing service name"),
        ({"services": ({"Name": "a"}, {"Name": "a"})}, 'duplicate service ID "a"'),
        ({"checks": ({"CheckID": "x", "TTL": 5.0, "Status": "sunny"},)}, "Invalid check status"),
        ({"checks": ({"CheckID": "x", "TTL": 5.0, "ServiceID": "nope"},)}, 'ServiceID "nope"'),
        ({"services": ({"Name": "a", "Check": {"Interval": 5.0}},)}, "Invalid check"),
    ],
)
def test_a_bad_node_state_is_refused_and_writes_nothing(db, state, message):
    joined("host-a")
    index = current_index()
    with pytest.raises(BadRequest, match=message):
        node_sync.sync_node("host-a", "dc1", web_state(**state))
    assert current_index() == index
    assert not ServiceInstance.objects.filter(node__name="host-a").exists()


def test_node_state_is_decoded_with_consuls_field_names_and_durations():
    state = node_sync.parse_node_state(
        "10.0.0.5",
        {"k": "v"},
        [
            json.dumps(
                {"name": "web", "port": 80, "check": {"http": "http://x/", "interval": "10s"}}
            )
        ],
        [json.dumps({"check_id": "service:web", "status": "passing", "output": "ok"})],
    )
    assert state.services[0]["Check"] == {"HTTP": "http://x/", "Interval": "10s"}
    assert state.checks[0] == {"CheckID": "service:web", "Status": "passing", "Output": "ok"}
    with pytest.raises(BadRequest, match=r"services_json\[0\]: invalid JSON"):
        node_sync.parse_node_state("", {}, ["{"], [])
    with pytest.raises(BadRequest, match="expected an object"):
        node_sync.parse_node_state("", {}, [], ["[]"])


# --- check updates ------------------------------------------------------------------------


def test_update_checks_moves_health_and_an_equal_result_writes_nothing(db):
    joined("host-a")
    node_sync.sync_node("host-a", "dc1", web_state())
    before = topic_index(topic.service("web"))
    index = node_sync.update_checks("host-a", [("service:web", "passing", "HTTP 200 OK")])
    assert Check.objects.get(check_id="service:web").status == "passing"
    assert topic_index(topic.service("web")) == index > before
    global_index = current_index()
    assert node_sync.update_checks("host-a", [("service:web", "passing", "HTTP 200 OK")]) == index
    assert node_sync.update_checks("host-a", [("unknown", "passing", None)]) == index
    assert current_index() == global_index
    with pytest.raises(BadRequest, match="invalid status"):
        node_sync.update_checks("host-a", [("service:web", "green", None)])


# --- leaves -----------------------------------------------------------------------------


def test_leaves_are_signed_only_for_services_on_the_callers_node(db):
    joined("host-a")
    joined("host-b")
    node_sync.sync_node("host-a", "dc1", web_state())
    leaf = enrollment.sign_leaf("host-a", "dc1", service_csr("web"), "web")
    assert leaf.spiffe_id.endswith("/svc/web")
    with pytest.raises(PermissionDenied, match='not registered on node "host-b"'):
        enrollment.sign_leaf("host-b", "dc1", service_csr("web"), "web")
    with pytest.raises(PermissionDenied):
        enrollment.sign_leaf("host-a", "dc1", service_csr("api"), "web")
    with pytest.raises(PermissionDenied):
        enrollment.sign_leaf("host-a", "dc1", agent_csr("host-b"), "")
    renewed = enrollment.sign_leaf("host-a", "dc1", agent_csr("host-a"), "")
    assert renewed.spiffe_id.endswith("/id/host-a")


def test_the_node_proxies_are_its_connect_proxy_instances(db):
    joined("host-a")
    node_sync.sync_node("host-a", "dc1", web_state())
    assert node_sync.node_proxies("host-a") == ["web-sidecar-proxy"]
    assert node_sync.node_proxies("nobody") == []


# --- the peer table ----------------------------------------------------------------------


def test_the_peer_table_knows_only_connections_the_listener_forwarded():
    from registry.grpc.auth import Peer, PeerTable

    peers = PeerTable()
    peer = Peer("10.0.0.5", 40000, ("spiffe://x.mesh/agent/client/dc/dc1/id/a",))
    peers.add(51234, peer)
    assert peers.lookup("ipv4:127.0.0.1:51234") is peer
    for other in (
        "ipv4:127.0.0.2:51234",  # same port from another loopback address
        "ipv4:127.0.0.1:51235",
        "ipv6:[::1]:51234",
        "unix:/tmp/x",
        "garbage",
    ):
        assert peers.lookup(other) is None
    peers.remove(51234)
    assert peers.lookup("ipv4:127.0.0.1:51234") is None
