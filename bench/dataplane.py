#!/usr/bin/env python
"""Data-plane benchmark: the sidecar pair against direct and an HAProxy pair.

Prints figures, asserts nothing. A 1 KiB response over keep-alive HTTP/1.1
from Debian's nginx (`worker_processes 1`, access log off, its own config in a
temp dir) on 127.0.0.1, loaded from separate processes:

- `wrk -t1 -c<connections>` for maximum throughput (req/s);
- `h2load --h1 -c<clients> --rps <rate/clients>` for latency p50 / p99 at a
  fixed rate (default 1,000 req/s), clients started 1 ms apart so requests
  are spread evenly, per-request times from h2load's `--log-file`.

Three topologies, run interleaved for `--rounds` rounds (medians printed):

- `direct`:  client -> nginx;
- `sidecar`: client -> client-side `mesh-sidecar` (upstream listener) -> mTLS
  -> server-side `mesh-sidecar` (inbound) -> nginx. The real thing: a `mesh
  server` (embedded SQLite, ACLs off) and one `mesh agent` on loopback with
  two services, `client` (an upstream to `server`) and `server` (nginx's
  port), and an allow intention; the agent spawns and configures both
  sidecars, whose PIDs come from the agent's pid files;
- `haproxy`: Debian's haproxy, two processes (`mode tcp`, `nbthread 1`), the
  client side originating mTLS (`ssl crt client.pem ca-file roots.pem verify
  required`), the server side terminating it (`bind ... ssl crt server.pem
  ca-file roots.pem verify required`), with leaves for `client` and `server`
  from the same control plane's CA (`/v1/agent/connect/ca/leaf/<service>`).

`--mode` picks what the pairs proxy (the L4 figures above are `--mode tcp`,
the default):

- `http`: the service is `http` (a `service-defaults` entry `Protocol: http`
  written to the control plane): the sidecars run their HTTP/1.1 proxy
  (parse, route, pool, re-frame); HAProxy runs `mode http` with the same mTLS
  (ALPN http/1.1 between the pair). Same load tools (wrk, h2load --h1);
- `h2`: the service is `http2`: the client speaks h2c (prior knowledge) to the
  client-side proxy, the pair speaks HTTP/2 over mTLS (ALPN h2), and the
  server side speaks h2c to a second nginx listener (`listen ... http2`).
  HAProxy: `mode http`, `alpn h2` between the pair, `proto h2` to nginx.
  Throughput is measured with h2load (`-c<connections> -m1`, no wrk), latency
  with h2load over h2; the memory figure is skipped.

Proxy CPU per request: utime+stime of both proxies of a pair from
/proc/<pid>/stat before and after each measured run, divided by the requests
the run completed. Memory: the sidecars' VmRSS idle and with `--hold` (1,000)
keep-alive connections opened through the client sidecar (each one request
deep, so each is an established mTLS connection between the sidecars).

Run from the repository root (tools: `scripts/install-bench-tools`):

    .venv/bin/python bench/dataplane.py [--rounds 3] [--duration 10]

Progress goes to stderr, figures to stdout. Every process started here (nginx,
haproxy, the server, the agent and its sidecars) and the temp dir are removed
at the end, also on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/dataplane.py`, the script's folder comes first on sys.path.
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "bench":
    sys.path.pop(0)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY_SIZE = 1024
PATH = "/1k"
TOPOLOGIES = ("direct", "sidecar", "haproxy")
TOOLS = ("nginx", "wrk", "h2load", "haproxy")

# The aims, and its reference figures for an HAProxy pair on this machine.
AIM_THROUGHPUT_VS_HAPROXY = 0.8
AIM_ADDED_P99_MS = 0.6
AIM_CPU_US = 60.0
AIM_IDLE_RSS_MB = 20.0
AIM_PER_CONN_KIB = 32.0


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tool(name: str) -> str:
    """Absolute path of a Debian tool (nginx and haproxy live in /usr/sbin)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        raise SystemExit(
            f"dataplane: {name} not found; install the bench tools with "
            "scripts/install-bench-tools (as root)"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_times(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) in clock ticks (fields 14 and 15 of /proc/<pid>/stat, all
    threads), summed over `pids`."""
    user = system = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def per_request_us(before: tuple[int, int], after: tuple[int, int], requests: int) -> dict:
    """CPU µs per request between two `cpu_times` readings: total and kernel part."""
    user, system = after[0] - before[0], after[1] - before[1]
    scale = 1e6 / CLK_TCK / max(1, requests)
    return {"cpu_us": (user + system) * scale, "sys_us": system * scale}


def machine_busy_ticks() -> int:
    """CPU ticks the whole machine spent busy (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def own_ticks() -> int:
    """CPU ticks of this process and all its descendants, live and reaped (the
    server, the agent, its sidecars, nginx, haproxy, wrk, h2load)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(d.name)] = int(fields[1])
        ticks[int(d.name)] = int(fields[11]) + int(fields[12])
    me = os.getpid()
    ours = {me}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(ticks.get(p, 0) for p in ours) + round((reaped.ru_utime + reaped.ru_stime) * CLK_TCK)


class Others:
    """Cores used by processes other than this benchmark's during a run: the
    machine's busy time minus ours. Other work skews every figure; this says how much."""

    def __enter__(self) -> Others:
        self.t0, self.busy0, self.own0 = time.monotonic(), machine_busy_ticks(), own_ticks()
        return self

    def __exit__(self, *exc) -> None:
        elapsed = time.monotonic() - self.t0
        foreign = (machine_busy_ticks() - self.busy0) - (own_ticks() - self.own0)
        self.cores = max(0.0, foreign / CLK_TCK / max(elapsed, 1e-9))


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or RssAnon, RssFile) of `pid` in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_split(pid: int) -> dict[str, int]:
    """VmRSS and its private (anonymous) and file-backed parts, KiB. The file
    part is mostly shared libraries (libpython, libcrypto), shared with every
    process that maps them."""
    return {k: rss_kib(pid, k) for k in ("VmRSS", "RssAnon", "RssFile")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def get(port: int, timeout: float = 2.0) -> bytes:
    """One plain HTTP/1.1 GET of PATH on 127.0.0.1:port; the body (raises on failure)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {PATH} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head[:80].decode(errors="replace"))
    return body


def wait_serving(port: int, timeout: float, what: str, proc_check=None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc_check is not None:
            proc_check()
        try:
            if len(get(port)) == BODY_SIZE:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not serve {PATH} on port {port} within {timeout}s: {last}")


# ----------------------------------------------------------------------------- processes


@dataclass
class Stack:
    """Everything started here, torn down in reverse order by `close()`."""

    tmp: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    stray_pids: list[tuple[str, int]] = field(default_factory=list)  # sidecars (own sessions)
    closers: list = field(default_factory=list)

    def spawn(self, label: str, argv: list[str], **kw) -> subprocess.Popen:
        log = open(self.tmp / f"{label}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the children
            **kw,
        )
        log.close()
        self.procs.append((label, proc))
        return proc

    def check(self, label: str, proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"{label} exited with {proc.returncode}:\n{self.log(label)}")

    def log(self, label: str) -> str:
        try:
            return (self.tmp / f"{label}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                closer()
        for label, pid in self.stray_pids:
            if alive(pid):
                progress(f"stopping leftover {label} (pid {pid})")
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
        for _label, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _label, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for label, proc in self.procs:
            if proc.poll() is None:
                progress(f"killing {label} (pid {proc.pid})")
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        for label, pid in self.stray_pids:
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(pid):
                progress(f"killing leftover {label} (pid {pid})")
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def start_nginx(stack: Stack) -> tuple[int, list[int], int]:
    """nginx serving a 1 KiB file on a free port; (port, [worker pid], h2c port)."""
    d = stack.tmp / "nginx"
    (d / "tmp").mkdir(parents=True)
    # nginx's worker drops root for an unprivileged user: let it reach its files.
    stack.tmp.chmod(0o711)
    d.chmod(0o755)
    (d / "1k").write_bytes(b"x" * BODY_SIZE)
    port = free_port()
    h2_port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  open_file_cache max=16;
  # Keep-alive for the whole run: nginx's default (1,000 requests) would close
  # every proxied connection, and the pairs would re-handshake mTLS each time.
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  client_body_temp_path {d}/tmp;
  proxy_temp_path {d}/tmp;
  fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp;
  scgi_temp_path {d}/tmp;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {d};
    location = {PATH} {{ }}
  }}
  # h2c with prior knowledge, for --mode h2.
  http2_max_requests 100000000;
  server {{
    listen 127.0.0.1:{h2_port} http2 backlog=4096;
    # Frames are small writes: no sendfile/cork (they held responses back ~40 ms).
    sendfile off;
    tcp_nopush off;
    root {d};
    location = {PATH} {{ }}
  }}
}}
"""
    )
    proc = stack.spawn(
        "nginx", [tool("nginx"), "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")]
    )
    wait_serving(port, 10, "nginx", lambda: stack.check("nginx", proc))
    workers = [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
    ]
    return port, workers, h2_port


@dataclass
class ControlPlane:
    server: object  # tests.support.servers.MeshServer
    roots_pem: str
    leaves: dict[str, tuple[str, str]]  # service -> (cert PEM, key PEM)


def start_control_plane(stack: Stack) -> ControlPlane:
    """A real `mesh server` (embedded SQLite, ACLs off) and leaves from its CA."""
    # This benchmark's control plane is always the embedded default.
    for var in ("DATABASE_URL", "REDIS_URL"):
        os.environ.pop(var, None)
    from tests.support.servers import make_server

    # Its background task loop ticks every 5 s rather than the tests' 0.2 s: a
    # periodic wake-up of a busy process shows in the proxies' latency tails.
    server = make_server(
        stack.tmp / "server", acl=False, redis=False, extra_env={"MESH_TASK_TICK_SECONDS": "5"}
    )
    stack.closers.append(server.close)
    with server.client() as http:
        roots = http.get("/v1/connect/ca/roots")
        roots.raise_for_status()
        roots_pem = "".join(
            r["RootCert"].strip()
            + "\n"
            + "".join(c.strip() + "\n" for c in r.get("IntermediateCerts") or [])
            for r in roots.json()["Roots"]
        )
        leaves = {}
        for service in ("client", "server"):
            r = http.get(f"/v1/agent/connect/ca/leaf/{service}")
            r.raise_for_status()
            leaves[service] = (r.json()["CertPEM"], r.json()["PrivateKeyPEM"])
    return ControlPlane(server, roots_pem, leaves)


def start_haproxy(
    stack: Stack, cp: ControlPlane, nginx_port: int, mode: str = "tcp"
) -> tuple[int, list[int]]:
    """The HAProxy pair; (client-side port, [client-side pid, server-side pid]).
    `mode`: tcp (L4), http (mode http, HTTP/1.1 between) or h2 (mode http,
    HTTP/2 between and to nginx's h2c listener)."""
    d = stack.tmp / "haproxy"
    d.mkdir()
    roots = d / "roots.pem"
    roots.write_text(cp.roots_pem)
    pems = {}
    for service, (cert, key) in cp.leaves.items():
        pems[service] = d / f"{service}.pem"
        pems[service].write_text(cert.strip() + "\n" + key.strip() + "\n")
        pems[service].chmod(0o600)
    inbound, outbound = free_port(), free_port()
    common = (
        "global\n  nbthread 1\n  maxconn 8000\n"
        f"defaults\n  mode {'tcp' if mode == 'tcp' else 'http'}\n  timeout connect 5s\n"
        "  timeout client 10m\n  timeout server 10m\n"
    )
    if mode != "tcp":
        common += "  http-reuse always\n  option http-keep-alive\n"
    alpn = {"tcp": "", "http": " alpn http/1.1", "h2": " alpn h2"}[mode]
    bind_alpn = "" if mode == "tcp" else " alpn h2,http/1.1"
    app_proto = " proto h2" if mode == "h2" else ""
    configs = {
        "haproxy-client": common
        + (
            f"frontend upstream\n  bind 127.0.0.1:{outbound}\n  default_backend server\n"
            f"backend server\n  server server 127.0.0.1:{inbound} ssl crt {pems['client']} "
            f"ca-file {roots} verify required{alpn}\n"
        ),
        "haproxy-server": common
        + (
            f"frontend inbound\n  bind 127.0.0.1:{inbound} ssl crt {pems['server']} "
            f"ca-file {roots} verify required{bind_alpn}\n  default_backend app\n"
            f"backend app\n  server nginx 127.0.0.1:{nginx_port}{app_proto}\n"
        ),
    }
    pids = []
    for label, text in configs.items():
        path = d / f"{label}.cfg"
        path.write_text(text)
        check = subprocess.run(
            [tool("haproxy"), "-c", "-q", "-f", str(path)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"{label}: invalid config:\n{check.stdout}{check.stderr}")
        proc = stack.spawn(label, [tool("haproxy"), "-db", "-f", str(path)])
        pids.append(proc.pid)
    procs = dict(stack.procs)
    wait_serving(
        outbound,
        10,
        "the HAProxy pair",
        lambda: [stack.check(label, procs[label]) for label in configs],
    )
    return outbound, pids


def start_sidecars(
    stack: Stack,
    cp: ControlPlane,
    nginx_port: int,
    timeout: float,
    mode: str = "tcp",
    local_port: int | None = None,
) -> tuple[int, list[int]]:
    """A real `mesh agent` with `client` and `server`; (upstream port, [client pid, server pid])."""
    from tests.agents.conftest import MeshAgent, join_token

    server = cp.server
    upstream_port = free_port()
    token, pin = join_token(server)
    base = stack.tmp / "agent"
    agent = MeshAgent(
        server,
        base / "data",
        base / "config.d",
        "bench-node",
        token=token,
        pin=pin,
        # A full sync every 30 s (the default), not the tests' every second.
        extra=["-sync-interval", "30s", "-log-level", "warning"],
    )
    agent.config_dir.mkdir(parents=True)
    definitions = {
        "client": {
            "name": "client",
            "port": free_port(),  # no app behind it: the bench's load generators are the client
            "connect": {
                "sidecar_service": {
                    "port": free_port(),
                    "proxy": {
                        "upstreams": [
                            {"destination_name": "server", "local_bind_port": upstream_port}
                        ]
                    },
                }
            },
        },
        "server": {
            "name": "server",
            "port": nginx_port,
            # --mode h2: the service stays registered (and health-checked) on
            # nginx's HTTP/1.1 port; its sidecar talks h2c to the h2 listener.
            "connect": {
                "sidecar_service": {
                    "port": free_port(),
                    **({"proxy": {"local_service_port": local_port}} if local_port else {}),
                }
            },
        },
    }
    for name, definition in definitions.items():
        (agent.config_dir / f"{name}.json").write_text(json.dumps({"service": definition}))
    with server.client() as http:
        r = http.put(
            "/v1/connect/intentions/exact",
            params={"source": "client", "destination": "server"},
            json={"Action": "allow"},
        )
        r.raise_for_status()
        if mode != "tcp":
            protocol = "http2" if mode == "h2" else "http"
            r = http.put(
                "/v1/config",
                json={"Kind": "service-defaults", "Name": "server", "Protocol": protocol},
            )
            r.raise_for_status()
    stack.closers.append(agent.stop)
    agent.start(wait=False)
    pid_dir = agent.data_dir / "sidecars"
    pids: dict[str, int] = {}

    def check() -> None:
        if agent.proc.poll() is not None:
            raise RuntimeError(f"mesh agent exited {agent.proc.returncode}:\n{agent.log()}")
        for proxy in ("client-sidecar-proxy", "server-sidecar-proxy"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                pid = json.loads((pid_dir / f"{proxy}.pid").read_text())["pid"]
                if pids.get(proxy) != pid:
                    pids[proxy] = pid
                    stack.stray_pids.append((proxy, pid))

    wait_serving(upstream_port, timeout, "the sidecar pair", check)
    check()
    # The first successful call proves both sidecars are configured; their pids
    # are the ones serving now (a sidecar restarted meanwhile would have a new one).
    return upstream_port, [pids["client-sidecar-proxy"], pids["server-sidecar-proxy"]]


# ----------------------------------------------------------------------------- load


@dataclass
class Topology:
    name: str
    port: int
    proxy_pids: list[int]


def run_wrk(
    port: int, connections: int, duration: float, pids: list[int], nginx: list[int]
) -> dict:
    """Maximum throughput: wrk, one thread, `connections` keep-alive connections."""
    before, nginx_before = cpu_times(pids), cpu_times(nginx)
    out = subprocess.run(
        [
            tool("wrk"),
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--timeout",
            "5s",
            f"http://127.0.0.1:{port}{PATH}",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    after, nginx_after = cpu_times(pids), cpu_times(nginx)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", out.stdout)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if not m or not rps:
        raise RuntimeError(f"cannot read wrk's output:\n{out.stdout}")
    requests = int(m.group(1))
    errors = 0
    if e := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out.stdout
    ):
        errors += sum(int(x) for x in e.groups())
    if e := re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout):
        errors += int(e.group(1))
    return {
        "rps": float(rps.group(1)),
        "requests": requests,
        "errors": errors,
        **per_request_us(before, after, requests),
        "nginx_cpu_us": per_request_us(nginx_before, nginx_after, requests)["cpu_us"],
    }


def run_h2load(
    port: int,
    rate: int,
    clients: int,
    duration: float,
    warmup: float,
    pids: list[int],
    log: Path,
    h2: bool = False,
) -> dict:
    """Latency at a fixed rate: h2load over HTTP/1.1, `clients` keep-alive
    connections at rate/clients req/s each, started 1 ms apart so requests are
    spread over time rather than fired in bursts of `clients`. The first
    `warmup` seconds of requests are left out of the percentiles."""
    total = int(rate * (duration + warmup))
    with contextlib.suppress(FileNotFoundError):
        log.unlink()
    before = cpu_times(pids)
    out = subprocess.run(
        [
            tool("h2load"),
            *([] if h2 else ["--h1"]),
            "-c",
            str(clients),
            "-n",
            str(total),
            "--rps",
            str(rate // clients),
            "-r",
            "1",
            "--rate-period",
            "1ms",
            "-T",
            "10s",
            "--log-file",
            str(log),
            f"http://127.0.0.1:{port}{PATH}",
        ],
        capture_output=True,
        text=True,
        timeout=duration + warmup + 60,
    )
    after = cpu_times(pids)
    if out.returncode != 0:
        raise RuntimeError(f"h2load failed ({out.returncode}): {out.stderr or out.stdout}")
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
        out.stdout,
    )
    if not m:
        raise RuntimeError(f"cannot read h2load's output:\n{out.stdout}")
    done, succeeded = int(m.group(3)), int(m.group(4))
    rows = []
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1] == "200":
            rows.append((int(parts[0]), int(parts[2])))
    if not rows:
        raise RuntimeError(f"h2load logged no successful request:\n{out.stdout}")
    first = min(start for start, _ in rows)
    cut = first + warmup * 1e6
    lat = sorted(us for start, us in rows if start >= cut)
    span = (max(s for s, _ in rows) - cut) / 1e6 if lat else 0.0

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1e3

    return {
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": lat[-1] / 1e3,
        "measured": len(lat),
        "achieved_rps": len(lat) / span if span > 0 else float("nan"),
        "errors": total - succeeded,
        **per_request_us(before, after, done),
    }


def run_h2load_max(
    port: int, connections: int, duration: float, pids: list[int], nginx: list[int]
) -> dict:
    """Maximum throughput over HTTP/2 (h2c): h2load, one thread, `connections`
    connections, one stream each at a time (as wrk's one request per connection)."""
    before, nginx_before = cpu_times(pids), cpu_times(nginx)
    out = subprocess.run(
        [
            tool("h2load"),
            "-c",
            str(connections),
            "-m",
            "1",
            "-D",
            f"{duration:g}",
            "-T",
            "5s",
            f"http://127.0.0.1:{port}{PATH}",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    after, nginx_after = cpu_times(pids), cpu_times(nginx)
    if out.returncode != 0:
        raise RuntimeError(f"h2load failed ({out.returncode}): {out.stderr or out.stdout}")
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", out.stdout)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out.stdout)
    if not m or not rps:
        raise RuntimeError(f"cannot read h2load's output:\n{out.stdout}")
    done, succeeded = int(m.group(3)), int(m.group(4))
    return {
        "rps": float(rps.group(1)),
        "requests": done,
        "errors": done - succeeded,
        **per_request_us(before, after, done),
        "nginx_cpu_us": per_request_us(nginx_before, nginx_after, done)["cpu_us"],
    }


# ----------------------------------------------------------------------------- memory


HOLD_CODE = r"""
import selectors, socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
req = b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n"
socks, opened = [], 0
deadline = time.monotonic() + 120
def read_response(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
# In batches of 50: connect, send, then read each answer (the pair handshakes in parallel).
while len(socks) < n and time.monotonic() < deadline:
    batch = []
    for _ in range(min(50, n - len(socks))):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(req)
        batch.append(s)
    for s in batch:
        read_response(s)
    socks.extend(batch)
print(len(socks), flush=True)
sys.stdin.read()
"""


FLOOR_CODE = r"""
import asyncio, json, re, ssl, uvloop
async def main():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    await asyncio.sleep(0.3)
    status = open("/proc/self/status").read()
    print(json.dumps({k: int(re.search(k + r":\s+(\d+)", status).group(1))
                      for k in ("VmRSS", "RssAnon", "RssFile")}))
    server.close()
uvloop.run(main())
"""


def rss_floor() -> dict[str, int] | None:
    """RSS of the least a uvloop + ssl process holds (the sidecar's interpreter): for scale."""
    out = subprocess.run(
        [sys.executable, "-c", FLOOR_CODE], capture_output=True, text=True, timeout=30
    )
    try:
        return json.loads(out.stdout)
    except ValueError:
        return None


def hold_connections(stack: Stack, port: int, n: int, pids: list[int]) -> dict:
    """VmRSS of `pids` idle, with `n` keep-alive connections open through `port`
    (one request each), and after they closed."""
    time.sleep(1.0)
    idle = [rss_split(p) for p in pids]
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_CODE, str(n), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            proc.kill()
            raise RuntimeError(
                f"holding {n} connections failed: {line}{proc.stderr.read()[-2000:]}"
            )
        opened = int(line)
        time.sleep(1.0)
        loaded = [rss_split(p) for p in pids]
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    time.sleep(1.0)
    after = [rss_split(p) for p in pids]
    return {"idle": idle, "loaded": loaded, "after": after, "open": opened}


# ----------------------------------------------------------------------------- profiling


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not found:
        raise SystemExit(
            "dataplane: --profile needs py-spy (not a project dependency): "
            ".venv/bin/pip install py-spy"
        )
    return found


def sampler_argv(kind: str, pid: int, path: Path, rate: int) -> list[str]:
    if kind == "py-spy":
        # Native frames show the C under each Python frame (OpenSSL, uvloop, libc).
        argv = [py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--native"]
        return argv + ["--format", "raw", "--output", str(path)]
    perf = shutil.which("perf") or "perf"
    return [perf, "record", "-F", str(rate * 5), "-g", "-q", "-o", str(path), "-p", str(pid)]


def profile_sidecars(
    args: argparse.Namespace, stack: Stack, t: Topology, nginx: list[int]
) -> list[dict]:
    """Extra sidecar runs (not in the medians), one per sampler and load kind:
    `perf record` (on-CPU samples, kernel included: where the CPU goes by
    library) and `py-spy record --native` (which Python code), each attached
    to both sidecars. Files in `args.profile`."""
    args.profile.mkdir(parents=True, exist_ok=True)
    kinds = ["perf", "py-spy"] if shutil.which("perf") else ["py-spy"]
    out: list[dict] = []
    for kind in kinds:
        for phase in ("max", "rate"):
            samplers = []
            for side, pid in zip(("client", "server"), t.proxy_pids, strict=True):
                ext = "data" if kind == "perf" else "txt"
                path = args.profile / f"{kind}-{side}-{phase}.{ext}"
                proc = subprocess.Popen(
                    sampler_argv(kind, pid, path, args.profile_rate),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                samplers.append((side, path, proc))
            time.sleep(1.0)  # attached
            progress(f"profiling the sidecars with {kind} at {phase} load")
            if phase == "max" and args.mode == "h2":
                run = run_h2load_max(t.port, args.connections, args.duration, t.proxy_pids, nginx)
            elif phase == "max":
                run = run_wrk(t.port, args.connections, args.duration, t.proxy_pids, nginx)
            else:
                run = run_h2load(
                    t.port,
                    args.rate,
                    args.clients,
                    args.duration,
                    args.warmup,
                    t.proxy_pids,
                    stack.tmp / "h2load.log",
                    h2=args.mode == "h2",
                )
            for side, path, proc in samplers:
                proc.send_signal(signal.SIGINT)  # both write their output on Ctrl-C
                try:
                    _, err = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate()
                if not path.exists():
                    raise RuntimeError(f"{kind} wrote no profile for the {side} sidecar: {err}")
                out.append(
                    {"kind": kind, "side": side, "phase": phase, "path": str(path), "run": run}
                )
    return out


IDLE_LEAVES = ("epoll_wait", "epoll_pwait")


def summarize_py_spy(path: Path, top: int = 16) -> list[str]:
    """The Python functions (and the C they call) with most samples, idle left out."""
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f]
        if not frames:
            continue
        if frames[-1].startswith(IDLE_LEAVES):  # waiting in the loop's poll: not CPU
            idle += n
            continue
        total += n
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return ["  (no samples)"]
    lines = [
        f"  {total} samples ({idle} in epoll left out); by self (py-spy stops the process to "
        "sample, which over-weights system calls: perf's split is the CPU's):"
    ]
    for f, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / total:5.1f}%  {f[:110]}")
    lines.append("  by total, Python functions (the function and what it calls):")
    py = {f: n for f, n in incl.items() if ".py)" in f or "(mesh-sidecar)" in f}
    for f, n in sorted(py.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / total:5.1f}%  {f[:110]}")
    return lines


def summarize_perf(path: Path, top: int = 16) -> list[str]:
    """On-CPU samples by library, then by symbol (self time)."""
    lines = []
    for sort, limit in (("dso", 10), ("dso,sym", top)):
        rep = subprocess.run(
            ["perf", "report", "-i", str(path), "--stdio", "--no-children", "-q", "-g", "none"]
            + ["--sort", sort, "--percent-limit", "0.5"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        rows = [r.rstrip() for r in rep.stdout.splitlines() if r.strip() and "%" in r]
        lines.append(f"  by {'library' if sort == 'dso' else 'symbol (self)'}:")
        lines += ["    " + " ".join(r.split()) for r in rows[:limit]]
    return lines


# ----------------------------------------------------------------------------- main


def wait_for_quiet(limit: float, max_wait: float) -> None:
    load = os.getloadavg()[0]
    if load < limit or max_wait <= 0:
        return
    progress(
        f"1-minute load {load:.2f} >= {limit}: waiting up to {max_wait:.0f}s for a quieter machine"
    )
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline and os.getloadavg()[0] >= limit:
        time.sleep(2)
    progress(f"1-minute load now {os.getloadavg()[0]:.2f}")


def bench(args: argparse.Namespace, stack: Stack) -> dict:
    names = [n for n in args.topologies.split(",") if n]
    unknown = set(names) - set(TOPOLOGIES)
    if unknown:
        raise SystemExit(
            f"dataplane: unknown topologies {sorted(unknown)}; choose from {TOPOLOGIES}"
        )
    for t in TOOLS:
        tool(t)
    if args.profile:
        py_spy()
    if args.rate % args.clients:
        raise SystemExit("dataplane: --rate must be a multiple of --clients")
    load_at_start = os.getloadavg()
    t0 = time.monotonic()
    nginx_port, nginx_pids, nginx_h2 = start_nginx(stack)
    progress(f"nginx on 127.0.0.1:{nginx_port}, h2c :{nginx_h2} (worker {nginx_pids})")
    h2 = args.mode == "h2"
    app_port = nginx_h2 if h2 else nginx_port
    topo = {"direct": Topology("direct", app_port, [])}
    cp = None
    if "sidecar" in names or "haproxy" in names:
        progress("starting the control plane (mesh server)")
        cp = start_control_plane(stack)
    if "haproxy" in names:
        port, pids = start_haproxy(stack, cp, app_port, args.mode)
        topo["haproxy"] = Topology("haproxy", port, pids)
        progress(f"HAProxy pair serving on 127.0.0.1:{port} (pids {pids})")
    sidecar_idle_fresh = None
    if "sidecar" in names:
        progress("starting the agent; it spawns and configures both sidecars")
        port, pids = start_sidecars(
            stack, cp, nginx_port, args.setup_timeout, args.mode, nginx_h2 if h2 else None
        )
        topo["sidecar"] = Topology("sidecar", port, pids)
        progress(f"sidecar pair serving on 127.0.0.1:{port} (pids {pids})")
        time.sleep(1.0)
        sidecar_idle_fresh = [rss_split(p) for p in pids]
    progress(f"set up in {time.monotonic() - t0:.1f}s")

    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position
        for name in order:
            t = topo[name]
            for pid in t.proxy_pids:
                if not alive(pid):
                    raise RuntimeError(f"{name}: proxy pid {pid} died")
            load = os.getloadavg()[0]
            with Others() as o:
                if h2:
                    w = run_h2load_max(
                        t.port, args.connections, args.duration, t.proxy_pids, nginx_pids
                    )
                else:
                    w = run_wrk(t.port, args.connections, args.duration, t.proxy_pids, nginx_pids)
            w["others"] = o.cores
            with Others() as o:
                h = run_h2load(
                    t.port,
                    args.rate,
                    args.clients,
                    args.duration,
                    args.warmup,
                    t.proxy_pids,
                    stack.tmp / "h2load.log",
                    h2=h2,
                )
            h["others"] = o.cores
            run = {"load": load, "wrk": w, "h2load": h}
            runs[name].append(run)
            progress(
                f"round {r + 1}/{args.rounds} {name:<8} load {load:4.2f}: {w['rps']:>9,.0f} req/s "
                f"(proxy {w['cpu_us']:.1f} µs/req), at {args.rate:,} req/s p50 {h['p50_ms']:.3f} "
                f"p99 {h['p99_ms']:.3f} ms (proxy {h['cpu_us']:.1f} µs/req); other processes "
                f"used {w['others']:.2f} / {h['others']:.2f} cores"
                + (f", errors {w['errors']}+{h['errors']}" if w["errors"] or h["errors"] else "")
            )

    profiles = []
    if args.profile and "sidecar" in names:
        profiles = profile_sidecars(args, stack, topo["sidecar"], nginx_pids)

    memory = {}
    for name in ("sidecar", "haproxy"):
        if name in names and args.hold > 0 and not h2:
            progress(f"memory: {name} pair with {args.hold} open connections")
            memory[name] = hold_connections(
                stack, topo[name].port, args.hold, topo[name].proxy_pids
            )
    return {
        "names": names,
        "runs": runs,
        "memory": memory,
        "profiles": profiles,
        "sidecar_idle_fresh": sidecar_idle_fresh,
        "floor": rss_floor() if "sidecar" in names else None,
        "load_at_start": load_at_start,
        "elapsed": time.monotonic() - t0,
    }


def report(args: argparse.Namespace, res: dict) -> None:
    names, runs = res["names"], res["runs"]

    def med(name: str, tool_: str, key: str) -> float:
        return statistics.median(r[tool_][key] for r in runs[name])

    def spread(name: str, tool_: str, key: str, fmt: str) -> str:
        vals = [r[tool_][key] for r in runs[name]]
        return f"{fmt.format(min(vals))}–{fmt.format(max(vals))}"

    loads = [r["load"] for n in names for r in runs[n]]
    la = res["load_at_start"]
    print()
    what = {
        "tcp": "keep-alive HTTP/1.1, proxied at L4",
        "http": "keep-alive HTTP/1.1, proxied as HTTP/1.1 (mode http)",
        "h2": "HTTP/2 (h2c to the proxies and nginx, h2 over mTLS between them)",
    }[args.mode]
    print(
        f"data plane --mode {args.mode}: 1 KiB from nginx over {what}; {os.cpu_count()} cores; "
        f"medians of {args.rounds} interleaved rounds"
    )
    print(
        f"load average at start {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; 1-minute load before runs "
        f"{min(loads):.2f}–{max(loads):.2f}; whole run {res['elapsed']:.0f}s"
    )
    print(
        f"max throughput: {'h2load -m1' if args.mode == 'h2' else 'wrk -t1'} "
        f"-c{args.connections} -d{args.duration:g}s; latency: h2load{'' if args.mode == 'h2' else ' --h1'} "
        f"-c{args.clients} at {args.rate:,} req/s for {args.duration:g}s (+{args.warmup:g}s warm-up left out)"
    )
    print()
    cols = (
        ("max req/s", 10),
        ("(range)", 15),
        ("p50 ms", 7),
        ("p99 ms", 7),
        ("(p99 range)", 13),
        ("proxy µs/req", 12),
        ("proxy µs/req", 12),
        ("nginx µs/req", 12),
        ("others", 6),
        ("others", 6),
    )
    under = ("", "", "@rate", "@rate", "", "@max", "@rate", "@max", "@max", "@rate")
    print(f"{'topology':<9} " + " ".join(f"{c:>{w}}" for c, w in cols))
    print(f"{'':<9} " + " ".join(f"{u:>{w}}" for u, (_, w) in zip(under, cols, strict=True)))
    nan = float("nan")
    for n in names:
        proxied = n != "direct"
        print(
            f"{n:<9} {med(n, 'wrk', 'rps'):>10,.0f} {spread(n, 'wrk', 'rps', '{:,.0f}'):>15} "
            f"{med(n, 'h2load', 'p50_ms'):>7.3f} {med(n, 'h2load', 'p99_ms'):>7.3f} "
            f"{spread(n, 'h2load', 'p99_ms', '{:.2f}'):>13} "
            f"{(med(n, 'wrk', 'cpu_us') if proxied else nan):>12.1f} "
            f"{(med(n, 'h2load', 'cpu_us') if proxied else nan):>12.1f} "
            f"{med(n, 'wrk', 'nginx_cpu_us'):>12.1f} "
            f"{med(n, 'wrk', 'others'):>6.2f} {med(n, 'h2load', 'others'):>6.2f}"
        )
    print(
        "others: cores used by processes outside this benchmark during the runs "
        "(machine busy time minus ours, median)"
    )
    errors = {n: sum(r["wrk"]["errors"] + r["h2load"]["errors"] for r in runs[n]) for n in names}
    if any(errors.values()):
        print(f"errors (wrk socket errors/non-2xx + h2load failures): {errors}")
    achieved = {n: med(n, "h2load", "achieved_rps") for n in names}
    print(
        "achieved rate in the latency runs: "
        + ", ".join(f"{n} {v:,.0f}/s" for n, v in achieved.items())
    )

    aims: list[tuple[str, str, str, str, bool]] = []  # label, target, sidecar, HAProxy, met
    if "sidecar" in names and "haproxy" in names:
        s_rps, h_rps = med("sidecar", "wrk", "rps"), med("haproxy", "wrk", "rps")
        print()
        print("sidecar / HAProxy:")
        print(f"  max throughput      {s_rps / h_rps:.2f}x  ({s_rps:,.0f} vs {h_rps:,.0f} req/s)")
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            s, h = med("sidecar", "h2load", key), med("haproxy", "h2load", key)
            print(f"  {label} @ {args.rate:,}/s     {s / h:.2f}x  ({s:.3f} vs {h:.3f} ms)")
        if "direct" in names:
            d99 = med("direct", "h2load", "p99_ms")
            s_add, h_add = (
                med("sidecar", "h2load", "p99_ms") - d99,
                med("haproxy", "h2load", "p99_ms") - d99,
            )
            ratio = f"{s_add / h_add:.2f}x" if h_add > 0 else "n/a"
            print(
                f"  p99 added           {ratio:>5}  ({s_add:.3f} vs {h_add:.3f} ms over direct {d99:.3f} ms)"
            )
        for tool_, label in (("wrk", "CPU/req @max "), ("h2load", "CPU/req @rate")):
            s, h = med("sidecar", tool_, "cpu_us"), med("haproxy", tool_, "cpu_us")
            ss, hs = med("sidecar", tool_, "sys_us"), med("haproxy", tool_, "sys_us")
            print(
                f"  {label}       {s / h:.2f}x  ({s:.1f} vs {h:.1f} µs; in the kernel "
                f"{ss:.1f} vs {hs:.1f} µs, in user space {s - ss:.1f} vs {h - hs:.1f} µs)"
            )
        ratio = s_rps / h_rps
        aims.append(
            (
                "throughput vs HAProxy pair",
                f">= {AIM_THROUGHPUT_VS_HAPROXY}x",
                f"{ratio:.2f}x",
                f"{h_rps:,.0f}/s",
                ratio >= AIM_THROUGHPUT_VS_HAPROXY,
            )
        )
    has_h = "haproxy" in names

    def h_fig(fn) -> str:
        return fn() if has_h else "-"

    if "sidecar" in names and "direct" in names:
        d99 = med("direct", "h2load", "p99_ms")
        added = med("sidecar", "h2load", "p99_ms") - d99
        aims.append(
            (
                f"p99 added by the pair @ {args.rate:,} req/s",
                f"< {AIM_ADDED_P99_MS} ms",
                f"{added:.3f} ms",
                h_fig(lambda: f"{med('haproxy', 'h2load', 'p99_ms') - d99:.3f} ms"),
                added < AIM_ADDED_P99_MS,
            )
        )
    if "sidecar" in names:
        for tool_, where in (("wrk", "max throughput"), ("h2load", f"{args.rate:,} req/s")):
            cpu = med("sidecar", tool_, "cpu_us")
            aims.append(
                (
                    f"CPU/req of the pair @ {where}",
                    f"< {AIM_CPU_US:.0f} µs",
                    f"{cpu:.1f} µs",
                    h_fig(lambda t=tool_: f"{med('haproxy', t, 'cpu_us'):.1f} µs"),
                    cpu < AIM_CPU_US,
                )
            )
    mem = res["memory"]
    if "sidecar" in names:
        worst = max(x["VmRSS"] for x in res["sidecar_idle_fresh"]) * 1024 / 1e6
        aims.append(
            (
                "idle RSS (larger of the two)",
                f"< {AIM_IDLE_RSS_MB:.0f} MB",
                f"{worst:.1f} MB",
                f"{max(x['VmRSS'] for x in mem['haproxy']['idle']) * 1024 / 1e6:.1f} MB"
                if "haproxy" in mem
                else "-",
                worst < AIM_IDLE_RSS_MB,
            )
        )

    def per_conn(m: dict) -> float:
        return max(
            (lo["VmRSS"] - i["VmRSS"]) / max(1, m["open"])
            for lo, i in zip(m["loaded"], m["idle"], strict=True)
        )

    if "sidecar" in mem:
        m = mem["sidecar"]
        aims.append(
            (
                f"RSS per open connection ({m['open']:,}, larger side)",
                f"< {AIM_PER_CONN_KIB:.0f} KiB",
                f"{per_conn(m):.1f} KiB",
                f"{per_conn(mem['haproxy']):.1f} KiB" if "haproxy" in mem else "-",
                per_conn(m) < AIM_PER_CONN_KIB,
            )
        )

    def mib(kib: int) -> str:
        return f"{kib / 1024:.1f}"

    if mem or res["sidecar_idle_fresh"]:
        print()
        print("memory: VmRSS MiB (anonymous + file-backed, the latter mostly shared libraries)")
        if res["sidecar_idle_fresh"]:
            for role, x in zip(
                ("client-side", "server-side"), res["sidecar_idle_fresh"], strict=True
            ):
                print(
                    f"  sidecar {role} idle at start: {mib(x['VmRSS'])} "
                    f"({mib(x['RssAnon'])} + {mib(x['RssFile'])})"
                )
        if res.get("floor"):
            f = res["floor"]
            print(
                f"  for scale: a bare python + uvloop + ssl context + one listener: "
                f"{mib(f['VmRSS'])} ({mib(f['RssAnon'])} + {mib(f['RssFile'])})"
            )
        for name, m in mem.items():
            for role, idle, loaded, after in zip(
                ("client-side", "server-side"), m["idle"], m["loaded"], m["after"], strict=True
            ):
                per = (loaded["VmRSS"] - idle["VmRSS"]) / max(1, m["open"])
                print(
                    f"  {name:<7} {role}: idle {mib(idle['VmRSS'])}, with {m['open']:,} open "
                    f"connections {mib(loaded['VmRSS'])} ({per:.1f} KiB/connection), after they "
                    f"closed {mib(after['VmRSS'])}"
                )

    if aims:
        print()
        print(f"{'aim (issue 4)':<42} {'target':>10} {'sidecar':>10}  {'':<6} {'HAProxy pair':>12}")
        for label, target, value, ref, ok in aims:
            print(f"{label:<42} {target:>10} {value:>10}  {'met' if ok else 'MISSED':<6} {ref:>12}")
        print(
            "(the issue's reference on this 2-core machine: an HAProxy pair adds about 0.45 ms p99 "
            "at 1,000 req/s for about 40 µs of CPU per request)"
        )

    for prof in res.get("profiles", []):
        run = prof["run"]
        load = "max throughput" if prof["phase"] == "max" else f"{args.rate:,} req/s"
        print()
        print(
            f"profile ({prof['kind']}): {prof['side']}-side sidecar at {load} (pair "
            f"{run['cpu_us']:.1f} µs/req while sampled; {prof['path']})"
        )
        summarize = summarize_perf if prof["kind"] == "perf" else summarize_py_spy
        for line in summarize(Path(prof["path"])):
            print(line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See bench/README.md for what each figure means.",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--mode",
        choices=("tcp", "http", "h2"),
        default="tcp",
        help="what the pairs proxy: tcp (L4, default), http (HTTP/1.1 proxy), h2 (HTTP/2)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds of each wrk run and each h2load run (default 10)",
    )
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument(
        "--rate", type=int, default=1000, help="fixed rate for latency, req/s (default 1000)"
    )
    p.add_argument(
        "--clients", type=int, default=10, help="h2load connections at the fixed rate (default 10)"
    )
    p.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of each latency run left out (default 1)"
    )
    p.add_argument(
        "--hold",
        type=int,
        default=1000,
        help="open connections for the RSS figure (default 1000; 0: skip)",
    )
    p.add_argument(
        "--topologies",
        default=",".join(TOPOLOGIES),
        help="comma-separated subset of direct,sidecar,haproxy",
    )
    p.add_argument(
        "--quiet-load",
        type=float,
        default=1.5,
        help="before starting, wait for the 1-minute load average to drop below this (default 1.5)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="seconds to wait for it at most (default 60; 0: don't)",
    )
    p.add_argument(
        "--setup-timeout", type=float, default=90, help="seconds for the agent's sidecars to serve"
    )
    p.add_argument("--json", type=Path, help="also write the raw figures to this file")
    p.add_argument(
        "--profile",
        type=Path,
        help="after the rounds, one more sidecar run of each kind under py-spy; "
        "collapsed stacks into this dir, a summary printed",
    )
    p.add_argument(
        "--profile-rate",
        type=int,
        default=200,
        help="py-spy samples/s (default 200; perf samples 5x as often)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.clients < 1 or args.rate < args.clients:
        p.error("--rounds, --duration, --clients and --rate must be positive (rate >= clients)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    wait_for_quiet(args.quiet_load, args.quiet_wait)
    tmp = Path(tempfile.mkdtemp(prefix="mesh-dataplane-"))
    stack = Stack(tmp)
    try:
        res = bench(args, stack)
    except KeyboardInterrupt:
        progress("interrupted: cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()
        if args.keep_tmp:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(args, res)
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **res}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
