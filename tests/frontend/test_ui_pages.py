"""The web UI in a real browser against a real `mesh server` (ACLs on): signing in,
the overview and services with live health, intentions, read-only tokens and
escaping of every user-controlled field."""

from __future__ import annotations

import re
import time
import uuid
from urllib.parse import quote

import httpx
import pytest

from tests.frontend.conftest import XSS, new_browser, output_dir

pytestmark = pytest.mark.slow

READ_ONLY_RULES = """
service_prefix "" { policy = "read" intentions = "read" }
node_prefix "" { policy = "read" }
key_prefix "" { policy = "list" }
operator = "read"
acl = "read"
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def register(server, name: str, *, tags=(), meta=None, port: int = 8080) -> str:
    """An instance with a TTL check (passing), through the py-consul client."""
    import consul

    c = server.consul()
    sid = f"{name}-1"
    c.agent.service.register(
        name,
        service_id=sid,
        port=port,
        tags=list(tags),
        meta=meta or {},
        check=consul.Check.ttl("300s"),
    )
    c.agent.check.ttl_pass(f"service:{sid}", "fine")
    return sid


def read_only_token(server) -> str:
    with server.client() as http:
        r = http.put("/v1/acl/policy", json={"Name": unique("ro"), "Rules": READ_ONLY_RULES})
        assert r.status_code == 200, r.text
        r = http.put("/v1/acl/token", json={"Policies": [{"ID": r.json()["ID"]}]})
        assert r.status_code == 200, r.text
        return r.json()["SecretID"]


# --------------------------------------------------------------------------- sign-in


def test_the_root_opens_the_sign_in_page_and_a_bad_token_is_refused_inline(browser):
    page = browser.open("/", screenshot="login")
    assert page.url.endswith("/ui/login?next=/ui/") or "/ui/login" in page.url
    page.fill("#token", "not-a-token")
    page.click("main button[type=submit]")
    page.wait_for_selector("#token-error")
    assert "not valid" in page.locator("#token-error").text_content()
    assert "/ui/login" in page.url


def test_signing_in_keeps_the_token_server_side_in_a_strict_cookie(browser, ui_server):
    browser.sign_in(ui_server.token)
    cookies = {c["name"]: c for c in browser.context.cookies()}
    session = cookies["sessionid"]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
    assert ui_server.token not in str(browser.context.cookies())
    storage = browser.page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
    assert ui_server.token not in storage
    r = httpx.get(browser.url("/ui/login"))
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert r.headers["x-frame-options"] == "DENY"
    # Signing out ends the session: the next page asks to sign in again.
    browser.page.click("text=Sign out")
    browser.page.goto(browser.url("/ui/services"))
    assert "/ui/login" in browser.page.url


# --------------------------------------------------------------------------- overview and services


def test_the_overview_lists_services_with_their_health(browser, ui_server):
    good, bad = unique("web"), unique("api")
    register(ui_server, good)
    sid = register(ui_server, bad)
    ui_server.consul().agent.check.ttl_fail(f"service:{sid}", "connection refused")
    browser.sign_in(ui_server.token)
    page = browser.open("/ui/", screenshot="overview")
    assert page.locator(f'a[data-service="{good}"]').get_attribute("data-health") == "passing"
    assert page.locator(f'a[data-service="{bad}"]').get_attribute("data-health") == "critical"
    # The failing check is listed with its output, linking to its service.
    row = page.locator(f'tr[data-check="service:{sid}"]')
    assert "connection refused" in row.text_content()
    row.locator(f'a[href="/ui/services/{bad}"]').click()
    page.wait_for_url(re.compile(f".*/ui/services/{bad}$"))


def test_a_failing_check_turns_red_on_the_open_page_without_a_reload(browser, ui_server):
    name = unique("live")
    sid = register(ui_server, name)
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/services?q={name}", screenshot="services")
    browser.live()
    cell = page.locator(f'tr[data-service="{name}"] [data-health]')
    assert cell.get_attribute("data-health") == "passing"
    page.evaluate("window.__notReloaded = true")
    started = time.monotonic()
    ui_server.consul().agent.check.ttl_fail(f"service:{sid}", "down")
    page.wait_for_selector(f'tr[data-service="{name}"] [data-health=critical]', timeout=20000)
    print(f"\n[ui] failing check shown red after {time.monotonic() - started:.2f} s")
    assert page.evaluate("window.__notReloaded") is True


def test_the_services_list_filters_and_pages_on_the_server(browser, ui_server):
    stem = unique("many")
    c = ui_server.consul()
    for i in range(55):
        c.agent.service.register(
            f"{stem}-{i:02d}", service_id=f"{stem}-{i:02d}", tags=["blue"] if i % 2 else []
        )
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/services?q={stem}")
    assert page.locator("tbody tr").count() == 50
    assert "1–50 of 55" in page.locator(".pager").first.text_content()
    page.click("a[rel=next]")
    page.wait_for_url(re.compile(r".*page=2.*"))
    assert page.locator("tbody tr").count() == 5
    page = browser.open(f"/ui/services?q={stem}&tag=blue")
    assert "of 27" in page.locator(".pager").text_content()
    page = browser.open(f"/ui/services?q={stem}-nothing")
    assert page.locator(".empty").is_visible()


def test_the_service_page_shows_instances_checks_chain_and_an_empty_metrics_state(
    browser, ui_server
):
    name = unique("svc")
    sid = register(ui_server, name, tags=["v2"], meta={"team": "payments"})
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/services/{name}", screenshot="service")
    assert page.locator(f'tr[data-instance="{sid}"]').is_visible()
    assert (
        "passing"
        in page.locator(f'tr[data-instance="{sid}"] [data-check="service:{sid}"]').text_content()
    )
    assert page.locator(".chain-node.resolver").count() == 1
    assert page.locator(".chain-node.target").count() == 1
    assert "payments" in page.locator("dl.meta").text_content()
    page.wait_for_timeout(300)  # the chart's fetch answers: still the empty state
    assert page.locator(".chart .empty").is_visible()


def test_the_service_charts_offer_15m_1h_and_24h_from_reported_traffic(browser, ui_server):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from meshproto.proto import mesh_pb2
    from tests.grpc.conftest import join_now
    from tests.grpc.test_report_traffic import counts

    api, web = unique("api"), unique("web")

    def report_traffic() -> None:
        # A real agent's join and reports (in a thread: Playwright's loop runs here).
        host = join_now(ui_server)
        asyncio.run(host.sync([{"Name": api, "Port": 9000}]))
        now = time.time()
        for ago, n in ((10 * 3600, 70), (5000, 30), (5, 100)):  # the first two get rolled up
            report = mesh_pb2.TrafficReport(
                start_unix=now - ago - 10,
                end_unix=now - ago,
                counts=[counts("destination", web, api, n, 1)],
            )
            assert asyncio.run(host.call("ReportTraffic", report)).accepted == 1

    with ThreadPoolExecutor(1) as pool:
        pool.submit(report_traffic).result(timeout=120)
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/services/{api}")
    chart = page.locator(".chart")
    page.wait_for_selector(".chart[data-state=data][data-step='30']", state="attached")
    assert chart.get_attribute("data-points") == "1"
    assert page.locator(".chart .plot").count() == 3
    day_row = page.locator('.chart table.metrics tr[data-window="24h"] td')
    assert day_row.last.text_content() == "200"
    page.click(".chart button[data-window='24h']")
    page.wait_for_selector(".chart[data-step='300']", state="attached")
    assert chart.get_attribute("data-points") == "3"
    assert page.locator(".chart button[data-window='24h']").get_attribute("aria-pressed") == "true"
    page.screenshot(path=str(output_dir() / "service-metrics-24h.png"), full_page=True)
    page.click(".chart button[data-window='1h']")
    page.wait_for_selector(".chart[data-step='60']", state="attached")
    assert chart.get_attribute("data-points") == "1"


# --------------------------------------------------------------------------- intentions


def test_an_intention_made_in_the_form_decides_the_checker_and_the_api(browser, ui_server):
    web, api = unique("web"), unique("api")
    register(ui_server, web)
    register(ui_server, api)
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/intentions/new?destination={api}", screenshot="intention-form")
    page.fill("#f-source", web)
    page.select_option("#f-action", "deny")
    page.fill("#f-description", "no calls")
    page.click("main button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/intentions\?destination=.*"))
    assert page.locator(f'tr[data-intention="{web}=>{api}"] .action.deny').is_visible()
    with ui_server.client() as http:
        r = http.get("/v1/connect/intentions/check", params={"source": web, "destination": api})
        assert r.json() == {"Allowed": False}
    page = browser.open(f"/ui/intentions/check?source={web}&destination={api}")
    assert page.locator("#decision").get_attribute("data-allowed") == "false"
    assert f"{web} → {api}" in page.locator("main").text_content()
    browser.open("/ui/intentions", screenshot="intentions")
    browser.open("/ui/intentions/matrix", screenshot="intention-matrix")


def test_a_duplicate_intention_and_a_bad_regex_are_refused_inline_and_nothing_is_saved(
    browser, ui_server
):
    web, api = unique("web"), unique("api")
    with ui_server.client() as http:
        r = http.put(
            "/v1/connect/intentions/exact",
            params={"source": web, "destination": api},
            json={"Action": "allow"},
        )
        assert r.status_code == 200
    browser.sign_in(ui_server.token)
    page = browser.open("/ui/intentions/new")
    page.fill("#f-source", web)
    page.fill("#f-destination", api)
    page.click("main button[type=submit]")
    page.wait_for_selector(".field-error")
    assert "duplicate" in page.locator(".field-error").first.text_content().lower()
    # L7 permissions with a malformed regex: the error sits by the permissions field.
    page.fill("#f-source", unique("other"))
    page.select_option("#f-action", "l7")
    page.fill("#f-permissions", '[{"Action": "allow", "HTTP": {"PathRegex": "(["}}]')
    page.click("main button[type=submit]")
    page.wait_for_selector("#e-permissions")
    with ui_server.client() as http:
        rows = http.get("/v1/connect/intentions", params={"filter": f'DestinationName == "{api}"'})
        assert [(i["SourceName"], i["Action"]) for i in rows.json()] == [(web, "allow")]


# --------------------------------------------------------------------------- read-only tokens


MAIN_PAGES = ["/ui/", "/ui/services", "/ui/intentions", "/ui/intentions/matrix"]


def test_a_read_only_token_sees_no_write_control_and_a_forged_post_is_refused(
    playwright_browser, ui_server
):
    web, api = unique("web"), unique("api")
    register(ui_server, web)
    register(ui_server, api)
    with ui_server.client() as http:
        http.put(
            "/v1/connect/intentions/exact",
            params={"source": web, "destination": api},
            json={"Action": "allow"},
        )
    b = new_browser(playwright_browser, ui_server)
    try:
        b.sign_in(read_only_token(ui_server))
        for path in [*MAIN_PAGES, f"/ui/services/{web}", f"/ui/intentions?destination={api}"]:
            page = b.open(path)
            assert page.locator("[data-write]").count() == 0, path
        # A forged form post (valid session and CSRF token, no right) is refused.
        r = b.page.request.post(
            b.url("/ui/intentions/new"),
            form={"source": web, "destination": api, "action": "deny"},
            headers={"X-CSRFToken": b.csrf()},
        )
        assert r.status == 403
        intention_id = None
        with ui_server.client() as http:
            rows = http.get(
                "/v1/connect/intentions/exact", params={"source": web, "destination": api}
            )
            intention_id = rows.json()["ID"]
            assert rows.json()["Action"] == "allow"
        r = b.page.request.post(
            b.url(f"/ui/intentions/{intention_id}/delete"), headers={"X-CSRFToken": b.csrf()}
        )
        assert r.status == 403
        # And without the CSRF token, Django refuses it before any view runs.
        r = b.page.request.post(b.url(f"/ui/intentions/{intention_id}/delete"))
        assert r.status == 403
    finally:
        b.context.close()


def test_a_management_token_sees_write_controls(browser, ui_server):
    web, api = unique("web"), unique("api")
    register(ui_server, web)
    with ui_server.client() as http:
        http.put(
            "/v1/connect/intentions/exact",
            params={"source": web, "destination": api},
            json={"Action": "allow"},
        )
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/intentions?destination={api}")
    assert page.locator("[data-write]").count() >= 3


# --------------------------------------------------------------------------- escaping


def test_html_in_every_user_controlled_field_stays_text(browser, ui_server):
    name = unique("xss")
    evil = f"{name}<img src=x onerror=window.__xss=1>"
    sid = register(ui_server, name, tags=[XSS], meta={"note": XSS})
    ui_server.consul().agent.check.ttl_fail(f"service:{sid}", XSS)
    evil_id = register(ui_server, evil)
    ui_server.consul().agent.check.ttl_fail(f"service:{evil_id}", "down")
    with ui_server.client() as http:
        http.put(
            "/v1/connect/intentions/exact",
            params={"source": name, "destination": name + "-dst"},
            json={"Action": "deny", "Description": XSS},
        )
    ui_server.consul().kv.put(f"{name}/value", XSS)
    browser.sign_in(ui_server.token)
    pages = [
        "/ui/",
        f"/ui/services?q={name}",
        f"/ui/services/{name}",
        "/ui/services/" + quote(evil, safe=""),
        "/ui/intentions",
        f"/ui/topology?q={name}",
        f"/ui/kv?prefix={name}/",
        f"/ui/kv/edit?key={name}/value",
        "/ui/audit",
    ]
    for path in pages:
        page = browser.open(path)
        page.wait_for_timeout(200)  # scripts that render data (topology) have run
        assert page.evaluate("window.__xss === undefined"), path
        assert page.locator("main img[src=x]").count() == 0, path
    page = browser.open(f"/ui/services/{name}")
    assert XSS in page.locator("span.tag").first.text_content()
    assert XSS in page.locator("dl.meta").text_content()
    check = page.locator(f'tr[data-instance="{sid}"] [data-check="service:{sid}"] pre.output')
    assert XSS in check.text_content()
    page = browser.open(f"/ui/services?q={name}")
    assert evil in page.locator("main table").text_content()
    page = browser.open(f"/ui/topology?q={name}")
    page.wait_for_selector("#topology[data-drawn]", state="attached")
    assert page.locator(f'g.node[data-node="{evil}"]').count() == 1
