"""Services imported from a peer in the web UI: two real control planes peered
through `/v1/peering`; the importer's services list shows the peer's exported
services with their peer, filterable by source and peer, each linking to a page
of its instances as the importer sees them."""

from __future__ import annotations

import pytest

from tests.frontend.conftest import new_browser
from tests.peering.test_peering_control import _establish, _register, _token, wait_for
from tests.support.servers import make_server

pytestmark = pytest.mark.slow

PEER = "cluster-a"  # what the importer (B) calls the exporter (A)


@pytest.fixture(scope="module")
def peered(tmp_path_factory):
    """A exports `api` and `pay` to B; B (ACLs on) also runs its own `api`."""
    a = make_server(
        tmp_path_factory.mktemp("ui-peer-a"),
        redis=False,
        extra_env={"MESH_SECRET_KEY": "ui-peer-a-secret-key-for-tests", "MESH_DC": "dc-a"},
    )
    try:
        b = make_server(
            tmp_path_factory.mktemp("ui-peer-b"),
            acl=True,
            redis=False,
            extra_env={"MESH_SECRET_KEY": "ui-peer-b-secret-key-for-tests"},
        )
    except Exception:
        a.close()
        raise
    try:
        r = _establish(b, PEER, _token(a, "cluster-b"))
        assert r.status_code == 200, r.text
        _register(a, "a-node-1", "api-1", "passing", 9001)
        _register(a, "a-node-2", "pay-1", "passing", 9002, name="pay")
        with a.client() as c:
            ok = c.put(
                "/v1/config",
                json={
                    "Kind": "exported-services",
                    "Name": "default",
                    "Services": [
                        {"Name": "api", "Consumers": [{"Peer": "cluster-b"}]},
                        {"Name": "pay", "Consumers": [{"Peer": "cluster-b"}]},
                    ],
                },
            )
            assert ok.status_code == 200, ok.text
        _register(b, "b-node-1", "api-local", "passing", 9100)
        _register(b, "b-node-1", "books-1", "passing", 9101, name="books")

        def imported() -> bool:
            with b.client() as c:
                return len(c.get("/v1/catalog/services", params={"peer": PEER}).json()) == 2

        wait_for(imported, "api and pay imported on B")
        yield a, b
    finally:
        b.close()
        a.close()


def _rows(page) -> list[tuple[str, str]]:
    found = page.locator("tr[data-service]").evaluate_all(
        "rows => rows.map(r => [r.dataset.service, r.dataset.peer || ''])"
    )
    return [tuple(row) for row in found]


def test_imported_services_are_listed_with_their_peer_and_filter_by_source(
    playwright_browser, peered
):
    _a, b = peered
    browser = new_browser(playwright_browser, b)
    try:
        browser.sign_in(b.token)
        page = browser.open("/ui/services", screenshot="services-with-peers")
        rows = _rows(page)
        assert ("api", "") in rows and ("api", PEER) in rows and ("pay", PEER) in rows
        assert rows.index(("api", "")) + 1 == rows.index(("api", PEER))
        assert "peer: cluster-a" in page.locator(f'tr[data-peer="{PEER}"]').first.text_content()
        page = browser.open("/ui/services?source=peer")
        assert _rows(page) == [("api", PEER), ("pay", PEER)]
        page = browser.open("/ui/services?source=catalog")
        assert [peer for _name, peer in _rows(page)] == [""] * len(_rows(page))
        assert ("books", "") in _rows(page)
        page = browser.open(f"/ui/services?peer={PEER}&q=pa")
        assert _rows(page) == [("pay", PEER)]
        page = browser.open("/ui/services?source=peer&tag=v1&datacenter=dc-a")
        assert _rows(page) == [("api", PEER), ("pay", PEER)]
        page = browser.open("/ui/services?source=peer&tag=nope")
        assert _rows(page) == []
        page = browser.open("/ui/services?source=peer")
        page.select_option("select[name=source]", "agent")
        page.click("form.filters button[type=submit]")
        page.wait_for_url("**/ui/services?*source=agent*")
        assert all(peer == "" for _name, peer in _rows(page))

        # The imported service's page: its instances as B sees them.
        page = browser.open("/ui/services?source=peer")
        page.click(f'tr[data-service="api"][data-peer="{PEER}"] a')
        page.wait_for_url(f"**/ui/peers/{PEER}/services/api")
        page.wait_for_selector('tr[data-instance="api-1"]')
        row = page.locator('tr[data-instance="api-1"]')
        assert "a-node-1" in row.text_content() and "dc-a" in row.text_content()
        assert "passing" in row.locator(".health").first.text_content()
        page.screenshot(path=str(_out() / "service-from-peer.png"), full_page=True)
        browser.open(f"/ui/peers/{PEER}/services/books", status=404)
        browser.open("/ui/peers/nobody/services/api", status=404)
    finally:
        browser.context.close()


def test_a_token_sees_only_the_imported_services_it_may_read(playwright_browser, peered):
    _a, b = peered
    with b.client() as c:
        policy = c.put(
            "/v1/acl/policy",
            json={"Name": "pay-reader", "Rules": 'service "pay" { policy = "read" }'},
        ).json()
        secret = c.put("/v1/acl/token", json={"Policies": [{"ID": policy["ID"]}]}).json()[
            "SecretID"
        ]
    browser = new_browser(playwright_browser, b)
    try:
        browser.sign_in(secret)
        page = browser.open("/ui/services")
        assert _rows(page) == [("pay", PEER)]
        browser.open(f"/ui/peers/{PEER}/services/api", status=403)
    finally:
        browser.context.close()


def _out():
    from tests.frontend.conftest import output_dir

    return output_dir()
