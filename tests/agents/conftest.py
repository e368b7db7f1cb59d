"""Real `mesh agent` processes beside a real `mesh server` (all on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.servers import ROOT, MeshServer, die_with_parent, free_port, make_server

_TOKEN = re.compile(r"\b([0-9a-f]{16}\.[A-Za-z0-9_-]+)\b")
_PIN = re.compile(r"\b(sha256:[0-9a-f]{64})\b")


def grpc_port(server: MeshServer) -> int:
    return server.grpc_port


def start_server(tmp: Path, **kw) -> MeshServer:
    """A control plane with its agent protocol (gRPC over TLS) on a free loopback port."""
    return make_server(tmp, **kw)


def join_token(server: MeshServer, *extra: str) -> tuple[str, str]:
    """(token, pin) from `mesh join-token create`, run against the server's HTTP API."""
    if "-service" not in extra:
        extra = (*extra, "-service", "*")  # these tests' agents register any service
    out = subprocess.run(
        [sys.executable, "-m", "meshweb.cli", "join-token", "create", "-format", "json", *extra],
        cwd=ROOT,
        env={**server.env, "CONSUL_HTTP_ADDR": server.addr},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert _TOKEN.fullmatch(data["token"]) and _PIN.fullmatch(data["ca_pin"]), data
    return data["token"], data["ca_pin"]


@dataclass
class MeshAgent:
    """A `mesh agent` subprocess with its own data dir, config dir and ports."""

    server: MeshServer
    data_dir: Path
    config_dir: Path
    node: str
    token: str = ""
    pin: str = ""
    extra: list[str] = field(default_factory=list)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "meshweb.cli",
            "agent",
            "-data-dir",
            str(self.data_dir),
            "-config-dir",
            str(self.config_dir),
            "-join",
            f"127.0.0.1:{grpc_port(self.server)}",
            "-node",
            self.node,
            "-bind",
            "127.0.0.1",
            "-http-addr",
            f"127.0.0.1:{self.http_port}",
            "-metrics-addr",
            f"127.0.0.1:{self.metrics_port}",
            "-sync-interval",
            "1s",
            "-rpc-timeout",
            "5s",
        ]
        if self.token:
            argv += ["-join-token", self.token, "-ca-pin", self.pin]
        return argv + self.extra

    def start(self, wait: bool = True) -> MeshAgent:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"{self.node}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mesh agent exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/v1/agent/self", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"mesh agent did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:] if self.log_path else ""
        except OSError:
            return ""

    def log_lines(self) -> list[dict]:
        out = []
        for line in (
            self.log_path.read_text(errors="replace") if self.log_path else ""
        ).splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    @property
    def local_token(self) -> str:
        """The agent's local API token, from the file it writes in its data dir."""
        return (self.data_dir / "agent-token").read_text().strip()

    def client(self, token: str | None = None) -> httpx.Client:
        tok = self.local_token if token is None else token
        headers = {"X-Consul-Token": tok} if tok else {}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers)

    def consul(self, token: str | None = None):
        import consul

        return consul.Consul(
            host="127.0.0.1",
            port=self.http_port,
            token=self.local_token if token is None else token,
        )

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def eventually(fn, timeout: float = 15.0, interval: float = 0.1):
    """Call `fn` until it returns a truthy value (returned) or raises no AssertionError."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except (AssertionError, httpx.HTTPError, KeyError, IndexError) as exc:
            last = exc
        time.sleep(interval)
    if last is not None:
        raise last
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory) -> MeshServer:
    srv = start_server(tmp_path_factory.mktemp("cp"))
    yield srv
    srv.close()


@pytest.fixture
def make_agent(control_plane, tmp_path, unique):
    """Start agents joined to the module's control plane; all stopped at the end."""
    started: list[MeshAgent] = []

    def make(
        *,
        node: str | None = None,
        files: dict[str, str] | None = None,
        services: tuple[str, ...] = ("*",),
        **kw,
    ) -> MeshAgent:
        token, pin = join_token(control_plane, *(a for s in services for a in ("-service", s)))
        name = node or unique("node")
        agent = MeshAgent(
            control_plane,
            tmp_path / name / "data",
            tmp_path / name / "config.d",
            name,
            token=token,
            pin=pin,
            **kw,
        )
        agent.config_dir.mkdir(parents=True, exist_ok=True)
        for fname, text in (files or {}).items():
            (agent.config_dir / fname).write_text(text)
        started.append(agent)
        return agent.start()

    yield make
    for agent in started:
        agent.stop()
