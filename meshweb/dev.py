"""`mesh dev`: the whole mesh on one machine, for trying it out (`make run`).

It starts, each as its own child process with its log in `<data-dir>/dev/`:

1. the control plane (`mesh server`, embedded: SQLite in the data dir,
   in-process tasks, ACLs on — it bootstraps on first start and the token is
   read back from `<data-dir>/bootstrap-token`);
2. the demo services (`mesh demo-app`): `api` v1 on :9091, `api` v2 on
   :9092 (it fails 10 % of its calls on purpose) and `web` on :9090, which
   calls `api` through its upstream listener 127.0.0.1:9191;
3. one `mesh agent` (node `dev`, data in `<data-dir>/dev/agent`), joined with
   a single-use join token created here, whose config dir declares `web` and
   both `api` instances with sidecars (the agent runs the `mesh-sidecar`
   processes, writes their access logs to `<data-dir>/dev/agent/access-logs/`
   and reports their request counts every 5 s);
4. once web answers, generated traffic (`mesh demo-app traffic`, 5 calls a
   second to web), so golden metrics, `mesh top` and the access logs show
   something from the first minute.

Before the agent starts it writes the demo's config entries: `web` and `api`
speak `http`; `api` has subsets `v1` and `v2` (by `Service.Meta.version`),
a 90/10 split between them and a route that retries a `503` twice.
Then it writes the intention `web -> api` (allow), waits until
`GET http://127.0.0.1:9090/` answers with api's answer inside — the call
went web -> web's sidecar -> mTLS -> api's sidecar -> api — prints how to
use it and a `mesh dev: ready` line, and runs until Ctrl-C or SIGTERM. Then
it stops what it started, in reverse order (the agent stops its sidecars;
any sidecar still alive after that is stopped by the pid file the agent
keeps). Children run in their own sessions, so a Ctrl-C reaches only this
process and shutdown stays ordered; on Linux they also get SIGTERM if this
process dies without cleaning up.

`mesh dev` is always embedded: DATABASE_URL and REDIS_URL are not passed to
the control plane it starts. Every address is a flag (defaulting to the
`MESH_*` variable where `mesh server` has one) so several can run side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READY_LINE = "mesh dev: ready"
START_TIMEOUT = 90.0  # seconds for the whole mesh to answer through the sidecars
STOP_GRACE = 10.0  # seconds the children get after SIGTERM before SIGKILL (the agent needs < 10)


class DevError(RuntimeError):
    """`mesh dev` could not start; the message says what failed (and where its log is)."""


@dataclass(frozen=True)
class DevConfig:
    """Where everything listens; all from flags (defaults as documented)."""

    data_dir: Path
    http_addr: str = "127.0.0.1:8500"
    grpc_addr: str = "127.0.0.1:8502"
    dns_addr: str = "127.0.0.1:8600"
    agent_http_addr: str = "127.0.0.1:8510"
    agent_metrics_addr: str = "127.0.0.1:9102"
    web_port: int = 9090
    api_port: int = 9091
    upstream_port: int = 9191
    web_sidecar_port: int = 21000
    api_sidecar_port: int = 21001
    api_v2_port: int = 9092
    api_v2_sidecar_port: int = 21002
    traffic_rate: float = 5.0  # calls a second to web; 0: no generated traffic
    # `--datacenters 2`: a second datacenter (dc2) with its own agent, api
    # instance and mesh gateway, and dc1's gateway; api fails over to dc2.
    datacenters: int = 1
    gateway_port: int = 8443
    dc2_gateway_port: int = 8444
    dc2_agent_http_addr: str = "127.0.0.1:8511"
    dc2_agent_metrics_addr: str = "127.0.0.1:9103"
    dc2_api_port: int = 9093
    dc2_api_sidecar_port: int = 21003

    @property
    def dev_dir(self) -> Path:
        return self.data_dir / "dev"

    @property
    def agent_dir(self) -> Path:
        return self.dev_dir / "agent"

    @property
    def config_dir(self) -> Path:
        return self.dev_dir / "config.d"

    @property
    def dc2_agent_dir(self) -> Path:
        return self.dev_dir / "agent-dc2"

    @property
    def dc2_config_dir(self) -> Path:
        return self.dev_dir / "config-dc2.d"

    @property
    def fail_file(self) -> Path:
        """While it exists, dc1's api fails its health check (`--datacenters 2`)."""
        return self.dev_dir / "api-dc1.fail"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_addr}"


def gateway_definition(port: int) -> dict[str, Any]:
    """A mesh gateway on loopback (LAN and WAN alike: one machine plays both clouds)."""
    return {
        "service": {
            "kind": "mesh-gateway",
            "name": "mesh-gateway",
            "port": port,
            "address": "127.0.0.1",
            "tagged_addresses": {"wan": {"address": "127.0.0.1", "port": port}},
            "check": {"tcp": f"127.0.0.1:{port}", "interval": "2s"},
        }
    }


def dc2_definitions(cfg: DevConfig) -> dict[str, dict[str, Any]]:
    """The dc2 agent's config dir: api (instance api-dc2) and dc2's mesh gateway."""
    return {
        "api.json": {
            "service": {
                "id": "api-dc2",
                "name": "api",
                "port": cfg.dc2_api_port,
                "meta": {"version": "v1"},  # dc1's v1 subset fails over to it
                "check": {"http": f"http://127.0.0.1:{cfg.dc2_api_port}/healthz", "interval": "2s"},
                "connect": {"sidecar_service": {"port": cfg.dc2_api_sidecar_port}},
            }
        },
        "gateway.json": gateway_definition(cfg.dc2_gateway_port),
    }


def service_definitions(cfg: DevConfig) -> dict[str, dict[str, Any]]:
    """The agent's config dir: `web` (upstream api) and `api` v1 and v2, each with a
    sidecar and a check (and, with two datacenters, dc1's mesh gateway)."""
    out = _dc1_definitions(cfg)
    if cfg.datacenters > 1:
        out["gateway.json"] = gateway_definition(cfg.gateway_port)
    return out


def _dc1_definitions(cfg: DevConfig) -> dict[str, dict[str, Any]]:
    return {
        "web.json": {
            "service": {
                "name": "web",
                "port": cfg.web_port,
                "check": {"http": f"http://127.0.0.1:{cfg.web_port}/healthz", "interval": "5s"},
                "connect": {
                    "sidecar_service": {
                        "port": cfg.web_sidecar_port,
                        "proxy": {
                            "upstreams": [
                                {"destination_name": "api", "local_bind_port": cfg.upstream_port}
                            ]
                        },
                    }
                },
            }
        },
        **{
            f"api-{version}.json": {
                "service": {
                    "name": "api",
                    "id": f"api-{version}",
                    "port": port,
                    "meta": {"version": version},
                    "check": {"http": f"http://127.0.0.1:{port}/healthz", "interval": "2s"},
                    "connect": {"sidecar_service": {"port": sidecar_port}},
                }
            }
            for version, port, sidecar_port in (
                ("v1", cfg.api_port, cfg.api_sidecar_port),
                ("v2", cfg.api_v2_port, cfg.api_v2_sidecar_port),
            )
        },
    }


# --------------------------------------------------------------------------- children


def _die_with_parent() -> None:
    """In the child (Linux): SIGTERM when `mesh dev` dies, so nothing is left behind."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """One process `mesh dev` started, in its own session, logging to a file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, wait, then SIGKILL its whole process group."""
        self.terminate()
        self.finish(time.monotonic() + grace)

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM), without waiting."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def finish(self, deadline: float) -> None:
        """Wait until `deadline` (monotonic) for it to exit, then SIGKILL its group."""
        if self.proc is None:
            return
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"mesh dev: {self.name} ignored SIGTERM; killing it", file=sys.stderr)
        # Anything left in its group (it leads one: start_new_session) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _mesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshweb.cli", *args]


def _child_env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not (drop and k.startswith(drop))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sidecar_pids(agent_dir: Path) -> list[int]:
    """The sidecars the agent runs (its `sidecars/<proxy_id>.pid` files)."""
    pids = []
    for path in (agent_dir / "sidecars").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            pids.append(int(json.loads(path.read_text())["pid"]))
    return pids


# --------------------------------------------------------------------------- the control plane's API


def _api(cfg: DevConfig, token: str | None):
    from meshweb.commands.base import Client

    return Client(cfg.http_url, token=token, timeout=10)


def _wait(what: str, check, timeout: float, children: list[Child], interval: float = 0.2) -> Any:
    """Call `check` until it returns a truthy value; a dead child or the deadline fails."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for child in children:
            if child.proc is not None and child.proc.poll() is not None:
                raise DevError(
                    f"{child.name} exited ({child.proc.returncode}) while waiting for {what}; "
                    f"its log ({child.log_path}):\n{child.log_tail()}"
                )
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - anything is "not yet"; the last one is shown
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(interval)
    raise DevError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last})" if last else "")
    )


def _server_up(cfg: DevConfig) -> bool:
    return _api(cfg, None).get("/v1/status/leader").status == 200


def _management_token(cfg: DevConfig) -> str | None:
    """The token `mesh dev` uses: the configured initial one, else the bootstrap file."""
    if os.environ.get("MESH_ACL_ENABLED", "true").strip().lower() in ("false", "0", "no", "off"):
        return None
    initial = os.environ.get("MESH_ACL_INITIAL_MANAGEMENT_TOKEN")
    if initial:
        return initial
    path = cfg.data_dir / "bootstrap-token"
    if path.exists():
        return path.read_text().strip()
    if os.environ.get("MESH_HTTP_TOKEN"):
        return os.environ["MESH_HTTP_TOKEN"]
    raise DevError(
        f"ACLs are on but there is no management token: {path} is missing (ACLs were "
        "bootstrapped another way). Set MESH_HTTP_TOKEN to a management token and retry."
    )


def _create_join_token(
    cfg: DevConfig, token: str | None, dc: str = "", services: tuple[str, ...] = ("web", "api")
) -> tuple[str, str]:
    # The dev agent registers exactly the demo services (and their sidecars).
    spec: dict[str, Any] = {
        "ttl": "10m",
        "uses": 1,
        "description": f"mesh dev agent {dc}".strip(),
        "services": list(services),
    }
    if dc:
        spec["datacenter"] = dc
    body = json.dumps(spec).encode()
    data = (
        _api(cfg, token)
        .request(
            "POST",
            "/api/join-tokens/",
            body=body,
            ok=(200, 201),
            content_type="application/json",
        )
        .json()
    )
    return data["token"], data["ca_pin"]


def demo_config_entries(datacenters: int = 1) -> list[dict[str, Any]]:
    """HTTP for web and api; api's v1/v2 subsets, its 90/10 split and a retrying route
    (and, with two datacenters, api failing over to dc2)."""
    failover = {"Failover": {"*": {"Datacenters": ["dc2"]}}} if datacenters > 1 else {}
    return [
        {"Kind": "service-defaults", "Name": "api", "Protocol": "http"},
        {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
        {
            "Kind": "service-resolver",
            "Name": "api",
            "DefaultSubset": "v1",
            "Subsets": {
                "v1": {"Filter": "Service.Meta.version == v1"},
                "v2": {"Filter": "Service.Meta.version == v2"},
            },
            **failover,
        },
        {
            "Kind": "service-splitter",
            "Name": "api",
            "Splits": [
                {"Weight": 90, "ServiceSubset": "v1"},
                {"Weight": 10, "ServiceSubset": "v2"},
            ],
        },
        {
            "Kind": "service-router",
            "Name": "api",
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/"}},
                    "Destination": {
                        "Service": "api",
                        "NumRetries": 2,
                        "RetryOnConnectFailure": True,
                        "RetryOnStatusCodes": [503],
                    },
                }
            ],
        },
    ]


def write_config_entries(cfg: DevConfig, token: str | None) -> None:
    """The demo's config entries, as `mesh config write` would write them."""
    client = _api(cfg, token)
    for entry in demo_config_entries(cfg.datacenters):
        client.put_json("/v1/config", entry)


def allow_web_to_api(cfg: DevConfig, token: str | None) -> None:
    """The intention `web -> api` (allow), written as `mesh intention create -replace` would."""
    _api(cfg, token).put_json(
        "/v1/connect/intentions/exact",
        {"Action": "allow", "Description": "mesh dev: web calls api"},
        params={"source": "web", "destination": "api"},
    )


def prepare_second_datacenter(cfg: DevConfig, token: str | None) -> None:
    """dc2, and sidecars leaving through their own datacenter's gateway (api's
    failover to dc2 is in `demo_config_entries`)."""
    api = _api(cfg, token)
    api.request(
        "POST",
        "/api/datacenters/",
        body=json.dumps({"name": "dc2", "provider": "onprem", "region": "dev"}).encode(),
        ok=(201, 409),
        content_type="application/json",
    )
    api.put_json(
        "/v1/config", {"Kind": "proxy-defaults", "Name": "global", "MeshGateway": {"Mode": "local"}}
    )


def gateways_ready(cfg: DevConfig, token: str | None) -> bool:
    """dc1's gateway knows dc2's, and dc2's routes api to a healthy instance."""
    api = _api(cfg, token)
    try:
        dc1 = api.get_json("/api/gateways/dev/mesh-gateway/config")
        dc2 = api.get_json("/api/gateways/dev-dc2/mesh-gateway/config")
    except Exception:
        return False
    return bool(dc1.get("datacenters")) and any(
        r["service"] == "api" and r["endpoints"] for r in dc2.get("routes", ())
    )


def call_web(cfg: DevConfig) -> dict[str, Any] | None:
    """web's answer when it includes api's (the call went through both sidecars), else None."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{cfg.web_port}/", timeout=5) as resp:
        data = json.loads(resp.read())
    return data if (data.get("upstream") or {}).get("service") == "api" else None


# --------------------------------------------------------------------------- the run


class DevMesh:
    """Everything `mesh dev` runs; `start()` then `wait()`, `stop()` always."""

    def __init__(self, cfg: DevConfig) -> None:
        self.cfg = cfg
        self.children: list[Child] = []
        self.token: str | None = None

    def _child(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        drop: tuple[str, ...] = (),
    ) -> Child:
        child = Child(name, argv, self.cfg.dev_dir / f"{name}.log", _child_env(env, drop))
        self.children.append(child)
        child.start()
        return child

    def start(self) -> None:
        cfg = self.cfg
        cfg.dev_dir.mkdir(parents=True, exist_ok=True)
        _say(f"starting the control plane on {cfg.http_url} (gRPC {cfg.grpc_addr}) ...")
        server = self._child(
            "server",
            _mesh("server", "--quiet"),
            {
                "MESH_DATA_DIR": str(cfg.data_dir),
                "MESH_HTTP_ADDR": cfg.http_addr,
                "MESH_GRPC_ADDR": cfg.grpc_addr,
                "MESH_DNS_ADDR": cfg.dns_addr,
            },
        )
        _wait("the control plane", lambda: _server_up(cfg), START_TIMEOUT, [server])
        self.token = _management_token(cfg)
        two = cfg.datacenters > 1
        if two:
            prepare_second_datacenter(cfg, self.token)
        services = ("web", "api", "mesh-gateway") if two else ("web", "api")
        join_token, pin = _create_join_token(cfg, self.token, services=services)

        cfg.config_dir.mkdir(parents=True, exist_ok=True)
        for name, definition in service_definitions(cfg).items():
            (cfg.config_dir / name).write_text(json.dumps(definition, indent=2) + "\n")
        write_config_entries(cfg, self.token)
        _say(
            f"starting the demo services api v1 (:{cfg.api_port}), api v2 (:{cfg.api_v2_port}) "
            f"and web (:{cfg.web_port}) ..."
        )
        # With two datacenters, touching the fail file fails dc1's api (both
        # versions): calls fail over to dc2.
        fail = ["--fail-file", str(cfg.fail_file)] if two else []
        self._child(
            "api-v1",
            _mesh("demo-app", "api", "--port", str(cfg.api_port), "--name", "api-v1", *fail),
        )
        self._child(
            "api-v2",
            _mesh(
                "demo-app",
                "api",
                "--port",
                str(cfg.api_v2_port),
                "--name",
                "api-v2",
                "--fail-percent",
                "10",
                *fail,
            ),
        )
        self._child(
            "web",
            _mesh(
                "demo-app",
                "web",
                "--port",
                str(cfg.web_port),
                "--upstream",
                f"127.0.0.1:{cfg.upstream_port}",
                "--name",
                "web-1",
            ),
        )
        _say("starting the agent (node dev) with sidecars for web and both api ...")
        # The agent's environment carries no MESH_*: its flags say everything.
        self._child(
            "agent",
            _mesh(
                "agent",
                "-data-dir",
                str(cfg.agent_dir),
                "-config-dir",
                str(cfg.config_dir),
                "-join",
                cfg.grpc_addr,
                "-join-token",
                join_token,
                "-ca-pin",
                pin,
                "-node",
                "dev",
                "-bind",
                "127.0.0.1",
                "-http-addr",
                cfg.agent_http_addr,
                "-metrics-addr",
                cfg.agent_metrics_addr,
                "-traffic-report-interval",
                "5s",
                # Every demo call is traced when spans are exported (5 calls a second).
                "-trace-sample-ratio",
                "1",
            ),
            drop=("MESH_", "CONSUL_"),
        )
        if two:
            self._start_dc2()
        allow_web_to_api(cfg, self.token)
        _say("waiting for web to reach api through the sidecars ...")
        answer = _wait(
            "web -> api through the sidecars",
            lambda: call_web(cfg),
            START_TIMEOUT,
            self.children,
            0.3,
        )
        if two:
            _say("waiting for the mesh gateways of dc1 and dc2 ...")
            _wait(
                "the mesh gateways",
                lambda: gateways_ready(cfg, self.token),
                START_TIMEOUT,
                self.children,
                0.5,
            )
        if cfg.traffic_rate:
            self._child(
                "traffic",
                _mesh(
                    "demo-app",
                    "traffic",
                    "--target",
                    f"http://127.0.0.1:{cfg.web_port}/",
                    "--rate",
                    f"{cfg.traffic_rate:g}",
                ),
            )
        print(banner(cfg, self.token, answer), flush=True)
        print(READY_LINE + " (Ctrl-C stops everything)", flush=True)

    def _start_dc2(self) -> None:
        cfg = self.cfg
        cfg.dc2_config_dir.mkdir(parents=True, exist_ok=True)
        for name, definition in dc2_definitions(cfg).items():
            (cfg.dc2_config_dir / name).write_text(json.dumps(definition, indent=2) + "\n")
        join_token, pin = _create_join_token(
            cfg, self.token, dc="dc2", services=("api", "mesh-gateway")
        )
        _say(f"starting dc2: api (:{cfg.dc2_api_port}) and an agent (node dev-dc2) ...")
        argv = _mesh("demo-app", "api", "--port", str(cfg.dc2_api_port), "--name", "api-dc2")
        self._child("api-dc2", argv)
        self._child(
            "agent-dc2",
            _mesh(
                "agent",
                "-data-dir",
                str(cfg.dc2_agent_dir),
                "-config-dir",
                str(cfg.dc2_config_dir),
                "-join",
                cfg.grpc_addr,
                "-join-token",
                join_token,
                "-ca-pin",
                pin,
                "-node",
                "dev-dc2",
                "-dc",
                "dc2",
                "-bind",
                "127.0.0.1",
                "-http-addr",
                cfg.dc2_agent_http_addr,
                "-metrics-addr",
                cfg.dc2_agent_metrics_addr,
            ),  # fmt: skip
            drop=("MESH_", "CONSUL_"),
        )

    def wait(self) -> int:
        """Until a signal (0) or a child's unexpected exit (1)."""
        while True:
            for child in self.children:
                if not child.alive():
                    code = child.proc.returncode if child.proc else None
                    print(
                        f"mesh dev: {child.name} exited ({code}); stopping. "
                        f"Its log ({child.log_path}):\n{child.log_tail()}",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the children together (one shared grace, then SIGKILL), then any sidecar
        the agent left: a stop takes at most STOP_GRACE, not its sum over the children."""
        for child in reversed(self.children):
            child.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for child in reversed(self.children):
            child.finish(deadline)
        for pid in [*sidecar_pids(self.cfg.agent_dir), *sidecar_pids(self.cfg.dc2_agent_dir)]:
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def banner(cfg: DevConfig, token: str | None, answer: dict[str, Any]) -> str:
    """What to do next: how to call web, deny and re-allow, and where everything is."""
    addr_flag = "" if cfg.http_addr == "127.0.0.1:8500" else f" -http-addr {cfg.http_addr}"
    mesh = mesh_command()
    lines = [
        "",
        "meshweb dev mesh: control plane + agent (node dev) + web, api v1 and v2 with sidecars",
        f"  call web:   curl http://127.0.0.1:{cfg.web_port}/",
        f"              web calls api at 127.0.0.1:{cfg.upstream_port} (its sidecar) -> mTLS -> "
        f"api's sidecar (:{cfg.api_sidecar_port}) -> api (:{cfg.api_port})",
        f"              it answered: {json.dumps(answer)}",
        f"  split:      api is 90 % v1 (:{cfg.api_port}), 10 % v2 (:{cfg.api_v2_port}, fails 10 % "
        "on purpose; a 503 is retried twice)",
    ]
    if token:
        lines.append(f"  token:      export MESH_HTTP_TOKEN={token}")
        lines.append(
            f"              (the management token; also in {cfg.data_dir / 'bootstrap-token'})"
        )
    lines += [
        f"  deny:       {mesh} intention create -replace -deny web api{addr_flag}"
        "      (the next call fails)",
        f"  allow:      {mesh} intention create -replace -allow web api{addr_flag}",
        f"  status:     {mesh} connect status{addr_flag}",
        f"  sidecar:    {mesh} proxy-config web{addr_flag}",
        f"  REST API:   {cfg.http_url}/api/  (docs: {cfg.http_url}/api/docs/)",
        f"  Consul API: {cfg.http_url}/v1/  (export CONSUL_HTTP_ADDR={cfg.http_addr})",
        f"  agent:      http://{cfg.agent_http_addr}/v1/agent/services, "
        f"metrics http://{cfg.agent_metrics_addr}/metrics",
        f"  logs:       {cfg.dev_dir}/*.log",
        f"  traffic:    {cfg.traffic_rate:g} calls a second to web (log {cfg.dev_dir / 'traffic.log'})"
        if cfg.traffic_rate
        else "  traffic:    none generated (--traffic-rate 0)",
        f"  top:        {mesh} top{addr_flag}      (live requests/s, success rate, latency)",
        f"  metrics:    {cfg.http_url}/api/metrics/services/api  and  {cfg.http_url}/api/metrics/edges",
        f"  access log: {cfg.agent_dir / 'access-logs'}/<proxy-id>.log  (one JSON line per request)",
        "  traces:     start mesh dev with OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:4318 to export spans",
        "",
    ]
    if cfg.datacenters > 1:
        lines[-1:-1] = [
            f"  dc2:        api-dc2 (:{cfg.dc2_api_port}) behind node dev-dc2; mesh gateways "
            f"dc1 :{cfg.gateway_port}, dc2 :{cfg.dc2_gateway_port}",
            f"  failover:   touch {cfg.fail_file}   (dc1's api fails its check: calls go to "
            "dc2 through both gateways; rm it to come back)",
            f"  gateways:   {mesh} gateway list{addr_flag}; {mesh} gateway routes -node dev{addr_flag}",
        ]
    return "\n".join(lines)


def _say(text: str) -> None:
    print(f"mesh dev: {text}", flush=True)


def _free(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    with socket.socket() as s:
        # As the servers bind: connections of a previous run in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]") or "127.0.0.1", int(port)))
        except OSError:
            return False
    return True


# flag -> (DevConfig field, default). A flag left at its default whose port is
# taken gets a free port instead; one given explicitly must be free.
PORT_FLAGS: dict[str, tuple[str, str | int]] = {
    "--http-addr": ("http_addr", "127.0.0.1:8500"),
    "--grpc-addr": ("grpc_addr", "127.0.0.1:8502"),
    "--dns-addr": ("dns_addr", "127.0.0.1:8600"),
    "--agent-http-addr": ("agent_http_addr", "127.0.0.1:8510"),
    "--agent-metrics-addr": ("agent_metrics_addr", "127.0.0.1:9102"),
    "--web-port": ("web_port", 9090),
    "--api-port": ("api_port", 9091),
    "--upstream-port": ("upstream_port", 9191),
    "--web-sidecar-port": ("web_sidecar_port", 21000),
    "--api-sidecar-port": ("api_sidecar_port", 21001),
    "--api-v2-port": ("api_v2_port", 9092),
    "--api-v2-sidecar-port": ("api_v2_sidecar_port", 21002),
}
# With `--datacenters 2`, these too.
DC2_PORT_FLAGS: dict[str, tuple[str, str | int]] = {
    "--gateway-port": ("gateway_port", 8443),
    "--dc2-gateway-port": ("dc2_gateway_port", 8444),
    "--dc2-agent-http-addr": ("dc2_agent_http_addr", "127.0.0.1:8511"),
    "--dc2-agent-metrics-addr": ("dc2_agent_metrics_addr", "127.0.0.1:9103"),
    "--dc2-api-port": ("dc2_api_port", 9093),
    "--dc2-api-sidecar-port": ("dc2_api_sidecar_port", 21003),
}


def _free_port(host: str, taken: set[int], udp: bool = False) -> int:
    """A port free on `host` (TCP, and UDP too when `udp`), not one already chosen."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port in taken:
            continue
        if udp:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((host, port))
            except OSError:
                continue
        return port
    raise DevError(f"no free port on {host}")


def choose_ports(
    given: dict[str, str | int | None], flags: dict[str, tuple[str, str | int]] | None = None
) -> tuple[dict[str, str | int], list[str]]:
    """Each flag's value: as given, else its default, else (default taken) a free port.

    `given` maps a flag to its value, None when not given. Returns the values
    by DevConfig field and a line for each port that was moved.
    """
    values: dict[str, str | int] = {}
    moved: list[str] = []
    taken: set[int] = set()
    for flag, (field_name, default) in (flags or PORT_FLAGS).items():
        value = given.get(flag)
        if value is None:
            value = default
            if value != "":
                addr = value if isinstance(value, str) else f"127.0.0.1:{value}"
                if not _free(addr) or _port(addr) in taken:
                    host = addr.rpartition(":")[0].strip("[]") or "127.0.0.1"
                    port = _free_port(host, taken, udp=flag == "--dns-addr")
                    value = f"{host}:{port}" if isinstance(value, str) else port
                    moved.append(f"{addr} is in use; {flag} {value}")
        if value != "":
            taken.add(_port(value if isinstance(value, str) else f"127.0.0.1:{value}"))
        values[field_name] = value
    return values, moved


def _port(addr: str) -> int:
    return int(addr.rpartition(":")[2])


def mesh_command() -> str:
    """How to run this very `mesh` from a shell: `mesh` when that is the one on PATH,
    else the full path of the venv's script (an inactive venv has no `mesh` on PATH)."""
    here = Path(sys.executable).parent / "mesh"
    on_path = shutil.which("mesh")
    if here.exists():
        if on_path and Path(on_path).resolve() == here.resolve():
            return "mesh"
        return str(here)
    return f"{sys.executable} -m meshweb.cli"


def check_ports(cfg: DevConfig) -> None:
    """Fail before starting anything when a port is taken (a second `mesh dev`, say)."""
    wanted = {
        "--http-addr": cfg.http_addr,
        "--grpc-addr": cfg.grpc_addr,
        "--agent-http-addr": cfg.agent_http_addr,
        "--agent-metrics-addr": cfg.agent_metrics_addr,
        "--web-port": f"127.0.0.1:{cfg.web_port}",
        "--api-port": f"127.0.0.1:{cfg.api_port}",
        "--upstream-port": f"127.0.0.1:{cfg.upstream_port}",
        "--web-sidecar-port": f"127.0.0.1:{cfg.web_sidecar_port}",
        "--api-sidecar-port": f"127.0.0.1:{cfg.api_sidecar_port}",
        "--api-v2-port": f"127.0.0.1:{cfg.api_v2_port}",
        "--api-v2-sidecar-port": f"127.0.0.1:{cfg.api_v2_sidecar_port}",
    }
    if cfg.dns_addr:
        wanted["--dns-addr"] = cfg.dns_addr
    if cfg.datacenters > 1:
        for flag, (field_name, _default) in DC2_PORT_FLAGS.items():
            value = getattr(cfg, field_name)
            wanted[flag] = value if isinstance(value, str) else f"127.0.0.1:{value}"
    taken = [f"{flag} {addr}" for flag, addr in wanted.items() if not _free(addr)]
    if taken:
        raise DevError(
            "already in use: " + ", ".join(taken) + " (is another `mesh dev` running? "
            "Each of these is a flag.)"
        )


def run(args: argparse.Namespace) -> int:
    """Start the dev mesh, print how to use it, run until Ctrl-C; the exit code."""
    from meshweb.commands.base import ApiError, ConnectError

    if args.datacenters not in (1, 2):
        print("mesh dev: --datacenters must be 1 or 2", file=sys.stderr)
        return 2
    flags = {**PORT_FLAGS, **(DC2_PORT_FLAGS if args.datacenters == 2 else {})}
    values, moved = choose_ports(
        {flag: getattr(args, field_name, None) for flag, (field_name, _d) in flags.items()}, flags
    )
    if not 0 <= args.traffic_rate <= 1000:
        print("mesh dev: --traffic-rate must be within 0..1000", file=sys.stderr)
        return 2
    cfg = DevConfig(
        data_dir=Path(args.data_dir).expanduser().resolve(),
        datacenters=args.datacenters,
        traffic_rate=args.traffic_rate,
        **values,  # type: ignore[arg-type]
    )
    for line in moved:
        _say(line)
    mesh = DevMesh(cfg)

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    code = 0
    try:
        check_ports(cfg)
        mesh.start()
        code = mesh.wait()
    except KeyboardInterrupt:
        code = 0
    except (DevError, ApiError, ConnectError) as exc:
        print(f"mesh dev: {exc}", file=sys.stderr)
        code = 1
    finally:
        # A second Ctrl-C during shutdown must not leave children behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if mesh.children:
            _say("stopping ...")
        mesh.stop()
        if mesh.children:
            _say("stopped")
    return code


def register(sub: argparse._SubParsersAction) -> None:
    """Add `dev` to the `mesh` subcommands."""
    p = sub.add_parser(
        "dev",
        help="run a whole mesh locally: control plane, agent, demo web and api with sidecars",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    env = os.environ.get
    p.add_argument(
        "--data-dir",
        default=env("MESH_DATA_DIR") or ".data",
        help="data directory (env MESH_DATA_DIR, default ./.data); dev state in <data-dir>/dev",
    )
    p.add_argument(
        "--http-addr",
        default=env("MESH_HTTP_ADDR") or None,
        help="control plane HTTP (env MESH_HTTP_ADDR, default 127.0.0.1:8500)",
    )
    p.add_argument(
        "--grpc-addr",
        default=env("MESH_GRPC_ADDR") or None,
        help="control plane agent protocol (env MESH_GRPC_ADDR, default 127.0.0.1:8502)",
    )
    p.add_argument(
        "--dns-addr",
        default=env("MESH_DNS_ADDR"),
        help="control plane DNS, '' to disable (env MESH_DNS_ADDR, default 127.0.0.1:8600)",
    )
    p.add_argument(
        "--agent-http-addr",
        default=None,
        help="the agent's local API (default 127.0.0.1:8510)",
    )
    p.add_argument(
        "--agent-metrics-addr",
        default=None,
        help="the agent's Prometheus metrics (default 127.0.0.1:9102)",
    )
    p.add_argument("--web-port", type=int, default=None, help="web's port (default 9090)")
    p.add_argument("--api-port", type=int, default=None, help="api v1's port (default 9091)")
    p.add_argument(
        "--upstream-port",
        type=int,
        default=None,
        help="web's sidecar listener for api (default 9191)",
    )
    p.add_argument(
        "--web-sidecar-port",
        type=int,
        default=None,
        help="web's sidecar inbound port (default 21000)",
    )
    p.add_argument(
        "--api-sidecar-port",
        type=int,
        default=None,
        help="api v1's sidecar inbound port (default 21001)",
    )
    p.add_argument("--api-v2-port", type=int, default=None, help="api v2's port (default 9092)")
    p.add_argument(
        "--api-v2-sidecar-port",
        type=int,
        default=None,
        help="api v2's sidecar inbound port (default 21002)",
    )
    p.add_argument(
        "--traffic-rate",
        type=float,
        default=5.0,
        help="generated calls a second to web (default 5; 0: none)",
    )
    p.add_argument(
        "--datacenters",
        "-datacenters",
        type=int,
        default=1,
        help="1, or 2 for a second datacenter (dc2) with its own agent, api and mesh "
        "gateway, dc1's gateway, and api failing over to dc2 (default 1)",
    )
    for flag, (field_name, default) in DC2_PORT_FLAGS.items():
        p.add_argument(
            flag,
            dest=field_name,
            type=type(default),
            default=None,
            help=f"with two datacenters (default {default})",
        )
    p.set_defaults(func=run)
