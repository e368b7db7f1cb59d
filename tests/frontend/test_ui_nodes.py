"""Nodes in the browser: "Add a host" makes a join token and shows the command; the
command, run as shown (with this test's directories and ports), joins a real
agent, which appears in the open nodes list without a reload."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid

import pytest

from tests.support.servers import ROOT, die_with_parent, free_port

pytestmark = pytest.mark.slow


def test_add_a_host_shows_a_command_that_joins_an_agent(browser, ui_server, tmp_path):
    node = f"host-{uuid.uuid4().hex[:6]}"
    browser.sign_in(ui_server.token)
    page = browser.open("/ui/nodes/add", screenshot="add-host")
    page.fill("#h-node", node)
    page.fill("#h-description", "<b>new host</b>")
    page.click("main button[type=submit]")
    command = page.locator("#agent-command").text_content().strip()
    browser.page.screenshot(path=str(_out() / "add-host-command.png"), full_page=True)
    argv = shlex.split(command)
    assert argv[:2] == ["mesh", "agent"] and "-join-token" in argv and "-ca-pin" in argv
    # The token is shown once: the join tokens list shows its ID, never its secret.
    token = argv[argv.index("-join-token") + 1]
    listing = browser.open("/ui/nodes/join-tokens", screenshot="join-tokens")
    assert token.split(".")[0] in listing.locator("main").text_content()
    assert token not in listing.content()
    assert "&lt;b&gt;new host&lt;/b&gt;" in listing.content()

    nodes = browser.open("/ui/nodes", screenshot="nodes")
    browser.live()
    nodes.evaluate("window.__notReloaded = true")
    # Run the command as shown; only where it writes and listens is this test's.
    argv = [sys.executable, "-m", "meshweb.cli", *argv[1:]]
    argv[argv.index("-data-dir") + 1] = str(tmp_path / "data")
    argv[argv.index("-config-dir") + 1] = str(tmp_path / "config")
    (tmp_path / "config").mkdir()
    argv += [
        "-node",
        node,
        "-bind",
        "127.0.0.1",
        "-http-addr",
        f"127.0.0.1:{free_port()}",
        "-metrics-addr",
        f"127.0.0.1:{free_port()}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))}
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(),
    )
    try:
        nodes.wait_for_selector(f'tr[data-node="{node}"]', timeout=60000)
        assert nodes.evaluate("window.__notReloaded") is True
        assert "agent" in nodes.locator(f'tr[data-node="{node}"]').text_content()
        detail = browser.open(f"/ui/nodes/{node}", screenshot="node")
        assert "token " + token.split(".")[0] in detail.locator("main").text_content()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_a_join_token_is_revoked_after_confirmation(browser, ui_server):
    browser.sign_in(ui_server.token)
    page = browser.open("/ui/nodes/add")
    page.fill("#h-description", "to revoke")
    page.click("main button[type=submit]")
    token_id = page.locator("#agent-command").text_content().split("-join-token ")[1].split(".")[0]
    page = browser.open("/ui/nodes/join-tokens")
    row = page.locator(f'tr[data-join-token="{token_id}"]')
    page.once("dialog", lambda d: d.dismiss())  # cancelled: nothing happens
    row.locator("button").click()
    assert row.locator("[data-state]").get_attribute("data-state") == "active"
    page.once("dialog", lambda d: d.accept())
    row.locator("button").click()
    page.wait_for_selector(f'tr[data-join-token="{token_id}"] [data-state=revoked]')


def test_a_bad_duration_is_refused_next_to_its_field(browser, ui_server):
    browser.sign_in(ui_server.token)
    page = browser.open("/ui/nodes/add")
    page.fill("#h-ttl", "ten minutes")
    page.click("main button[type=submit]")
    page.wait_for_selector("#e-ttl")
    assert page.locator("#agent-command").count() == 0


def _out():
    from tests.frontend.conftest import output_dir

    return output_dir()
