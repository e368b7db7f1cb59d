"""`mesh dev` as a user runs it (`make run`): everything up, web reaches api through the
sidecars, and Ctrl-C leaves no process behind. On free loopback ports, its own data dir."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from meshweb.dev import READY_LINE
from tests.support.files import json_lines
from tests.support.servers import ROOT, die_with_parent, free_port

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, grandchildren: the sidecars), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class DevProcess:
    """`mesh dev` on free ports; its output lines are read by a thread."""

    def __init__(self, data_dir: Path) -> None:
        self.ports = {
            name: free_port()
            for name in (
                "http",
                "grpc",
                "dns",
                "agent_http",
                "agent_metrics",
                "web",
                "api",
                "upstream",
                "web_sidecar",
                "api_sidecar",
                "api_v2",
                "api_v2_sidecar",
            )
        }
        p = self.ports
        self.argv = [
            sys.executable,
            "-m",
            "meshweb.cli",
            "dev",
            "--data-dir",
            str(data_dir),
            "--http-addr",
            f"127.0.0.1:{p['http']}",
            "--grpc-addr",
            f"127.0.0.1:{p['grpc']}",
            "--dns-addr",
            f"127.0.0.1:{p['dns']}",
            "--agent-http-addr",
            f"127.0.0.1:{p['agent_http']}",
            "--agent-metrics-addr",
            f"127.0.0.1:{p['agent_metrics']}",
            "--web-port",
            str(p["web"]),
            "--api-port",
            str(p["api"]),
            "--upstream-port",
            str(p["upstream"]),
            "--web-sidecar-port",
            str(p["web_sidecar"]),
            "--api-sidecar-port",
            str(p["api_sidecar"]),
            "--api-v2-port",
            str(p["api_v2"]),
            "--api-v2-sidecar-port",
            str(p["api_v2_sidecar"]),
        ]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MESH_", "CONSUL_", "DATABASE_URL", "REDIS_URL"))
        }
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=die_with_parent(),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if text in line:
                return line
        raise AssertionError(f"no {text!r} from mesh dev:\n{''.join(self.output)[-6000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def dev(tmp_path):
    d = DevProcess(tmp_path / "data")
    yield d
    # On a failure mid-test: take everything down (what Ctrl-C would have done).
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGINT)
        try:
            d.proc.wait(60)
        except subprocess.TimeoutExpired:
            d.close()


def test_mesh_dev_serves_web_calling_api_through_the_sidecars_and_ctrl_c_stops_everything(dev):
    dev.wait_for(READY_LINE, timeout=120)
    text = "".join(dev.output)
    web = dev.ports["web"]
    assert f"curl http://127.0.0.1:{web}/" in text
    assert "mesh intention create -replace -deny web api" in text
    assert "MESH_HTTP_TOKEN=" in text

    r = httpx.get(f"http://127.0.0.1:{web}/", timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["service"] == "web"
    assert body["upstream"]["service"] == "api"
    assert body["upstream"]["instance"] in ("api-v1", "api-v2")

    # api's sidecar speaks only mTLS: a plaintext request to it gets no HTTP answer.
    with socket.create_connection(("127.0.0.1", dev.ports["api_sidecar"]), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        s.settimeout(5)
        try:
            data = s.recv(200)
        except (ConnectionResetError, TimeoutError):
            data = b""
    assert not data.startswith(b"HTTP/")

    _the_demo_shows_golden_metrics_top_and_access_logs(dev, text)

    children = _descendants(dev.proc.pid)
    # server, agent, web, api v1 and v2, the traffic and the three sidecars (at least).
    assert len(children) >= 9, children
    names = {
        pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        for pid in children
        if _running(pid)
    }
    assert sum("mesh-sidecar" in cmd for cmd in names.values()) == 3, names

    dev.proc.send_signal(signal.SIGINT)
    assert dev.proc.wait(60) == 0, "".join(dev.output)[-4000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(p) for p in children):
        time.sleep(0.1)
    left = {p: names.get(p) for p in children if _running(p)}
    assert left == {}, f"still running after Ctrl-C: {left}"
    assert "mesh dev: stopped" in "".join(dev.output)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{web}/", timeout=2)


def _the_demo_shows_golden_metrics_top_and_access_logs(dev: DevProcess, banner: str) -> None:
    """Generated traffic, the 90/10 split and the agent's reports: what a first run shows."""
    token = banner.split("MESH_HTTP_TOKEN=", 1)[1].split()[0]
    http = f"127.0.0.1:{dev.ports['http']}"
    headers = {"X-Consul-Token": token}

    def service() -> dict | None:
        r = httpx.get(f"http://{http}/api/metrics/services/api", headers=headers, timeout=10)
        return (
            r.json()
            if r.status_code == 200 and r.json()["windows"]["1m"]["requests"] >= 20
            else None
        )

    deadline = time.monotonic() + 90
    got = None
    while got is None and time.monotonic() < deadline:
        got = service()
        time.sleep(1)
    assert got is not None, "".join(dev.output)[-3000:]
    one = got["windows"]["1m"]
    assert one["rps"] > 0 and one["latency_ms"]["p50"] is not None
    assert [s["source"] for s in got["sources"]] == ["web"]
    edges = httpx.get(f"http://{http}/api/metrics/edges", headers=headers, timeout=10).json()
    assert [(e["source"], e["destination"]) for e in edges["edges"]] == [("web", "api")]
    env = {**os.environ, "MESH_HTTP_TOKEN": token, "MESH_HTTP_ADDR": http}
    top = subprocess.run(
        [sys.executable, "-m", "meshweb.cli", "top", "-once"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert top.returncode == 0, top.stderr
    assert any(line.split()[:1] == ["api"] for line in top.stdout.splitlines()), top.stdout
    logs = Path(banner.split("access log: ", 1)[1].split("/<proxy-id>", 1)[0])
    lines = {
        name: json_lines(logs / f"{name}-sidecar-proxy.log") for name in ("web", "api-v1", "api-v2")
    }
    assert lines["web"] and all(e["destination"] == "api" for e in lines["web"])
    clusters = {e["cluster"] for e in lines["web"]}
    assert clusters <= {"v1.api.default.dc1", "v2.api.default.dc1"}
    # The split: v1 takes most of the calls (v2's 10 % plus its retries).
    assert len(lines["api-v1"]) > len(lines["api-v2"])


def test_mesh_dev_refuses_to_start_on_a_taken_port_and_starts_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "meshweb.cli",
                "dev",
                "--data-dir",
                str(tmp_path / "data"),
                "--http-addr",
                f"127.0.0.1:{port}",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    assert f"--http-addr 127.0.0.1:{port}" in out.stderr
    assert "already in use" in out.stderr
    assert not (tmp_path / "data" / "dev").exists()


def test_the_demo_services_answer_json_and_api_health_follows_its_fail_file(tmp_path):
    """`mesh demo-app`: api's identity and /healthz; web's 502 when its upstream is down."""
    api_port, web_port, dead_port = free_port(), free_port(), free_port()
    fail = tmp_path / "fail"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "agents.demo", "api", "--port", str(api_port), "--name", "a1"]
            + ["--fail-file", str(fail)],
            cwd=ROOT,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "agents.demo", "web", "--port", str(web_port)]
            + ["--upstream", f"127.0.0.1:{dead_port}"],
            cwd=ROOT,
        ),
    ]
    try:

        def get(port: int, path: str = "/") -> httpx.Response:
            deadline = time.monotonic() + 20
            while True:
                try:
                    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
                except httpx.ConnectError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

        body = get(api_port).json()
        assert (body["service"], body["instance"]) == ("api", "a1")
        assert body["host"] == socket.gethostname() and body["time"].endswith("Z")
        assert get(api_port, "/healthz").status_code == 200
        fail.touch()
        assert get(api_port, "/healthz").status_code == 500
        fail.unlink()
        assert get(api_port, "/healthz").status_code == 200
        r = get(web_port)
        assert r.status_code == 502
        assert r.json()["service"] == "web" and f"127.0.0.1:{dead_port}" in r.json()["error"]
        assert json.loads(r.text)  # a JSON body even on failure
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(10) == 0


def test_a_taken_default_port_is_replaced_by_a_free_one_and_said():
    from meshweb.dev import PORT_FLAGS, choose_ports

    holder = socket.socket()
    with contextlib.suppress(OSError):  # if someone else holds it, it is taken all the same
        holder.bind(("127.0.0.1", 8502))
        holder.listen()
    try:
        values, moved = choose_ports({flag: None for flag in PORT_FLAGS})
    finally:
        holder.close()
    assert values["grpc_addr"] != "127.0.0.1:8502"
    host, _, port = values["grpc_addr"].rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert f"127.0.0.1:8502 is in use; --grpc-addr {values['grpc_addr']}" in moved
    ports = [int(str(v).rpartition(":")[2]) for v in values.values() if v != ""]
    assert len(ports) == len(set(ports)), values


def test_an_explicit_port_is_kept_as_given():
    from meshweb.dev import PORT_FLAGS, choose_ports

    given = {flag: None for flag in PORT_FLAGS} | {"--web-port": 45678, "--dns-addr": ""}
    values, _moved = choose_ports(given)
    assert values["web_port"] == 45678 and values["dns_addr"] == ""


def test_the_banner_commands_work_without_an_active_venv(tmp_path):
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    printed = subprocess.run(
        [sys.executable, "-c", "from meshweb.dev import mesh_command; print(mesh_command())"],
        cwd=ROOT,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    assert printed != "mesh" and Path(printed).is_absolute()
    # As printed, from another directory and without the venv on PATH, it runs.
    run = subprocess.run(
        f"{printed} --help",
        shell=True,
        cwd=tmp_path,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "intention" in run.stdout


def test_make_run_passes_its_args_to_mesh_dev():
    out = subprocess.run(
        ["make", "-n", "run", "ARGS=--http-addr 127.0.0.1:18500"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert ".venv/bin/mesh dev --http-addr 127.0.0.1:18500" in out


def test_the_demo_traffic_counts_answers_and_a_flaky_api_fails_as_told(tmp_path):
    """`mesh demo-app traffic` against an api failing 100 % and 0 %; bad flags refused."""
    from agents.demo import generate_traffic

    ports = {percent: free_port() for percent in (100, 0)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "agents.demo", "api", "--port", str(port)]
            + ["--fail-percent", str(percent)],
            cwd=ROOT,
        )
        for percent, port in ports.items()
    ]
    try:
        for port in ports.values():
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    break
                time.sleep(0.1)
        failing = generate_traffic(f"http://127.0.0.1:{ports[100]}/", 50, limit=10)
        healthy = generate_traffic(f"http://127.0.0.1:{ports[0]}/", 50, limit=10)
        assert failing == {503: 10}
        assert healthy == {200: 10}
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    for argv in (
        ["traffic"],
        ["traffic", "--target", "x"],
        ["api", "--port", "1", "--fail-percent", "200"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "agents.demo", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 2 and "mesh demo-app" in out.stderr
