"""The UI's HTTP contract without a browser: redirects, security headers, sign-in
refusals, and the live-update stream's topic parsing and refusals."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from frontend import events
from frontend.middleware import CONTENT_SECURITY_POLICY
from registry import topics
from registry.domain import acl

MANAGEMENT = "3f0b2f9a-1c55-4a63-9d3c-0d5f7a7a6b21"


@pytest.fixture
def acl_on(db, settings):
    settings.MESH_ACL_ENABLED = True
    settings.MESH_ACL_DEFAULT_POLICY = "deny"
    acl._cache.clear()
    acl.ensure_initial_management(MANAGEMENT)
    yield
    acl._cache.clear()


def test_the_bare_address_opens_the_ui(client, acl_on):
    r = client.get("/")
    assert r.status_code == 302 and r["Location"] == "/ui/"
    r = client.get("/ui/")
    assert r.status_code == 302 and r["Location"].startswith("/ui/login?next=")


def test_every_ui_page_carries_a_strict_policy_and_no_store(client, acl_on):
    r = client.get("/ui/login")
    assert r["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert "'unsafe-eval'" not in CONTENT_SECURITY_POLICY
    assert r["X-Frame-Options"] == "DENY"
    assert r["Cache-Control"] == "no-store"
    assert b"<script>" not in r.content and b" style=" not in r.content


def test_an_unknown_token_is_refused_and_a_known_one_signs_in(client, acl_on):
    r = client.post("/ui/login", {"token": "0f6bd4f9-1111-2222-3333-444455556666"})
    assert r.status_code == 403
    assert b"not valid" in r.content
    r = client.post("/ui/login", {"token": MANAGEMENT, "next": "https://evil.example/"})
    assert r.status_code == 302 and r["Location"] == "/ui/"  # never off-site
    r = client.get("/ui/services")
    assert r.status_code == 200
    assert MANAGEMENT.encode() not in r.content


def test_a_deleted_token_signs_its_browser_out(client, acl_on):
    token, secret = acl.create_token(description="short-lived", policies=[])
    assert client.post("/ui/login", {"token": secret}).status_code == 302
    assert client.get("/ui/").status_code == 200
    acl.delete_token(token.accessor_id)
    r = client.get("/ui/")
    assert r.status_code == 302 and "/ui/login" in r["Location"]


def test_a_page_the_token_may_not_read_is_refused(client, acl_on):
    _token, secret = acl.create_token(description="nothing", policies=[])
    client.post("/ui/login", {"token": secret})
    assert client.get("/ui/audit").status_code == 403
    assert client.get("/ui/acl").status_code == 403
    form = {"source": "a", "destination": "b", "action": "deny"}
    assert client.post("/ui/intentions/new", form).status_code == 403


def test_the_event_stream_follows_only_known_topics():
    exact, prefixes = events.parse_topics("checks,service:web,bogus,kv:app/,node:n1,service:")
    assert exact == [topics.CHECKS, topics.service("web"), topics.node("n1")]
    assert prefixes == [topics.kv("app/")]


def _call(scope) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    # On a thread of its own: the browser tests' Playwright keeps an event loop
    # running on this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, events.handle(scope, receive, send)).result(timeout=30)
    return sent


def test_the_event_stream_needs_a_signed_in_session(settings):
    settings.MESH_ACL_ENABLED = True
    scope = {
        "type": "http",
        "method": "GET",
        "path": events.PATH,
        "headers": [],
        "query_string": b"topics=checks",
    }
    sent = _call(scope)
    assert sent[0]["status"] == 401
    sent = _call({**scope, "method": "POST"})
    assert sent[0]["status"] == 405
