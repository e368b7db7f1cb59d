"""The agent install script, run as root inside fresh network namespaces.

A control plane (`mesh server`, ACLs on) listens on the test bridge; the
script is fetched from it (`GET /install.sh?token=...`) and run in host A's
namespace with a temporary prefix: it checks the CA pin, downloads the wheel
from `/downloads/`, installs it into a virtual environment, writes the config
and prints the start command; the agent started with that command joins and
registers its service (read back through py-consul). Re-running is safe,
`--uninstall` removes everything. In host B's namespace the script refuses to
run without a token, with a tampered CA pin (before the token is ever sent:
the token stays unused and the control plane never saw it) and against an
unreachable control plane, each with a message saying which.

Test path vs production path: the wheel is the one the control plane serves
and is installed by pip exactly as in production, but the namespaces have no
internet: meshweb's third-party dependencies are taken from this test's own
environment (a directory of links to its site-packages on PYTHONPATH, and
`MESH_PIP_ARGS="--no-index --no-deps"`), where a real host's pip resolves them
from PyPI (or the index / wheelhouse named in MESH_PIP_ARGS).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import consul
import pytest

from tests.e2e.conftest import NsProcess, start_server, wait_for
from tests.e2e.conftest import topology as topology  # noqa: F401  (the fixture)
from tests.support.servers import die_with_parent, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
_OWN = ("meshweb", "__editable__", "pip", "setuptools", "_distutils_hack", "distutils-precedence")


@pytest.fixture(scope="module")
def server(topology, tmp_path_factory):  # noqa: F811
    s = start_server(topology, tmp_path_factory.mktemp("cp"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def deps(tmp_path_factory) -> Path:
    """This environment's third-party packages (not meshweb, not pip), as links."""
    d = tmp_path_factory.mktemp("deps")
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if entry.name.startswith(_OWN) or entry.suffix == ".pth":
            continue
        (d / entry.name).symlink_to(entry)
    return d


def script_env(deps: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))}
    env.pop("PYTHONPATH", None)
    env.update(
        {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "MESH_PYTHON": sys._base_executable,  # the interpreter the deps were built for
            "MESH_PIP_ARGS": "--no-index --no-deps",
            "PYTHONPATH": str(deps),
            "PIP_NO_INPUT": "1",
        }
    )
    env.update(extra)
    return env


def run_script(host, script: Path, *args: str, env: dict[str, str], timeout: float = 240):
    return subprocess.run(
        host.argv("sh", str(script), *args),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd="/",
    )


def new_token(server, **body) -> tuple[str, str, str]:
    """(token, its id, the CA pin)."""
    body = {"uses": 1, "ttl": "10m", "services": ["web"], **body}
    with server.client() as c:
        r = c.post("/api/join-tokens/", json=body)
    assert r.status_code == 201, r.text
    return r.json()["token"], r.json()["id"], r.json()["ca_pin"]


def token_row(server, token_id: str) -> dict:
    with server.client() as c:
        r = c.get(f"/api/join-tokens/{token_id}/")
    assert r.status_code == 200, r.text
    return r.json()


def fetch_script(server, dest: Path, token: str | None) -> str:
    with server.client(token="") as c:  # no ACL token: the join token is the credential
        r = c.get("/install.sh", params={"token": token} if token else None)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/x-shellscript")
    assert r.headers["cache-control"] == "no-store"
    dest.write_text(r.text)
    return r.text


def web_nodes(server) -> list[tuple[str, str, int]]:
    c = consul.Consul(host=server.host, port=server.http_port, token=server.token)
    _index, entries = c.catalog.service("web")
    return sorted((e["Node"], e["Address"], e["ServicePort"]) for e in entries)


# --------------------------------------------------------------------------- install, join, re-run, uninstall


def test_the_script_installs_an_agent_that_joins_and_registers_its_service(
    topology,  # noqa: F811
    server,
    deps,
    tmp_path,
):
    host = topology.hosts["A"]
    token, token_id, pin = new_token(server, node="host-a")
    script = tmp_path / "install.sh"
    text = fetch_script(server, script, token)
    assert f"MESH_CA_PIN='{pin}'" in text
    assert f"MESH_JOIN_ADDR='{topology.gateway}:{server.grpc_port}'" in text
    prefix = tmp_path / "root"
    env = script_env(deps)

    first = run_script(
        host, script, "--prefix", str(prefix), "--node", "host-a", "--bind", host.address, env=env
    )
    assert first.returncode == 0, first.stderr
    assert "presented the pinned CA" in first.stderr
    start = _start_command(first.stdout)
    assert start == str(prefix / "opt/meshweb/bin/meshweb-agent")
    conf = prefix / "etc/meshweb/agent.env"
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    values = dict(re.findall(r"^(MESH_\w+)='([^']*)'$", conf.read_text(), re.MULTILINE))
    assert values["MESH_JOIN_TOKEN"] == token
    assert values["MESH_CA_PIN"] == pin
    assert values["MESH_CONTROL_PLANE"] == server.url
    # The venv runs the wheel's code, not this checkout's.
    venv_python = prefix / "opt/meshweb/venv/bin/python"
    where = subprocess.run(
        [
            str(venv_python),
            "-c",
            "import agents, meshweb; print(agents.__file__, meshweb.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert all(p.startswith(str(prefix / "opt/meshweb/venv/lib")) for p in where.stdout.split())
    # Packed again from the installed copy (as a control plane installed from a wheel,
    # the container image, does), the wheel is byte for byte the one served.
    rebuilt = subprocess.run(
        [
            str(venv_python),
            "-c",
            "import pathlib, sys; from meshweb.install import wheel; "
            "w = wheel.build(pathlib.Path(sys.argv[1])); print(w.name, w.sha256)",
            str(tmp_path / "rebuilt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=60,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    served = re.search(r"^MESH_WHEEL='(.+)'$", text, re.MULTILINE).group(1)
    digest = re.search(r"^MESH_WHEEL_SHA256='(.+)'$", text, re.MULTILINE).group(1)
    assert rebuilt.stdout.split() == [served, digest]
    assert token_row(server, token_id)["uses"] == 0  # installing never sent it
    # The systemd unit it installs where systemd runs, checked by systemd itself.
    unit = run_script(host, script, "--print-unit", "--prefix", str(prefix), env=env)
    assert unit.returncode == 0, unit.stderr
    assert f"ExecStart={start}\n" in unit.stdout
    if shutil.which("systemd-analyze"):
        unit_file = tmp_path / "meshweb-agent.service"
        unit_file.write_text(unit.stdout)
        verified = subprocess.run(
            ["systemd-analyze", "verify", str(unit_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr

    services = prefix / "etc/meshweb/services.d"
    (services / "web.json").write_text(json.dumps({"service": {"name": "web", "port": 9090}}))
    agent = NsProcess(host, "host-a", [start], tmp_path / "agent.log")
    try:
        _start_with(agent, env)
        try:
            wait_for(lambda: web_nodes(server) == [("host-a", host.address, 9090)], timeout=60)
        except AssertionError:
            pytest.fail(f"the agent never registered web:\n{agent.log()}\n{server.log()}")
        row = token_row(server, token_id)
        assert row["uses"] == 1 and row["last_used_by"] == "host-a"
        # The agent's children (sidecars, check scripts) never inherit the token.
        assert token not in Path(f"/proc/{_pid(prefix)}/environ").read_text(errors="replace")

        # Re-running is safe: same config, no second join (the identity is kept).
        again = run_script(
            host,
            script,
            "--prefix",
            str(prefix),
            "--node",
            "host-a",
            "--bind",
            host.address,
            env=env,
        )
        assert again.returncode == 0, again.stderr
        agent.stop()
        _start_with(agent, env)
        wait_for(lambda: _pid_alive(prefix), timeout=30)
        assert "-join-token" not in Path(f"/proc/{_pid(prefix)}/cmdline").read_text()
        wait_for(lambda: web_nodes(server) == [("host-a", host.address, 9090)], timeout=30)
        assert token_row(server, token_id)["uses"] == 1

        # --uninstall stops the agent and removes what the script made.
        gone = run_script(host, script, "--uninstall", "--prefix", str(prefix), env=env)
        assert gone.returncode == 0, gone.stderr
        wait_for(lambda: not agent.alive(), timeout=30)
        assert not (prefix / "opt/meshweb").exists()
        assert not conf.exists()
        assert not (prefix / "var/lib/meshweb/agent").exists()
        assert (services / "web.json").exists()  # the operator's definitions stay
    finally:
        agent.stop()
    assert token.split(".", 1)[1] not in server.log()


def _start_command(stdout: str) -> str:
    lines = stdout.splitlines()
    assert "Start the agent with:" in lines, stdout
    return lines[lines.index("Start the agent with:") + 1].strip()


def _start_with(agent: NsProcess, env: dict[str, str]) -> None:
    with open(agent.log_path, "ab") as log:
        agent.proc = subprocess.Popen(
            agent.host.argv(*agent.argv),
            cwd="/",
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )


def _pid(prefix: Path) -> int:
    return int((prefix / "var/lib/meshweb/agent/agent.pid").read_text())


def _pid_alive(prefix: Path) -> bool:
    try:
        return Path(f"/proc/{_pid(prefix)}").exists()
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- refusals


def test_a_tampered_pin_stops_the_script_before_the_token_is_sent(
    topology,  # noqa: F811
    server,
    deps,
    tmp_path,
):
    host = topology.hosts["B"]
    token, token_id, _pin = new_token(server)
    script = tmp_path / "install.sh"
    # Fetched without the token, which goes only on the command line: the control
    # plane can never have seen it, over HTTP or over the agent protocol.
    text = fetch_script(server, script, None)
    pin = re.search(r"^MESH_CA_PIN='sha256:([0-9a-f]{64})'$", text, re.MULTILINE).group(1)
    tampered = pin[:-1] + ("0" if pin[-1] != "0" else "1")
    script.write_text(text.replace(pin, tampered))
    prefix = tmp_path / "root"
    out = run_script(host, script, "--token", token, "--prefix", str(prefix), env=script_env(deps))
    assert out.returncode == 5, out.stderr
    assert f"no certificate matching the CA pin sha256:{tampered}" in out.stderr
    assert "refusing to send the join token" in out.stderr
    assert f"sha256:{pin}" in out.stderr  # what the control plane did present
    assert not prefix.exists()  # nothing downloaded, installed or written
    row = token_row(server, token_id)
    assert row["uses"] == 0 and row["state"] == "active"
    assert token.split(".", 1)[1] not in server.log()
    assert token_id not in server.log()  # no join was even attempted


def test_without_a_token_the_script_refuses_and_says_so(topology, server, deps, tmp_path):  # noqa: F811
    script = tmp_path / "install.sh"
    fetch_script(server, script, None)
    out = run_script(
        topology.hosts["B"], script, "--prefix", str(tmp_path / "p"), env=script_env(deps)
    )
    assert out.returncode == 2
    assert "error: no join token" in out.stderr
    assert not (tmp_path / "p").exists()


def test_against_an_unreachable_control_plane_the_script_refuses_and_says_so(
    topology,  # noqa: F811
    server,
    deps,
    tmp_path,
):
    token, token_id, _pin = new_token(server)
    script = tmp_path / "install.sh"
    text = fetch_script(server, script, token)
    closed = f"http://{topology.gateway}:{free_port()}"
    script.write_text(text.replace(f"MESH_CP_URL='{server.url}'", f"MESH_CP_URL='{closed}'"))
    out = run_script(
        topology.hosts["B"], script, "--prefix", str(tmp_path / "p"), env=script_env(deps)
    )
    assert out.returncode == 4, out.stderr
    assert f"cannot reach the control plane at {closed}/healthz" in out.stderr
    assert "refused" in out.stderr.lower()
    assert not (tmp_path / "p").exists()
    assert token_row(server, token_id)["uses"] == 0


def test_with_the_agent_port_unreachable_the_script_refuses_before_sending_the_token(
    topology,  # noqa: F811
    server,
    deps,
    tmp_path,
):
    token, token_id, _pin = new_token(server)
    script = tmp_path / "install.sh"
    text = fetch_script(server, script, token)
    closed = f"{topology.gateway}:{free_port()}"
    joined = f"MESH_JOIN_ADDR='{topology.gateway}:{server.grpc_port}'"
    script.write_text(text.replace(joined, f"MESH_JOIN_ADDR='{closed}'"))
    out = run_script(
        topology.hosts["B"], script, "--prefix", str(tmp_path / "p"), env=script_env(deps)
    )
    assert out.returncode == 4, out.stderr
    assert f"cannot reach the control plane agent port {closed}" in out.stderr
    assert not (tmp_path / "p").exists()
    assert token_row(server, token_id)["uses"] == 0


def test_a_malformed_token_is_refused_with_a_script_saying_why(server):
    with server.client(token="") as c:
        r = c.get("/install.sh", params={"token": "abc'; rm -rf /; '"})
    assert r.status_code == 400
    assert "rm -rf" not in r.text
    out = subprocess.run(["sh"], input=r.text, capture_output=True, text=True, timeout=10)
    assert out.returncode == 2
    assert "the join token is malformed" in out.stderr
