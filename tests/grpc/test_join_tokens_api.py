"""`/api/join-tokens/` and `mesh join-token` against a real `mesh server` with ACLs on."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re

import pytest
from cryptography.hazmat.primitives import serialization

from meshproto import pki
from tests.grpc.conftest import Agent, acl_token, roots_pem, unique_node
from tests.test_cli import ok, run_mesh

pytestmark = pytest.mark.slow


def test_creating_a_token_answers_the_secret_once_with_the_pin_and_the_agent_command(cp):
    with cp.client() as http:
        r = http.post("/api/join-tokens/", json={"ttl": "30m", "uses": 3, "description": "rack 7"})
        assert r.status_code == 201, r.text
        created = r.json()
        listed = http.get("/api/join-tokens/").json()["results"]
        one = http.get(f"/api/join-tokens/{created['id']}/").json()
    token_id, _, secret = created["token"].partition(".")
    assert token_id == created["id"]
    assert (created["max_uses"], created["uses"], created["state"]) == (3, 0, "active")
    assert created["description"] == "rack 7"
    der = pki.load_cert(roots_pem(cp)).public_bytes(serialization.Encoding.DER)
    assert created["ca_pin"] == "sha256:" + hashlib.sha256(der).hexdigest()
    assert created["join_address"] == f"127.0.0.1:{cp.grpc_port}"
    assert created["agent_command"].startswith(
        f"mesh agent -join 127.0.0.1:{cp.grpc_port} -join-token {created['token']} "
        f"-ca-pin {created['ca_pin']} -data-dir "
    )
    assert created["id"] in [t["id"] for t in listed]
    assert secret not in json.dumps(listed) + json.dumps(one)
    assert one["state"] == "active"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"ttl": "forever"}, "ttl"),
        ({"ttl": "0s"}, "ttl"),
        ({"uses": -1}, "uses"),
        ({"uses": "many"}, "uses"),
        ({"datacenter": "nowhere"}, "datacenter"),
        ({"description": 5}, "description"),
    ],
)
def test_a_bad_create_is_a_400_and_creates_nothing(cp, body, field):
    with cp.client() as http:
        before = http.get("/api/join-tokens/").json()["count"]
        r = http.post("/api/join-tokens/", json=body)
        assert r.status_code == 400, r.text
        assert field in r.text
        assert http.get("/api/join-tokens/").json()["count"] == before


def test_join_tokens_need_acl_write_to_create_and_revoke_and_acl_read_to_list(cp):
    reader = acl_token(cp, 'acl = "read"')
    nobody = acl_token(cp, 'node_prefix "" { policy = "write" }')
    with cp.client(token=nobody) as http:
        assert http.post("/api/join-tokens/", json={}).status_code == 403
        assert http.get("/api/join-tokens/").status_code == 403
    with cp.client(token=reader) as http:
        assert http.get("/api/join-tokens/").status_code == 200
        r = http.post("/api/join-tokens/", json={})
        assert r.status_code == 403
        assert "acl:write" in r.json()["error"]
    with cp.client() as http:
        token_id = http.post("/api/join-tokens/", json={}).json()["id"]
    with cp.client(token=reader) as http:
        assert http.delete(f"/api/join-tokens/{token_id}/").status_code == 403
    with cp.client() as http:
        r = http.delete(f"/api/join-tokens/{token_id}/")
        assert r.status_code == 200
        assert r.json()["state"] == "revoked"
        assert http.delete("/api/join-tokens/0123456789abcdef/").status_code == 404


def test_creating_and_revoking_tokens_is_audited(cp):
    with cp.client() as http:
        token_id = http.post("/api/join-tokens/", json={"description": "audited"}).json()["id"]
        http.delete(f"/api/join-tokens/{token_id}/")
        entries = http.get("/api/audit/", params={"resource_id": token_id}).json()["results"]
    actions = sorted(e["action"] for e in entries)
    assert actions == ["agent.join-token.create", "agent.join-token.revoke"]


def test_the_cli_creates_a_token_an_agent_joins_with_then_lists_and_revokes(cp):
    out = ok(run_mesh("join-token", "create", "-ttl", "10m", server=cp, token=cp.token))
    token = re.search(r"^Token:\s+(\S+)$", out, re.M).group(1)
    pin = re.search(r"^CA pin:\s+(sha256:[0-9a-f]{64})$", out, re.M).group(1)
    assert f"mesh agent -join 127.0.0.1:{cp.grpc_port} -join-token {token} -ca-pin {pin}" in out
    agent = Agent(cp, unique_node())
    asyncio.run(agent.join(token))
    listed = json.loads(
        ok(run_mesh("join-token", "list", "-format=json", server=cp, token=cp.token))
    )
    mine = next(t for t in listed if t["id"] == token.split(".")[0])
    assert (mine["uses"], mine["state"], mine["last_used_by"]) == (1, "used", agent.node)
    pretty = ok(run_mesh("join-token", "list", server=cp, token=cp.token))
    assert mine["id"] in pretty and "used" in pretty
    out = ok(run_mesh("join-token", "revoke", token, server=cp, token=cp.token))
    assert out.strip() == f"Revoked join token {mine['id']}"


def test_the_cli_says_what_is_wrong_without_a_traceback(cp):
    r = run_mesh("join-token", "create", server=cp)
    assert r.returncode == 1
    assert "403" in r.stderr and "acl:write" in r.stderr
    r = run_mesh("join-token", "create", "-ttl", "soon", server=cp, token=cp.token)
    assert r.returncode == 1 and "invalid duration" in r.stderr
    r = run_mesh("join-token", "revoke", "0123456789abcdef", server=cp, token=cp.token)
    assert r.returncode == 1 and "not found" in r.stderr
    data = json.loads(
        ok(
            run_mesh(
                "join-token", "create", "-format=json", "-uses", "0", server=cp, token=cp.token
            )
        )
    )
    assert data["max_uses"] == 0 and data["token"].startswith(data["id"] + ".")


def test_the_cli_scopes_a_token_and_revokes_it_with_its_nodes(cp):
    out = ok(
        run_mesh(
            "join-token",
            "create",
            "-uses",
            "2",
            "-service",
            "web",
            "-service",
            "api-*",
            server=cp,
            token=cp.token,
        )
    )
    assert "Services:    web, api-*" in out and "Node:        (any name)" in out
    value = next(line.split()[1] for line in out.splitlines() if line.startswith("Token:"))
    default = json.loads(
        ok(run_mesh("join-token", "create", "-format=json", server=cp, token=cp.token))
    )
    assert default["services"] == [] and default["node_name"] == ""
    agent = Agent(cp, unique_node())
    asyncio.run(agent.join(value))
    asyncio.run(agent.sync([{"Name": "web", "Port": 80}]))
    out = ok(run_mesh("join-token", "revoke", "-nodes", value, server=cp, token=cp.token))
    assert "and the nodes that joined with it" in out
    with cp.client() as http:
        assert http.get(f"/v1/catalog/node/{agent.node}").status_code == 404
