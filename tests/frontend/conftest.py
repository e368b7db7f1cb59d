"""Browser tests of the web UI: Python Playwright driving Debian's Chromium.

The browser is `/usr/bin/chromium` (the `chromium` package), never a
downloaded one; without it these tests skip and say so (under CI they fail).
The tests share one `mesh server` with ACLs on (`ui_server`). Every page a test
opens is checked for console errors and CSP violations (`Browser.open`), and
the main pages are saved as PNG screenshots under the test run's output
folder: `$MESH_TEST_OUTPUT/ui/` (default `test-output/ui/` in the checkout).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.servers import ROOT, MeshServer, make_server

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 800}
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=1">'


def output_dir() -> Path:
    base = Path(os.environ.get("MESH_TEST_OUTPUT") or ROOT / "test-output")
    path = base / "ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def playwright_browser():
    # Module-scoped: Playwright's sync API keeps an event loop running on this
    # thread while it is started, and a test of another module run next on the
    # same worker (asyncio.run, an event loop of its own) would find it there.
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing: apt-get install -y chromium"
        if _ci():
            pytest.fail(reason)
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api")
    pw = sync_api.sync_playwright().start()
    browser = pw.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
    )
    yield browser
    browser.close()
    pw.stop()


@dataclass
class Browser:
    """One browser context (its own cookies) on one server, with the errors it saw."""

    server: MeshServer
    context: object
    page: object
    errors: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.server.url + path

    def open(self, path: str, *, screenshot: str = "", status: int = 200) -> object:
        """Go to `path` (answered with `status`), fail on console errors."""
        before = len(self.errors)
        response = self.page.goto(self.url(path))
        self.page.wait_for_load_state("load")
        assert response.status == status, f"{path}: {response.status}"
        if screenshot:
            self.page.screenshot(path=str(output_dir() / f"{screenshot}.png"), full_page=True)
        errors = self.errors[before:]
        if status != 200:  # the browser notes the page's own status as a console error
            errors = [e for e in errors if f"status of {status}" not in e]
        assert errors == [], f"console errors on {path}: {errors}"
        return self.page

    def sign_in(self, token: str) -> None:
        self.page.goto(self.url("/ui/login"))
        self.page.fill("#token", token)
        self.page.click("main button[type=submit]")
        self.page.wait_for_url(re.compile(r".*/ui/$"))

    def csrf(self) -> str:
        headers = self.page.get_attribute("body", "hx-headers")
        return re.search(r'"X-CSRFToken": "([^"]+)"', headers).group(1)

    def live(self) -> None:
        """Wait until the page's event stream is open."""
        self.page.wait_for_selector("#live-status[data-state=live]", timeout=15000)


# A small KV value limit, so a test can go over it without a megabyte of typing.
KV_LIMIT = 4096


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory) -> MeshServer:
    """One `mesh server` (ACLs on) for the browser tests; they use unique names."""
    srv = make_server(
        tmp_path_factory.mktemp("ui-server"),
        acl=True,
        extra_env={"MESH_KV_MAX_VALUE_SIZE": str(KV_LIMIT)},
    )
    yield srv
    srv.close()


def new_browser(playwright_browser, server: MeshServer) -> Browser:
    context = playwright_browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    b = Browser(server, context, page)
    page.on(
        "console",
        lambda m: b.errors.append(m.text) if m.type == "error" else None,
    )
    page.on("pageerror", lambda e: b.errors.append(f"page error: {e}"))
    return b


@pytest.fixture
def browser(playwright_browser, ui_server):
    b = new_browser(playwright_browser, ui_server)
    yield b
    b.context.close()
