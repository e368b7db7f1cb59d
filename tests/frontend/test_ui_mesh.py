"""The UI steering a real mesh: control plane, agents on two hosts (network
namespaces) and the demo web and api apps with their sidecars. Denying
web -> api in the intentions page makes web's calls fail and turns the
topology edge to denied; allowing again restores them."""

from __future__ import annotations

import re

import pytest

from tests.e2e import conftest as e2e
from tests.e2e.conftest import Caller, Cluster, wait_for
from tests.frontend.conftest import CHROMIUM, VIEWPORT, Browser

pytestmark = pytest.mark.slow

# The e2e suite's network namespaces (hosts A and B on a test-made bridge).
topology = e2e.topology


@pytest.fixture(scope="module")
def cluster(topology, tmp_path_factory):
    c = Cluster(topology, tmp_path_factory.mktemp("ui-cluster")).start()
    caller = Caller(c)
    try:
        wait_for(lambda: caller.call()[0], timeout=60, interval=0.2)
    except AssertionError:
        logs = c.logs()
        c.close()
        pytest.fail(f"web on A never reached api on B through the sidecars:\n{logs}")
    finally:
        caller.close()
    yield c
    c.close()


@pytest.fixture
def mesh_browser(playwright_browser, cluster):
    # The control plane listens on the test bridge's address, not loopback: tell
    # Chromium to treat that origin as secure so it keeps the Secure cookies.
    pw_browser = playwright_browser.browser_type.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            f"--unsafely-treat-insecure-origin-as-secure={cluster.server.url}",
        ],
    )
    context = pw_browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    b = Browser(cluster.server, context, page)
    page.on("console", lambda m: b.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: b.errors.append(f"page error: {e}"))
    yield b
    context.close()
    pw_browser.close()


def test_denying_web_to_api_in_the_ui_stops_the_calls_and_the_edge_turns_denied(
    cluster, mesh_browser
):
    caller = Caller(cluster)
    b = mesh_browser
    try:
        assert caller.call()[0]
        b.sign_in(cluster.server.token)
        page = b.open("/ui/", screenshot="mesh-overview")
        for name in ("web", "api"):
            assert page.locator(f'a[data-service="{name}"]').get_attribute("data-health") == (
                "passing"
            )
        page = b.open("/ui/topology", screenshot="mesh-topology-allowed")
        page.wait_for_selector('g.edge[data-edge="web->api"]', state="attached")
        assert page.locator('g.edge[data-edge="web->api"]').get_attribute("data-decision") == (
            "allow"
        )
        # Edit the intention web -> api to deny, in the intentions page.
        page = b.open("/ui/intentions?destination=api")
        page.locator('tr[data-intention="web=>api"] a:has-text("edit")').click()
        page.select_option("#f-action", "deny")
        page.click("main button[type=submit]")
        page.wait_for_url(re.compile(r".*/ui/intentions\?destination=api$"))
        took = wait_for(lambda: not caller.call()[0], timeout=15, interval=0.05)
        print(f"\n[ui] web -> api denied in the UI: calls failing after {took:.2f} s")
        page = b.open("/ui/topology", screenshot="mesh-topology-denied")
        b.live()
        page.wait_for_selector('g.edge[data-edge="web->api"][data-decision=deny]', state="attached")
        # Allowed again (through the Consul API): the open page follows, live.
        page.evaluate("window.__notReloaded = true")
        cluster.allow()
        page.wait_for_selector(
            'g.edge[data-edge="web->api"][data-decision=allow]', state="attached", timeout=20000
        )
        assert page.evaluate("window.__notReloaded") is True
        wait_for(lambda: caller.call()[0], timeout=15, interval=0.05)
        page = b.open("/ui/services/api", screenshot="mesh-service")
        assert page.locator("tr[data-instance]").count() == 2  # api-1 and api-2
        assert page.locator("pre.config").count() == 1  # the effective proxy config
    finally:
        caller.close()


def test_the_service_page_charts_golden_metrics_from_real_traffic(cluster, mesh_browser):
    with cluster.cp() as c:
        for name in ("web", "api"):
            r = c.put(
                "/v1/config", json={"Kind": "service-defaults", "Name": name, "Protocol": "http"}
            )
            assert r.status_code == 200, r.text
    caller = Caller(cluster)
    b = mesh_browser
    try:
        # Calls through the sidecars (now on their HTTP path) until the agents have
        # reported some (every 10 s by default) and the control plane shows them.
        b.sign_in(cluster.server.token)

        def reported() -> bool:
            for _ in range(10):
                caller.call()
            with cluster.cp() as c:
                r = c.get("/api/metrics/services/api")
            return r.status_code == 200 and bool(r.json()["windows"]["1m"]["requests"])

        wait_for(reported, timeout=90, interval=0.5)
        page = b.open("/ui/services/api")
        page.wait_for_selector(".chart[data-state=data]", state="attached", timeout=20000)
        row = page.locator('.chart table.metrics tr[data-window="1m"]')
        assert row.is_visible()
        assert float(row.locator("td").nth(1).text_content()) > 0  # requests per second
        assert page.locator(".chart .plot").count() == 3
        page.screenshot(path=str(_out() / "mesh-service-metrics.png"), full_page=True)
        page = b.open("/ui/topology")
        page.wait_for_selector('g.edge[data-edge="web->api"] text', state="attached", timeout=20000)
        assert "rps" in page.locator('g.edge[data-edge="web->api"] text').text_content()
        page.screenshot(path=str(_out() / "mesh-topology-metrics.png"), full_page=True)
    finally:
        caller.close()


def _out():
    from tests.frontend.conftest import output_dir

    return output_dir()
