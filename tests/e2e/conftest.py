"""Two hosts (network namespaces A and B) and a control plane in the root namespace.

`topology` makes the namespaces and the bridge once per module (skipped with
the reason when this machine cannot: not root, no `ip netns`; under CI=true
that is a failure instead). `Cluster` runs, all on the test-made links:

- the control plane (`mesh server`, ACLs on) bound to the bridge's address
  (HTTP and gRPC; no DNS), its own SQLite database — or PostgreSQL/Redis
  when the run's DATABASE_URL/REDIS_URL say so (tests/support/servers.py);
- on host A: `mesh agent` (node host-a) with `web` (port 9090, upstream api ->
  127.0.0.1:9191) and its sidecar, and the demo web app bound to A's address
  so the test (in the root namespace) can call it;
- on host B: `mesh agent` (node host-b) with two instances of `api` (api-1 on
  9091, api-2 on 9092, each with an HTTP check every second on `/healthz` and a
  sidecar on 21000/21001), and the demo api apps bound to 127.0.0.1 — the only
  way in from elsewhere is their sidecars.

Ports inside the namespaces are fixed (each namespace has its own); a second
cluster on the same hosts passes a `port_offset`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
import pytest

from tests.e2e.netns import Host, Namespaces, Topology, unavailable_reason
from tests.support.servers import ROOT, MeshServer, die_with_parent, make_server

L = TypeVar("L", bound=Namespaces)

# One INFO line per request would bury the measured times `pytest -s` prints.
logging.getLogger("httpx").setLevel(logging.WARNING)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def made(layout: L) -> Iterator[L]:
    """`layout` created for the block, then removed with all it made (checked).

    Skipped with the reason when this machine cannot make namespaces; under
    CI=true that is a failure instead.
    """
    reason = unavailable_reason()
    if reason:
        if _ci():
            pytest.fail(f"end-to-end tests with network namespaces cannot run under CI: {reason}")
        pytest.skip(f"network namespaces unavailable: {reason}")
    layout.create()
    try:
        yield layout
    finally:
        layout.close()
        assert layout.leftovers() == [], "namespaces or links left behind"


@pytest.fixture(scope="module")
def topology():
    with made(Topology()) as topo:
        yield topo


# --------------------------------------------------------------------------- processes


@dataclass
class BridgedServer(MeshServer):
    """A `mesh server` listening on the bridge's address instead of 127.0.0.1."""

    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.http_port}"

    def client(self, token: str | None = None, **kw) -> httpx.Client:
        kw.setdefault("trust_env", False)
        return super().client(token, **kw)


def bridged_server(address: str, data_dir: Path, **options: Any) -> BridgedServer:
    """A started `mesh server` (ACLs on; `options` as `make_server`'s) bound on `address`."""
    base = make_server(data_dir, acl=True, start=False, **options)
    server = BridgedServer(**{f.name: getattr(base, f.name) for f in fields(base)})
    server.host = address
    server.env["MESH_HTTP_ADDR"] = f"{address}:{server.http_port}"
    server.env["MESH_GRPC_ADDR"] = f"{address}:{server.grpc_port}"
    server.env["MESH_DNS_ADDR"] = ""
    try:
        server.start()
    except Exception:
        server.close()
        raise
    return server


def start_server(topo: Topology, data_dir: Path, leaf_ttl: str = "") -> BridgedServer:
    extra = {"MESH_CA_LEAF_TTL": leaf_ttl} if leaf_ttl else {}
    return bridged_server(topo.gateway, data_dir, extra_env=extra)


@dataclass
class NsProcess:
    """A process inside a host's namespace, in its own session, logging to a file."""

    host: Host
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> NsProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.host.argv(*self.argv),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def mesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshweb.cli", *args]


def demo_app(
    host: Host,
    tmp: Path,
    name: str,
    role: str,
    port: int,
    *,
    bind: str = "127.0.0.1",
    upstream: int | None = None,
    fail_file: Path | None = None,
) -> NsProcess:
    """A started `mesh demo-app` on `host`; `upstream` is web's local port for api."""
    argv = mesh("demo-app", role, "--port", str(port), "--bind", bind, "--name", name)
    if upstream is not None:
        argv += ["--upstream", f"127.0.0.1:{upstream}"]
    if fail_file is not None:
        argv += ["--fail-file", str(fail_file)]
    return NsProcess(host, name, argv, tmp / f"{name}.log").start()


def start_agent(
    host: Host,
    tmp: Path,
    node: str,
    files: dict[str, dict],
    *,
    join: str,
    join_token: tuple[str, str],
    http_port: int = 8500,
    metrics_port: int = 9102,
    extra: tuple[str, ...] = (),
) -> NsProcess:
    """A started `mesh agent` for `node` on `host`, its config dir holding `files`,
    joining the control plane's gRPC address `join` with (token, CA pin)."""
    base = tmp / node
    config_dir = base / "config.d"
    config_dir.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (config_dir / name).write_text(json.dumps(body))
    token, pin = join_token
    argv = mesh(
        "agent",
        "-data-dir", str(base / "data"),
        "-config-dir", str(config_dir),
        "-join", join,
        "-join-token", token,
        "-ca-pin", pin,
        "-node", node,
        *extra,
        "-bind", host.address,
        "-http-addr", f"{host.address}:{http_port}",
        "-metrics-addr", f"{host.address}:{metrics_port}",
        "-rpc-timeout", "5s",
    )  # fmt: skip
    return NsProcess(host, node, argv, tmp / f"{node}.log").start()


def new_join_token(cp: httpx.Client, **body: Any) -> tuple[str, str]:
    """A single-use join token (and the CA pin) from the control plane `cp`."""
    r = cp.post("/api/join-tokens/", json={"uses": 1, "ttl": "5m", "services": ["*"], **body})
    assert r.status_code == 201, r.text
    return r.json()["token"], r.json()["ca_pin"]


def data_logs(tmp: Path, pattern: str = "*/data/*/*.log", chars: int = 2000) -> list[str]:
    """The tails of the logs the agents keep under their data dirs (sidecars, gateways)."""
    parts = []
    for log in sorted(tmp.glob(pattern)):
        parts.append(f"--- {log.parent.parent.parent.name}/{log.name} ---\n")
        parts[-1] += log.read_text(errors="replace")[-chars:]
    return parts


# --------------------------------------------------------------------------- the cluster


class Started:
    """Processes started as one whole: a failure part-way stops what had started."""

    def start(self) -> Self:
        try:
            self._start()
        except Exception:
            self.close()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


@dataclass
class Cluster(Started):
    """Control plane + agents on A and B + the demo apps (see the module docstring)."""

    topo: Topology
    tmp: Path
    leaf_ttl: str = ""
    port_offset: int = 0
    server: BridgedServer | None = None
    agents: dict[str, NsProcess] = field(default_factory=dict)
    apps: dict[str, NsProcess] = field(default_factory=dict)

    # --- addresses ----------------------------------------------------------------------

    @property
    def a(self) -> Host:
        return self.topo.hosts["A"]

    @property
    def b(self) -> Host:
        return self.topo.hosts["B"]

    def port(self, base: int) -> int:
        return base + self.port_offset

    @property
    def web_url(self) -> str:
        return f"http://{self.a.address}:{self.port(9090)}/"

    def sidecar_port(self, instance: str) -> int:
        return self.port({"api-1": 21000, "api-2": 21001, "web": 21000}[instance])

    def fail_file(self, instance: str) -> Path:
        return self.tmp / f"{instance}.fail"

    def agent_metrics(self, label: str) -> str:
        host = self.topo.hosts[label]
        url = f"http://{host.address}:{self.port(9102)}/metrics"
        return httpx.get(url, timeout=5, trust_env=False).text

    # --- start and stop ------------------------------------------------------------------

    def _start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.server = start_server(self.topo, self.tmp / "cp", self.leaf_ttl)
        self._app("A", "web", "web", self.port(9090), bind=self.a.address)
        self._app("B", "api-1", "api", self.port(9091))
        self._app("B", "api-2", "api", self.port(9092))
        web = {
            "service": {
                "name": "web",
                "port": self.port(9090),
                "connect": {
                    "sidecar_service": {
                        "port": self.sidecar_port("web"),
                        "proxy": {
                            "upstreams": [
                                {"destination_name": "api", "local_bind_port": self.port(9191)}
                            ]
                        },
                    }
                },
            }
        }
        self._agent("A", "host-a", {"web.json": web})
        files = {}
        for instance, port in (("api-1", self.port(9091)), ("api-2", self.port(9092))):
            files[f"{instance}.json"] = {
                "service": {
                    "id": instance,
                    "name": "api",
                    "port": port,
                    "check": {
                        "http": f"http://127.0.0.1:{port}/healthz",
                        "interval": "1s",
                        "timeout": "1s",
                    },
                    "connect": {"sidecar_service": {"port": self.sidecar_port(instance)}},
                }
            }
        self._agent("B", "host-b", files)
        self.allow()

    def _app(self, label: str, name: str, role: str, port: int, bind: str = "127.0.0.1") -> None:
        web = role == "web"
        self.apps[name] = demo_app(
            self.topo.hosts[label],
            self.tmp,
            name,
            role,
            port,
            bind=bind,
            upstream=self.port(9191) if web else None,
            fail_file=None if web else self.fail_file(name),
        )

    def join_token(self) -> tuple[str, str]:
        return new_join_token(self.cp())

    def _agent(self, label: str, node: str, files: dict[str, dict]) -> None:
        assert self.server is not None
        self.agents[label] = start_agent(
            self.topo.hosts[label],
            self.tmp,
            node,
            files,
            join=f"{self.topo.gateway}:{self.server.grpc_port}",
            join_token=self.join_token(),
            http_port=self.port(8500),
            metrics_port=self.port(9102),
        )

    def cp(self) -> httpx.Client:
        assert self.server is not None
        return self.server.client()

    def close(self) -> None:
        for proc in [*self.apps.values(), *self.agents.values()]:
            proc.stop()
        if self.server is not None:
            self.server.close()

    def logs(self) -> str:
        """The tail of every log, for a failure message."""
        parts = []
        for proc in [*self.agents.values(), *self.apps.values()]:
            parts.append(f"--- {proc.name} ---\n{proc.log(2500)}")
        for sidecar_log in sorted(self.tmp.glob("host-*/data/sidecars/*.log")):
            parts.append(f"--- {sidecar_log.name} ---\n{sidecar_log.read_text()[-2500:]}")
        if self.server is not None:
            parts.append(f"--- server ---\n{self.server.log()}")
        return "\n".join(parts)

    # --- intentions ------------------------------------------------------------------------

    def intention(self, action: str) -> None:
        """web -> api: "allow", "deny", or "delete" (then the default, deny, applies)."""
        params = {"source": "web", "destination": "api"}
        with self.cp() as c:
            if action == "delete":
                r = c.delete("/v1/connect/intentions/exact", params=params)
            else:
                r = c.put("/v1/connect/intentions/exact", params=params, json={"Action": action})
        assert r.status_code == 200, r.text

    def allow(self) -> None:
        self.intention("allow")


# --------------------------------------------------------------------------- calls


class Caller:
    """Calls web on host A from the root namespace (over the bridge)."""

    def __init__(self, cluster: Cluster) -> None:
        self.url = cluster.web_url
        self.client = httpx.Client(timeout=5, trust_env=False)

    def call(self) -> tuple[bool, str]:
        """(ok, the api instance that answered or the failure)."""
        try:
            r = self.client.get(self.url)
        except httpx.HTTPError as exc:
            return False, f"web unreachable: {exc!r}"
        if r.status_code != 200:
            return False, r.json().get("error", r.text) if r.text.startswith("{") else r.text
        return True, r.json()["upstream"]["instance"]

    def close(self) -> None:
        self.client.close()


def wait_for(predicate, timeout: float, interval: float = 0.05) -> float:
    """Poll until `predicate()` is true; the seconds it took (AssertionError on timeout)."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(interval)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)  # anchored: not the `# HELP name ...` line
    return float(m.group(1)) if m else 0.0
