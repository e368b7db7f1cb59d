"""Traffic editors in the browser: a 50/50 split saved through a diff preview with
compare-and-set, seen by `py-consul`; bad weights refused inline; a stale
editor told who changed the entry."""

from __future__ import annotations

import re
import uuid

import pytest

pytestmark = pytest.mark.slow


def http_service(server) -> str:
    name = f"api-{uuid.uuid4().hex[:6]}"
    with server.client() as http:
        r = http.put(
            "/v1/config", json={"Kind": "service-defaults", "Name": name, "Protocol": "http"}
        )
        assert r.status_code == 200, r.text
        for v in ("v1", "v2"):
            r = http.put(
                "/v1/config",
                json={"Kind": "service-defaults", "Name": f"{name}-{v}", "Protocol": "http"},
            )
            assert r.status_code == 200, r.text
    return name


def fill_splits(page, rows: list[tuple[str, str]]) -> None:
    for i, (weight, service) in enumerate(rows):
        page.fill(f'input[name="weight-{i}"]', weight)
        page.fill(f'input[name="service-{i}"]', service)


def test_a_50_50_split_is_previewed_as_a_diff_and_saved_for_py_consul(browser, ui_server):
    name = http_service(ui_server)
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/traffic/{name}/splitter", screenshot="traffic-splitter")
    fill_splits(page, [("50", f"{name}-v1"), ("40", f"{name}-v2")])
    # Checked as you type: 90 is not 100, so the preview cannot be asked for.
    assert "must be 100" in page.locator("[data-weight-total]").text_content()
    assert page.locator("button[data-needs-weights]").is_disabled()
    page.fill('input[name="weight-1"]', "50")
    assert page.locator("button[data-needs-weights]").is_enabled()
    page.click("button[data-needs-weights]")
    page.wait_for_selector("#preview")
    assert page.locator("#preview pre.diff .add").count() >= 2
    browser.page.screenshot(path=str(_out() / "traffic-diff.png"), full_page=True)
    page.click("#save")
    page.wait_for_url(re.compile(f".*/ui/traffic/{name}$"))
    entry = ui_server.consul().config.get("service-splitter", name)
    splits = entry["Splits"] if isinstance(entry, dict) else entry.Splits
    got = sorted((s["Weight"], s["Service"]) for s in splits)
    assert got == [(50, f"{name}-v1"), (50, f"{name}-v2")]
    browser.open(f"/ui/traffic/{name}", screenshot="traffic-service")


def test_weights_summing_to_99_are_refused_by_the_server_and_nothing_is_saved(browser, ui_server):
    name = http_service(ui_server)
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/traffic/{name}/splitter")
    csrf = browser.csrf()
    # A client that skips the page's check: the service layer refuses it.
    r = page.request.post(
        browser.url(f"/ui/traffic/{name}/splitter"),
        form={
            "step": "preview",
            "cas": "0",
            "rows": "2",
            "weight-0": "50",
            "service-0": f"{name}-v1",
            "weight-1": "49",
            "service-1": f"{name}-v2",
        },
        headers={"X-CSRFToken": csrf},
    )
    assert r.status == 400
    assert "100" in r.text()
    with ui_server.client() as http:
        assert http.get(f"/v1/config/service-splitter/{name}").status_code == 404


def test_a_stale_editor_is_told_who_changed_the_entry_and_overwrites_nothing(browser, ui_server):
    name = http_service(ui_server)
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/traffic/{name}/splitter")
    fill_splits(page, [("50", f"{name}-v1"), ("50", f"{name}-v2")])
    page.click("button[data-needs-weights]")
    page.wait_for_selector("#save")
    # Meanwhile someone else writes the splitter through the Consul API.
    with ui_server.client() as http:
        r = http.put(
            "/v1/config",
            json={
                "Kind": "service-splitter",
                "Name": name,
                "Splits": [{"Weight": 100, "Service": f"{name}-v2"}],
            },
        )
        assert r.status_code == 200
    page.click("#save")
    page.wait_for_selector("#stale")
    assert "Initial Management Token" in page.locator("#stale").text_content()
    entry = ui_server.consul().config.get("service-splitter", name)
    splits = entry["Splits"] if isinstance(entry, dict) else entry.Splits
    assert [(s["Weight"], s["Service"]) for s in splits] == [(100, f"{name}-v2")]


def _out():
    from tests.frontend.conftest import output_dir

    return output_dir()


def test_routes_are_edited_in_a_form_and_a_malformed_regex_is_refused_inline(browser, ui_server):
    name = http_service(ui_server)
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/traffic/{name}/router", screenshot="traffic-router")
    page.select_option('select[name="kind-0"]', "regex")
    page.fill('input[name="path-0"]', "/admin/([")
    page.fill('input[name="service-0"]', f"{name}-v2")
    page.click("button[data-needs-weights]")
    page.wait_for_selector("#entry-error")
    assert "PathRegex" in page.locator("#entry-error").text_content()
    assert page.locator('input[name="path-0"]').input_value() == "/admin/(["  # kept as typed
    page.select_option('select[name="kind-0"]', "prefix")
    page.fill('input[name="path-0"]', "/admin")
    page.fill('input[name="methods-0"]', "get, post")
    page.fill('input[name="timeout-0"]', "2s")
    page.fill('input[name="retries-0"]', "2")
    page.check('input[name="retry-connect-0"]')
    page.click("button[data-needs-weights]")
    page.wait_for_selector("#save")
    page.click("#save")
    page.wait_for_url(re.compile(f".*/ui/traffic/{name}$"))
    entry = ui_server.consul().config.get("service-router", name)
    routes = entry["Routes"] if isinstance(entry, dict) else entry.Routes
    assert routes == [
        {
            "Match": {"HTTP": {"PathPrefix": "/admin", "Methods": ["GET", "POST"]}},
            "Destination": {
                "Service": f"{name}-v2",
                "RequestTimeout": "2s",
                "NumRetries": 2,
                "RetryOnConnectFailure": True,
            },
        }
    ]
    # The form shows the saved routes again; a router it cannot show goes to JSON.
    page = browser.open(f"/ui/traffic/{name}/router")
    assert page.locator('input[name="path-0"]').input_value() == "/admin"
    with ui_server.client() as http:
        r = http.put(
            "/v1/config",
            json={
                "Kind": "service-router",
                "Name": name,
                "Routes": [
                    {
                        "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Present": True}]}},
                        "Destination": {"Service": f"{name}-v2"},
                    }
                ],
            },
        )
        assert r.status_code == 200, r.text
    page = browser.open(f"/ui/traffic/{name}/router")
    assert page.locator("#body").count() == 1 and "x-canary" in page.locator("#body").input_value()


def test_a_resolver_with_subsets_and_failover_is_edited_in_a_form(browser, ui_server):
    name = http_service(ui_server)
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/traffic/{name}/resolver", screenshot="traffic-resolver")
    page.fill('input[name="subset-name-0"]', "v1")
    page.fill('input[name="subset-filter-0"]', 'Service.Meta.version == "1"')
    page.fill('input[name="subset-name-1"]', "v2")
    page.fill('input[name="subset-filter-1"]', 'Service.Meta.version == "2"')
    page.check('input[name="subset-passing-1"]')
    page.fill("#r-default", "v1")
    page.fill("#r-timeout", "3s")
    page.fill("#r-failover", "dc2, dc3")
    page.click("button[data-needs-weights]")
    page.wait_for_selector("#save")
    page.click("#save")
    page.wait_for_url(re.compile(f".*/ui/traffic/{name}$"))
    entry = ui_server.consul().config.get("service-resolver", name)
    entry = entry if isinstance(entry, dict) else entry.__dict__
    assert entry["DefaultSubset"] == "v1"
    assert entry["Subsets"] == {
        "v1": {"Filter": 'Service.Meta.version == "1"'},
        "v2": {"Filter": 'Service.Meta.version == "2"', "OnlyPassing": True},
    }
    assert entry["Failover"] == {"*": {"Datacenters": ["dc2", "dc3"]}}
    # A default subset that is not defined is refused inline, nothing saved.
    page = browser.open(f"/ui/traffic/{name}/resolver")
    assert page.locator('input[name="subset-name-1"]').input_value() == "v2"
    page.fill("#r-default", "v9")
    page.click("button[data-needs-weights]")
    page.wait_for_selector("#entry-error")
    entry = ui_server.consul().config.get("service-resolver", name)
    entry = entry if isinstance(entry, dict) else entry.__dict__
    assert entry["DefaultSubset"] == "v1"
