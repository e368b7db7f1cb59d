"""`/install.sh`, `/downloads/`, the wheel they serve, `/healthz` and `mesh install-script`.

The views run in-process on the test database (fast); `mesh install-script` runs
as a real subprocess against a real `mesh server`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from meshweb import health
from meshweb.install import script, service, wheel
from tests.support.servers import free_port, make_server
from tests.test_cli import ok, run_mesh

JOIN = "0123456789abcdef.S3cr3t-secret_value"
ACL = "6f1e1f1c-3f0a-4d5e-9c1b-2a7d3e4f5a6b"


@pytest.fixture
def ca(db):
    from registry.ca.manager import ensure_initialized
    from registry.domain import enrollment

    ensure_initialized()
    return enrollment.ca_pin()


@pytest.fixture
def data_dir(settings, tmp_path):
    settings.DATA_DIR = tmp_path
    wheel._current = None
    yield tmp_path
    wheel._current = None


def _values(text: str) -> dict[str, str]:
    """The values the server filled in (the first assignment of each name)."""
    found: dict[str, str] = {}
    for name, value in re.findall(r"^(MESH_[A-Z0-9_]+)='([^']*)'$", text, re.MULTILINE):
        found.setdefault(name, value)
    return found


# --------------------------------------------------------------------------- /install.sh


def test_the_script_names_this_control_plane_its_pin_and_the_token(client, ca, data_dir):
    r = client.get(f"/install.sh?token={JOIN}", HTTP_HOST="cp.example:8500")
    assert r.status_code == 200
    assert r["Content-Type"] == "text/x-shellscript; charset=utf-8"
    assert r["Cache-Control"] == "no-store"
    v = _values(r.content.decode())
    assert v["MESH_TOKEN_IN_SCRIPT"] == JOIN
    assert v["MESH_CA_PIN"] == ca
    assert v["MESH_CP_URL"] == "http://cp.example:8500"
    assert v["MESH_JOIN_ADDR"] == "127.0.0.1:8502"  # the listen address, as join-token create says
    current = wheel.current(data_dir)
    assert v["MESH_WHEEL"] == current.name
    assert v["MESH_WHEEL_SHA256"] == current.sha256
    assert "@@" not in r.content.decode()


def test_the_query_token_is_the_join_token_even_beside_an_acl_header(client, ca, data_dir):
    r = client.get(f"/install.sh?token={JOIN}", HTTP_X_CONSUL_TOKEN=ACL)
    text = r.content.decode()
    assert _values(text)["MESH_TOKEN_IN_SCRIPT"] == JOIN
    assert ACL not in text
    # Without ?token= the ACL header never becomes the script's token.
    text = client.get("/install.sh", HTTP_X_CONSUL_TOKEN=ACL).content.decode()
    assert _values(text)["MESH_TOKEN_IN_SCRIPT"] == ""
    assert ACL not in text


def test_the_advertised_agent_address_wins_over_the_listen_address(client, ca, data_dir, settings):
    settings.MESH_GRPC_ADDR = ("0.0.0.0", 8502)
    text = client.get(f"/install.sh?token={JOIN}", HTTP_HOST="cp.example:8500").content.decode()
    assert _values(text)["MESH_JOIN_ADDR"] == "cp.example:8502"  # the request's host
    settings.MESH_GRPC_ADVERTISE_ADDR = ("agents.example.com", 443)
    text = client.get(f"/install.sh?token={JOIN}", HTTP_HOST="cp.example:8500").content.decode()
    assert _values(text)["MESH_JOIN_ADDR"] == "agents.example.com:443"


def test_the_public_url_setting_wins_over_the_request(client, ca, data_dir, settings):
    settings.MESH_PUBLIC_URL = "https://mesh.example.com"
    text = client.get(f"/install.sh?token={JOIN}").content.decode()
    assert _values(text)["MESH_CP_URL"] == "https://mesh.example.com"
    assert service.install_command(base_url="http://10.0.0.2:8500/", token=JOIN) == (
        f"curl -fsS 'https://mesh.example.com/install.sh?token={JOIN}' | sh"
    )
    settings.MESH_PUBLIC_URL = ""
    assert service.install_command(base_url="http://10.0.0.2:8500/", token=JOIN) == (
        f"curl -fsS 'http://10.0.0.2:8500/install.sh?token={JOIN}' | sh"
    )
    with pytest.raises(script.ScriptError):
        service.install_command(base_url="http://10.0.0.2:8500/", token="x'; reboot")


@pytest.mark.parametrize(
    "bad",
    [
        "abc",  # no secret
        "0123456789abcdef.",  # empty secret
        "0123456789ABCDEF.secret",  # the id is lower-case hex
        "0123456789abcdef.sec'ret",
        "0123456789abcdef.$(reboot)",
        "0123456789abcdef.a b",
        "0123456789abcdef." + "a" * 129,
    ],
)
def test_a_malformed_token_is_a_400_whose_body_says_why(client, ca, data_dir, bad):
    r = client.get("/install.sh", {"token": bad})
    assert r.status_code == 400
    body = r.content.decode()
    assert "the join token is malformed" in body
    assert bad not in body  # never echoed into a script
    assert body.startswith("#!/bin/sh\n") and body.rstrip().endswith("exit 2")


@pytest.mark.parametrize(
    ("args", "edit", "message"),
    [
        (["--prefix", "relative/dir"], None, "--prefix: give an absolute path"),
        (["--prefix", "/tmp/a b"], None, "--prefix: a path without quotes"),
        (["--node", "a;b"], None, "--node: use letters, digits"),
        (["--bind", "10.0.0.1; reboot"], None, "--bind: an IP address"),
        (["--bogus"], None, "unknown option --bogus"),
        (["--token", "abc"], None, "the join token is malformed"),
        (["--token", "0123456789abcdef.x'y"], None, "the join token is malformed"),
        ([], ("sha256:", "sha1:"), "the CA pin in this script is malformed"),
        ([], ("sha256:", "sha256:zz"), "the CA pin in this script is malformed"),
    ],
)
def test_the_script_refuses_bad_arguments_before_doing_anything(
    client, ca, data_dir, tmp_path, args, edit, message
):
    text = client.get("/install.sh").content.decode()
    if edit:
        text = text.replace(f"MESH_CA_PIN='{edit[0]}", f"MESH_CA_PIN='{edit[1]}", 1)
    path = tmp_path / "install.sh"
    path.write_text(text)
    env = {"PATH": os.environ["PATH"], "MESH_JOIN_TOKEN": JOIN}
    out = subprocess.run(
        ["sh", str(path), *args], capture_output=True, text=True, env=env, timeout=30
    )
    assert out.returncode == 2, out.stderr
    assert f"meshweb install: error: {message}" in out.stderr
    assert "reachable" not in out.stderr  # stopped before any network call


def test_only_get_and_head_are_allowed(client, ca, data_dir):
    assert client.post(f"/install.sh?token={JOIN}").status_code == 405
    assert client.delete(f"/install.sh?token={JOIN}").status_code == 405
    head = client.head(f"/install.sh?token={JOIN}")
    assert head.status_code == 200 and head.content == b""


def test_without_the_agent_protocol_there_is_no_script(client, ca, data_dir, settings):
    settings.MESH_GRPC_ADDR = None
    r = client.get(f"/install.sh?token={JOIN}")
    assert r.status_code == 400
    assert "MESH_GRPC_ADDR" in r.content.decode()


def test_render_refuses_values_that_could_be_shell():
    w = wheel.Wheel(Path("/x"), "meshweb-0.1.0-py3-none-any.whl", "0.1.0", "0" * 64)
    good = dict(
        control_plane_url="http://cp:8500",
        join_address="cp:8502",
        ca_pin="sha256:" + "a" * 64,
        wheel=w,
    )
    assert "MESH_JOIN_ADDR='cp:8502'" in script.render(script.ScriptInputs(**good))
    for field, value in [
        ("control_plane_url", "http://cp:8500/'; reboot; '"),
        ("control_plane_url", "ftp://cp"),
        ("join_address", "cp:8502; reboot"),
        ("ca_pin", "sha256:zz"),
        ("token", "x.y'"),
    ]:
        with pytest.raises(script.ScriptError):
            script.render(script.ScriptInputs(**{**good, field: value}))


# --------------------------------------------------------------------------- the wheel


def test_the_wheel_is_reproducible_and_a_valid_wheel_of_the_running_code(tmp_path):
    a = wheel.build(tmp_path / "a")
    b = wheel.build(tmp_path / "b")
    assert a.name == b.name and a.sha256 == b.sha256  # every replica serves the same bytes
    assert a.sha256 == hashlib.sha256(a.path.read_bytes()).hexdigest()
    base = importlib.metadata.version("meshweb")
    assert re.fullmatch(re.escape(base) + r"\+g[0-9a-f]{12}", a.version)
    assert a.name == f"meshweb-{a.version}-py3-none-any.whl"
    info = f"meshweb-{a.version}.dist-info"
    with zipfile.ZipFile(a.path) as zf:
        names = set(zf.namelist())
        assert {"agents/agent.py", "meshweb/cli.py", "meshweb/install/install.sh"} <= names
        assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
        meta = zf.read(f"{info}/METADATA").decode()
        assert f"\nVersion: {a.version}\n" in meta
        assert "Requires-Dist: grpcio" in meta
        assert "mesh = meshweb.cli:main" in zf.read(f"{info}/entry_points.txt").decode()
        record = zf.read(f"{info}/RECORD").decode().splitlines()
        for line in record:
            name, digest, size = line.rsplit(",", 2)
            if name.endswith("RECORD"):
                continue
            data = zf.read(name)
            expect = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == "sha256=" + expect.decode() and int(size) == len(data)
        assert len(record) == len(names)


def test_downloads_serve_only_the_current_wheel(client, ca, data_dir):
    current = wheel.current(data_dir)
    r = client.get(f"/downloads/{current.name}")
    assert r.status_code == 200
    assert r["X-Checksum-Sha256"] == current.sha256
    assert hashlib.sha256(b"".join(r.streaming_content)).hexdigest() == current.sha256
    stale = data_dir / "downloads" / "meshweb-0.0.1+gdeadbeef0000-py3-none-any.whl"
    stale.write_bytes(b"old")
    wheel._current = None
    assert wheel.current(data_dir) == current  # rebuilt: same bytes, the old one gone
    assert not stale.exists()
    for other in ["meshweb-0.0.1-py3-none-any.whl", "secret-key", "mesh.sqlite3"]:
        r = client.get(f"/downloads/{other}")
        assert r.status_code == 404
        assert current.name in r.json()["error"]
    (data_dir / "secret-key").write_text("s3cr3t")
    r = client.get("/downloads/..%2Fsecret-key")
    assert r.status_code == 404 and b"s3cr3t" not in r.content


# --------------------------------------------------------------------------- health


def _call(path: str) -> tuple[int, dict]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    asyncio.run(health.handle({"type": "http", "path": path, "method": "GET"}, None, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def _fresh_db_pool() -> None:
    """Stop the server's database pool (its threads and their connections)."""
    import gc

    from registry import db

    if db._executor is not None:
        db._executor.shutdown(wait=True)
        db._executor = None
        gc.collect()


@pytest.mark.django_db(transaction=True)
def test_readiness_checks_the_database_and_names_a_failing_redis(settings):
    settings.REDIS_URL = ""
    assert _call("/healthz") == (
        200,
        {"status": "ok", "checks": {"database": "ok", "writer": "ok"}},
    )
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    status, body = _call("/healthz")
    assert status == 200 and body["status"] == "degraded"  # still serving: see meshweb.health
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"].startswith("error: ConnectionError")
    assert _call("/livez") == (200, {"status": "ok"})  # liveness never depends on them
    _fresh_db_pool()


@pytest.mark.django_db(transaction=True)
def test_readiness_fails_while_the_database_is_unreachable(settings):
    from django.db import connection

    settings.REDIS_URL = ""
    _fresh_db_pool()
    saved = dict(connection.settings_dict)
    if connection.vendor == "sqlite":
        connection.settings_dict["NAME"] = "/nonexistent/meshweb/mesh.sqlite3"
    else:
        connection.settings_dict.update(HOST="127.0.0.1", PORT=str(free_port()))
    try:
        status, body = _call("/healthz")
        assert status == 503 and body["status"] == "unavailable"
        assert body["checks"]["database"].startswith("error: OperationalError")
        assert _call("/livez")[0] == 200
    finally:
        _fresh_db_pool()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)
    assert _call("/healthz")[0] == 200  # back once the database answers
    _fresh_db_pool()


# --------------------------------------------------------------------------- mesh install-script


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = make_server(tmp_path_factory.mktemp("cp"), acl=True)
    yield s
    s.close()


@pytest.mark.slow
def test_mesh_install_script_creates_a_token_and_prints_the_one_liner(server):
    result = run_mesh(
        "install-script", "-service", "web", "-ttl", "5m", server=server, token=server.token
    )
    text = ok(result)
    v = _values(text)
    token = v["MESH_TOKEN_IN_SCRIPT"]
    assert script.TOKEN.match(token)
    assert f"curl -fsS '{server.url}/install.sh?token={token}' | sh" in result.stderr
    with server.client() as c:
        row = c.get(f"/api/join-tokens/{token.split('.')[0]}/").json()
    assert row["services"] == ["web"] and row["uses"] == 0 and row["state"] == "active"
    # The same script as GET /install.sh?token= gives.
    with server.client(token="") as c:
        assert c.get("/install.sh", params={"token": token}).text.rstrip("\n") == text.rstrip("\n")


@pytest.mark.slow
def test_mesh_install_script_with_a_token_writes_a_file_and_refuses_a_bad_token(server, tmp_path):
    out = tmp_path / "install.sh"
    ok(run_mesh("install-script", "-join-token", JOIN, "-o", str(out), server=server))
    assert _values(out.read_text())["MESH_TOKEN_IN_SCRIPT"] == JOIN
    assert oct(out.stat().st_mode & 0o777) == "0o700"
    bad = run_mesh("install-script", "-join-token", "nope", server=server)
    assert bad.returncode == 1
    assert "Error getting the install script: the join token is malformed" in bad.stderr
    refused = run_mesh("install-script", "-service", "web", server=server)  # no ACL token
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
