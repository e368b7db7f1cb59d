"""No audit entry holds a secret: every action the code can record has a redaction rule,
and an entry written for any of them keeps none of the secrets put into it.

The actions are enumerated from the code itself (the `/v1` write endpoints, the `/api`
write views, the gRPC calls and every `.audit("<action>", ...)` record in `registry/`),
so an action added without a rule in `registry.audit.RULES` fails here.
"""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

import pytest
from django.urls import URLResolver, get_resolver

from registry import audit, topics
from registry.domain import kv
from registry.domain.acl import strip_token_param
from registry.models import AuditEntry
from registry.txn import Change

REGISTRY = Path(audit.__file__).parent
# Apps beside the registry that record audit entries through it.
AUDITED_DIRS = (REGISTRY, REGISTRY.parent / "clouds")
OPERATOR = audit.Actor("9d4a8c2e-0000-4000-8000-000000000001", "operator token", "v1")


# --- the actions, from the code ------------------------------------------------------------


def _patterns(patterns=None):
    for p in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(p, URLResolver):
            yield from _patterns(p.url_patterns)
        else:
            yield p


def _v1_write_actions() -> set[str]:
    """`/v1` endpoints that take a write method run in an audit scope named after them."""
    out = set()
    for p in _patterns():
        fn = getattr(p.callback, "endpoint", None)
        if fn is not None and set(p.callback.methods) - {"GET"}:
            out.add(f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}")
    return out


def _api_write_actions() -> set[str]:
    """`/api` viewset actions bound to a write method (`MeshViewSet` scopes them)."""
    out = set()
    for p in _patterns():
        actions = getattr(p.callback, "actions", None)
        if not actions:
            continue
        basename = p.callback.initkwargs.get("basename")
        for method, action in actions.items():
            if method not in ("get", "head", "options"):
                out.add(f"api.{basename}.{action}")
    return out


def _string_arg(node: ast.Call, position: int) -> str | None:
    if len(node.args) > position and isinstance(node.args[position], ast.Constant):
        value = node.args[position].value
        return value if isinstance(value, str) else None
    return None


def _recorded_actions() -> set[str]:
    """Every action named in the code: `<change>.audit("a", ...)`, `audit.scope(actor, "a")`,
    `/api`'s `_audited(request, "a")` and the gRPC servicer's `self._run(ctx, actor, "RPC")`."""
    out = set()
    for path in (p for d in AUDITED_DIRS for p in d.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "audit" and path.name != "txn.py":
                action = _string_arg(node, 0)
            elif name in ("scope", "_audited"):
                action = _string_arg(node, 1)
            elif name == "_run" and "grpc" in path.parts:
                rpc = _string_arg(node, 2)
                action = f"agent.{rpc}" if rpc else None
            else:
                continue
            if action:
                out.add(action)
    return out


def all_actions() -> set[str]:
    return _v1_write_actions() | _api_write_actions() | _recorded_actions()


def test_the_enumeration_finds_each_kind_of_action(db):
    actions = all_actions()
    # One of each kind, so that a broken enumeration cannot pass the test below vacuously.
    for expected in ("acl.token_create", "api.acltoken.create", "agent.Join", "kv.set", "ca.sign"):
        assert expected in actions
    assert len(actions) > 60


def test_every_action_the_code_records_has_a_redaction_rule(db):
    missing = sorted(all_actions() - set(audit.RULES))
    assert missing == [], f"add a rule to registry.audit.RULES for: {missing}"


def test_no_rule_is_left_for_an_action_that_no_longer_exists(db):
    assert sorted(set(audit.RULES) - all_actions()) == []


# --- every action, with every secret ---------------------------------------------------------

ACL_SECRET = "5b3b0a3e-acl-secret-4f0b-9b1f-0c2c0b7d9e11"
JOIN_SECRET = "jt-7f3a.join-secret-Zr8pQ2"
CA_KEY = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIca-private-key\n-----END EC PRIVATE KEY-----"
CLOUD_SECRET = "wJalrXUtnFEMI/cloud-secret/bPxRfiCYEXAMPLEKEY"
KV_SECRET = "hunter2-kv-secret-value"
SECRETS = (ACL_SECRET, JOIN_SECRET, CA_KEY, CLOUD_SECRET, KV_SECRET)


def poisoned() -> dict:
    """State holding every kind of secret, nested as real bodies and records nest them."""
    return {
        "SecretID": ACL_SECRET,
        "AccessorID": "a1b2c3d4-0000-4000-8000-000000000001",
        "Tokens": [{"secret_id": ACL_SECRET}, {"Token": ACL_SECRET}],
        "BootstrapSecret": ACL_SECRET,
        "join": {"secret": JOIN_SECRET, "secret_hash": JOIN_SECRET},
        "Config": {"PrivateKey": CA_KEY, "LeafCertTTL": "72h"},
        "Cloud": {
            "Credentials": {"SecretAccessKey": CLOUD_SECRET},
            "secret_access_key": CLOUD_SECRET,
            "session-token": CLOUD_SECRET,
            "Password": CLOUD_SECRET,
        },
        "KV": {"Key": "secret/db-password", "Value": base64.b64encode(KV_SECRET.encode()).decode()},
        "Entry": {"Key": "vault/root", "Value": KV_SECRET.encode()},
    }


def _stored_text() -> str:
    rows = AuditEntry.objects.values()
    assert rows, "nothing was recorded"
    return json.dumps(list(rows), default=str)


def _each_action() -> list[str]:
    """The actions, at collection time (pytest-django has set Django up by then)."""
    return sorted(all_actions())


@pytest.mark.parametrize("action", _each_action())
def test_no_secret_survives_in_an_entry_for(db, action):
    path = f"/v1/some/path?dc=dc1&token={ACL_SECRET}"
    with audit.scope(OPERATOR, action, "PUT", path) as s:
        # A record the domain writes explicitly...
        with Change() as w:
            w.touch(topics.kv("audit-test"))
            w.audit(action, "thing", "id-1", poisoned(), poisoned())
        # ...and the request body recorded for a write that writes no record of its own.
        s.body = poisoned()
        s.recorded = False
        with Change() as w:
            w.touch(topics.kv("audit-test"))
    assert AuditEntry.objects.filter(action=action).count() == 2
    stored = _stored_text()
    leaked = [secret for secret in SECRETS if secret in stored]
    assert leaked == []
    assert "token=" not in stored
    entry = AuditEntry.objects.filter(action=action).first()
    assert entry.path == "/v1/some/path?dc=dc1"
    # What is not secret stays readable.
    assert entry.after["AccessorID"] == "a1b2c3d4-0000-4000-8000-000000000001"
    assert entry.after["Config"]["LeafCertTTL"] == "72h"
    assert entry.after["SecretID"] == audit.REDACTED


def test_an_action_without_a_rule_is_recorded_without_its_state(db):
    with audit.scope(OPERATOR, "brand.new", "PUT", "/v1/new"), Change() as w:
        w.touch(topics.kv("audit-test"))
        w.audit("brand.new", "thing", "id-1", None, {"SecretID": ACL_SECRET})
    entry = AuditEntry.objects.get(action="brand.new")
    assert ACL_SECRET not in json.dumps(entry.after)
    assert entry.resource_id == "id-1"  # who did what to which resource is still recorded


# --- KV values ---------------------------------------------------------------------------


def test_a_kv_write_is_recorded_with_its_key_and_a_description_of_its_value(db):
    with audit.scope(OPERATOR, "kv.entry", "PUT", "/v1/kv/app/colour"):
        kv.put("app/colour", b"blue")
    entry = AuditEntry.objects.get(action="kv.set")
    assert (entry.resource_type, entry.resource_id) == ("kv", "app/colour")
    assert entry.after["Value"].startswith("<4 bytes, sha256:")
    assert "blue" not in json.dumps(entry.after)


def test_values_under_sensitive_prefixes_are_not_described_at_all(db, settings):
    settings.MESH_AUDIT_SENSITIVE_KV_PREFIXES = ("secret/", "team-a/creds/")
    with audit.scope(OPERATOR, "kv.entry", "PUT", "/v1/kv"):
        kv.put("secret/db-password", KV_SECRET.encode())
        kv.put("team-a/creds/api", b"k3y")
        kv.delete("secret/db-password")
    entries = {(e.action, e.resource_id): e for e in AuditEntry.objects.all()}
    assert entries["kv.set", "secret/db-password"].after["Value"] == audit.REDACTED
    assert entries["kv.set", "team-a/creds/api"].after["Value"] == audit.REDACTED
    assert entries["kv.delete", "secret/db-password"].before["Value"] == audit.REDACTED
    assert KV_SECRET not in _stored_text()


def test_a_recursive_delete_records_the_keys_it_removed(db):
    kv.put("tree/a", b"1")
    kv.put("tree/b", b"2")
    with audit.scope(OPERATOR, "kv.entry", "DELETE", "/v1/kv/tree?recurse"):
        kv.delete("tree/", recurse=True)
    entry = AuditEntry.objects.get(action="kv.delete-tree")
    assert entry.before == {"Count": 2, "Keys": ["tree/a", "tree/b"]}


# --- ?token= in URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,stripped",
    [
        ("/api/nodes/", "/api/nodes/"),
        ("/api/nodes/?token=s3cret", "/api/nodes/"),
        ("/api/nodes/?limit=1&token=s3cret&offset=2", "/api/nodes/?limit=1&offset=2"),
        ("http://h:1/api/?token=a&token=b&format=json", "http://h:1/api/?format=json"),
        ("/api/?to%6Ben=s3cret&x=1", "/api/?x=1"),  # an encoded name is the same parameter
        ("/api/?tokens=1&x_token=2", "/api/?tokens=1&x_token=2"),
        ("/api/?token=s#frag", "/api/#frag"),
    ],
)
def test_strip_token_param(url, stripped):
    assert strip_token_param(url) == stripped
