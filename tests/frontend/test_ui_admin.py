"""KV, ACL, audit and security pages in the browser: values shown safely and saved
with compare-and-set, secrets shown once, every change in the audit log with its
diff, CA rotation confirmed and followed."""

from __future__ import annotations

import re
import uuid

import consul
import pytest

from tests.e2e.conftest import wait_for
from tests.frontend.conftest import KV_LIMIT, XSS, new_browser
from tests.frontend.test_ui_pages import read_only_token

pytestmark = pytest.mark.slow


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_kv_values_are_browsed_by_folder_and_shown_safely(browser, ui_server):
    folder = unique("app")
    c = ui_server.consul()
    c.kv.put(f"{folder}/colour", "blue")
    c.kv.put(f"{folder}/nested/deep", "x")
    c.kv.put(f"{folder}/html", XSS)
    c.kv.put(f"{folder}/blob", b"\x00\x01\xfe\xff")
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/kv?prefix={folder}/", screenshot="kv")
    keys = page.locator("tr[data-key]").evaluate_all("rows => rows.map(r => r.dataset.key)")
    assert keys == [f"{folder}/blob", f"{folder}/colour", f"{folder}/html", f"{folder}/nested/"]
    page = browser.open(f"/ui/kv/edit?key={folder}/html", screenshot="kv-edit")
    assert page.locator("#kv-value").input_value() == XSS
    assert page.evaluate("window.__xss === undefined")
    page = browser.open(f"/ui/kv/edit?key={folder}/blob")
    assert page.locator("#kv-hex").text_content().strip() == "00 01 fe ff"
    assert page.locator("#kv-value").count() == 0


def test_a_kv_save_uses_cas_and_a_stale_one_says_who_changed_the_key(browser, ui_server):
    key = unique("cfg") + "/limit"
    c = ui_server.consul()
    c.kv.put(key, "10")
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/kv/edit?key={key}")
    page.fill("#kv-value", "20")
    page.click("main form.stacked button[type=submit]")
    wait_for(lambda: c.kv.get(key)[1]["Value"] == b"20", timeout=15)
    page = browser.open(f"/ui/kv/edit?key={key}")
    page.fill("#kv-value", "30")
    c.kv.put(key, "25")  # someone else, meanwhile
    page.click("main form.stacked button[type=submit]")
    page.wait_for_selector("#stale")
    assert "Initial Management Token" in page.locator("#stale").text_content()
    assert c.kv.get(key)[1]["Value"] == b"25"


def test_a_kv_value_over_the_limit_is_refused_inline(browser, ui_server):
    key = unique("big")
    browser.sign_in(ui_server.token)
    page = browser.open("/ui/kv/edit?new=1&key=")
    page.fill("#kv-key", key)
    page.fill("#kv-value", "x" * (KV_LIMIT + 1))
    page.click("main form.stacked button[type=submit]")
    assert "too large" in page.locator("#kv-error").text_content()
    assert ui_server.consul().kv.get(key)[1] is None


def test_a_token_secret_is_shown_once_and_bad_rules_are_refused_inline(browser, ui_server):
    browser.sign_in(ui_server.token)
    page = browser.open("/ui/acl", screenshot="acl")
    name = unique("readers")
    page.fill("#p-name", name)
    page.fill("#p-rules", 'service_prefix "" { policy = "sideways" }')
    page.click("form:has(#p-name) button[type=submit]")
    page.wait_for_selector("#e-policy")
    page.fill("#p-rules", 'service_prefix "" { policy = "read" }')
    page.click("form:has(#p-name) button[type=submit]")
    page.wait_for_selector(f'tr[data-policy="{name}"]')
    page.fill("#t-description", "ci reader")
    page.check("input[name=policy] >> nth=-1")
    page.click("form:has(#t-description) button[type=submit]")
    secret = page.locator("#secret").text_content().strip()
    with ui_server.client(token=secret) as http:
        assert http.get("/v1/acl/token/self").json()["Description"] == "ci reader"
    page = browser.open("/ui/acl")
    assert secret not in page.content()


def test_roles_are_made_edited_linked_to_tokens_and_deleted_in_the_roles_tab(browser, ui_server):
    c = ui_server.consul()
    web, api = unique("web"), unique("api")
    policy = c.acl.policy.create(
        unique("kv"), rules={"key_prefix": {"roles/": {"policy": "write"}}}
    )
    browser.sign_in(ui_server.token)
    page = browser.open("/ui/acl/roles", screenshot="acl-roles")
    name = unique("deployers")
    page.fill("#r-name", name)
    page.fill("#r-services", "Not A Name")
    page.click("#role-form button[type=submit]")
    assert "invalid name" in page.locator("#e-r-services").text_content()
    assert c.acl.role.read_by_name(name) is None  # nothing saved
    page.fill("#r-services", f"{web}\n{api} dc9")
    page.fill("#r-description", XSS)
    page.check(f"#role-form input[name=policy][value='{policy['ID']}']")
    page.click("#role-form button[type=submit]")
    page.wait_for_selector(f'tr[data-role="{name}"]')
    assert XSS in page.locator(f'tr[data-role="{name}"]').text_content()
    assert page.evaluate("window.__xss === undefined")
    role = c.acl.role.read_by_name(name)
    assert role["ServiceIdentities"] == [
        {"ServiceName": web},
        {"ServiceName": api, "Datacenters": ["dc9"]},
    ]
    assert role["Policies"] == [{"ID": policy["ID"], "Name": policy["Name"]}]

    # A new token linking only the role: the role's service identity is its right.
    page = browser.open("/ui/acl")
    page.fill("#t-description", "role holder")
    page.check(f"input[name=role][value='{role['ID']}']")
    page.click("form:has(#t-description) button[type=submit]")
    secret = page.locator("#secret").text_content().strip()
    holder = ui_server.consul(token=secret)
    assert holder.agent.service.register(web, port=80) is True
    with pytest.raises(consul.ACLPermissionDenied):
        holder.agent.service.register(api, port=80)  # its identity is for dc9 only
    accessor = holder.acl.token.read_self()["AccessorID"]
    assert c.acl.token.read(accessor)["Roles"] == [{"ID": role["ID"], "Name": name}]

    # Edit the role: the token's rights follow at once.
    page = browser.open(f"/ui/acl/roles/{role['ID']}", screenshot="acl-role-edit")
    assert page.locator("#r-services").input_value() == f"{web}\n{api} dc9"
    page.fill("#r-services", api)
    page.click("#role-form button[type=submit]")
    page.wait_for_selector(f'tr[data-role="{name}"] [data-service-identity="{api}"]')
    assert holder.agent.service.register(api, port=80) is True

    # Edit the token: drop the role.
    page = browser.open(f"/ui/acl/tokens/{accessor}")
    assert page.locator(f"input[name=role][value='{role['ID']}']").is_checked()
    page.uncheck(f"input[name=role][value='{role['ID']}']")
    page.click("#token-form button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/acl$"))
    assert "Roles" not in c.acl.token.read(accessor)

    # Delete, confirmed.
    page = browser.open("/ui/acl/roles")
    page.once("dialog", lambda d: d.accept())
    page.click(f'tr[data-role="{name}"] button[type=submit]')
    page.wait_for_selector(f'tr[data-role="{name}"]', state="detached")
    assert c.acl.role.read(role["ID"]) is None


def test_the_audit_log_filters_and_shows_each_change_as_a_diff(browser, ui_server):
    key = unique("audited")
    browser.sign_in(ui_server.token)
    page = browser.open(f"/ui/kv/edit?new=1&key={key}")
    page.fill("#kv-value", "v1")
    page.click("main form.stacked button[type=submit]")
    page.wait_for_selector("text=Modify index")
    page = browser.open(f"/ui/audit?resource_type=kv&resource_id={key}", screenshot="audit")
    rows = page.locator("tr[data-audit]")
    assert rows.count() == 1
    assert "via ui" in rows.first.text_content()
    rows.first.locator("summary").click()
    assert rows.first.locator("pre.diff .add").count() >= 1
    page = browser.open("/ui/audit?since=yesterday", status=400)
    page.wait_for_selector(".field-error")


def test_rotating_the_ca_asks_for_confirmation_and_shows_the_new_active_root(browser, ui_server):
    browser.sign_in(ui_server.token)
    page = browser.open("/ui/security", screenshot="security")
    before = page.locator("tr[data-root]").count()
    page.once("dialog", lambda d: d.accept())
    page.check("input[name=confirm]")
    page.click("form[action='/ui/security/rotate'] button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/security$"))
    page.wait_for_function(f"document.querySelectorAll('tr[data-root]').length == {before + 1}")
    assert page.locator("tr[data-root] .health.passing").count() == 1
    assert page.locator("#rotation-progress").is_visible()


ADMIN_PAGES = [
    "/ui/kv",
    "/ui/acl",
    "/ui/acl/roles",
    "/ui/audit",
    "/ui/security",
    "/ui/nodes",
    "/ui/traffic",
]


def test_a_read_only_token_sees_no_write_control_on_the_admin_pages(playwright_browser, ui_server):
    c = ui_server.consul()
    c.kv.put("ro/key", "v")
    b = new_browser(playwright_browser, ui_server)
    try:
        b.sign_in(read_only_token(ui_server))
        for path in [*ADMIN_PAGES, "/ui/kv/edit?key=ro/key", "/ui/nodes/add"]:
            page = b.open(path)
            assert page.locator("[data-write]").count() == 0, path
        for path, form in [
            ("/ui/kv/edit", {"key": "ro/key", "value": "forged", "cas": "0"}),
            ("/ui/kv/delete", {"key": "ro/key"}),
            ("/ui/acl", {"what": "policy", "name": "forged", "rules": ""}),
            ("/ui/acl/roles", {"name": "forged", "services": "web"}),
            ("/ui/security/rotate", {"confirm": "rotate"}),
            ("/ui/nodes/add", {"ttl": "1h", "uses": "1"}),
        ]:
            r = b.page.request.post(b.url(path), form=form, headers={"X-CSRFToken": b.csrf()})
            assert r.status == 403, path
        assert c.kv.get("ro/key")[1]["Value"] == b"v"
        assert c.acl.role.read_by_name("forged") is None
    finally:
        b.context.close()
