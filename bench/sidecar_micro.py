#!/usr/bin/env python
"""Sidecar micro-benchmark: prints figures, asserts nothing.

Without nginx, wrk or HAProxy (that is `bench/dataplane.py`): a small uvloop
HTTP/1.1 keep-alive server (1 KiB responses) and a small uvloop client, each
its own process, on loopback. Topologies, run interleaved for `--rounds`
rounds (medians printed):

- `direct`:  client → server;
- `sidecar`: client → `mesh-sidecar` (web, outbound) → mTLS → `mesh-sidecar`
  (api, inbound) → server — the real processes, fed by the test harness of
  the agent's socket, certificates from a test CA;
- `haproxy`: the reference, an HAProxy pair (`mode tcp`, `nbthread 1`, client
  certificate required) with the same certificates, when Debian's haproxy is
  installed (the full comparison with nginx and wrk is `bench/dataplane.py`);
- `naive`:   the same pair as a naive proxy on the loop's own TLS transport
  (`create_server(ssl=...)` / `create_connection(ssl=...)`, Protocol
  splicing, uvloop): the "before" of the sidecar's MemoryBIO design.

For each: maximum throughput (closed loop, `--conns` connections), latency
p50/p99 at a fixed rate (`--rate`, open loop, latency counted from each
request's scheduled time), and the proxies' CPU per request (utime+stime from
/proc/<pid>/stat, both proxies of the pair together). Then memory: each
proxy's RSS idle and with `--hold` open connections through the pair, and the
difference per connection.

Run from the repository root: `.venv/bin/python bench/sidecar_micro.py --help`.
Progress goes to stderr, figures to stdout. The machine's cores are shared by
the client, the server and the proxies: compare figures from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "bench":
    sys.path.pop(0)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BODY = b"x" * 1024
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1024\r\n\r\n" + BODY
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: micro\r\n\r\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")
HAPROXY = "/usr/sbin/haproxy"


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- server role


class HttpServer(asyncio.Protocol):
    """Answers every complete request head with RESPONSE (keep-alive, pipelining-safe)."""

    def connection_made(self, transport):
        self.t = transport
        self.buf = b""

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        n = buf.count(b"\r\n\r\n")
        if n:
            self.t.write(RESPONSE * n)
            buf = buf[buf.rfind(b"\r\n\r\n") + 4 :]
        self.buf = buf


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpServer, "127.0.0.1", port, backlog=4096)
    async with server:
        await asyncio.Event().wait()


# ----------------------------------------------------------------------------- naive proxy role


class NaiveSide(asyncio.Protocol):
    """One side of a naive splice on the loop's transports (TLS or not)."""

    def __init__(self, peer=None):
        self.peer = peer
        self.t = None
        self.early = []

    def connection_made(self, transport):
        self.t = transport
        if self.peer is not None:
            self.peer.peer = self
            for d in self.peer.early:
                transport.write(d)
            self.peer.early = []

    def data_received(self, data):
        peer = self.peer
        if peer is None or peer.t is None:
            self.early.append(data)
            return
        peer.t.write(data)

    def pause_writing(self):
        if self.peer and self.peer.t:
            self.peer.t.pause_reading()

    def resume_writing(self):
        if self.peer and self.peer.t:
            self.peer.t.resume_reading()

    def eof_received(self):
        if self.peer and self.peer.t and self.peer.t.can_write_eof():
            self.peer.t.write_eof()
            return True
        return False

    def connection_lost(self, exc):
        if self.peer and self.peer.t:
            self.peer.t.close()


async def naive_proxy(spec: dict) -> None:
    """`spec`: listen port, target port, and either server-side TLS (inbound)
    or client-side TLS (outbound) from cert/key/ca files."""
    loop = asyncio.get_running_loop()
    if spec["side"] == "inbound":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(spec["cert"], spec["key"])
    ctx.load_verify_locations(spec["ca"])

    def accepted():
        side = NaiveSide()

        async def connect():
            kw = {"ssl": ctx, "server_hostname": ""} if spec["side"] == "outbound" else {}
            try:
                await loop.create_connection(
                    lambda: NaiveSide(side), "127.0.0.1", spec["target"], **kw
                )
            except OSError:
                if side.t:
                    side.t.close()

        loop.create_task(connect())
        return side

    kw = {"ssl": ctx} if spec["side"] == "inbound" else {}
    server = await loop.create_server(accepted, "127.0.0.1", spec["port"], backlog=4096, **kw)
    async with server:
        await asyncio.Event().wait()


# ----------------------------------------------------------------------------- client role


class Client(asyncio.Protocol):
    """One keep-alive connection: sends REQUEST, counts the fixed-size response."""

    def __init__(self, on_done):
        self.on_done = on_done
        self.t = None
        self.got = 0
        self.started = 0.0
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.t = transport
        self.ready.set_result(None)

    def send(self, started):
        self.started = started
        self.t.write(REQUEST)

    def data_received(self, data):
        self.got += len(data)
        size = len(RESPONSE)
        while self.got >= size:
            self.got -= size
            self.on_done(self)

    def connection_lost(self, exc):
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed"))


async def open_clients(port: int, n: int, on_done) -> list[Client]:
    loop = asyncio.get_running_loop()
    clients = []
    for i in range(0, n, 100):
        batch = [
            loop.create_connection(lambda: Client(on_done), "127.0.0.1", port)
            for _ in range(min(100, n - i))
        ]
        for _, proto in await asyncio.gather(*batch):
            clients.append(proto)
    return clients


def window_ticks(pids: list[int]) -> int:
    return sum(cpu_ticks(p) for p in pids)


async def client_max(port: int, conns: int, seconds: float, warmup: float, pids: list[int]) -> dict:
    state = {"count": 0, "counting": False}

    def done(c):
        if state["counting"]:
            state["count"] += 1
        c.send(0.0)

    clients = await open_clients(port, conns, done)
    for c in clients:
        c.send(0.0)
    await asyncio.sleep(warmup)
    ticks = window_ticks(pids)
    state["counting"] = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    state["counting"] = False
    elapsed = time.perf_counter() - t0
    cpu = (window_ticks(pids) - ticks) / CLK_TCK
    for c in clients:
        c.t.close()
    return {
        "requests": state["count"],
        "seconds": elapsed,
        "rps": state["count"] / elapsed,
        "cpu_s": cpu,
    }


async def client_rate(
    port: int, rate: float, seconds: float, conns: int, warmup: float, pids: list[int]
) -> dict:
    """Open loop at `rate` req/s; latency from each request's scheduled time."""
    loop = asyncio.get_running_loop()
    idle: list[Client] = []
    queue: list[float] = []
    latencies: list[float] = []
    state = {"record_after": 0.0, "sent": 0, "queued": 0}

    clock = time.perf_counter

    def done(c):
        now = clock()
        if c.started >= state["record_after"]:
            latencies.append(now - c.started)
        if queue:
            queue.pop(0)
            c.send(now)
        else:
            idle.append(c)

    clients = await open_clients(port, conns, done)
    idle.extend(clients)
    start = clock() + 0.05
    state["record_after"] = start + warmup
    total = int((seconds + warmup) * rate)
    interval = 1.0 / rate
    warm = int(warmup * rate)
    ticks = 0
    for i in range(total):
        if i == warm:
            ticks = window_ticks(pids)  # connection set-up and warm-up excluded
        when = start + i * interval
        delay = when - clock()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        # Latency counts from the actual send: uvloop's timers tick in
        # milliseconds, so the scheduled time would add up to 1 ms of pacing.
        if idle:
            idle.pop().send(clock())
        else:
            queue.append(when)
            state["queued"] += 1
        state["sent"] += 1
    deadline = loop.time() + 5
    while len(idle) < len(clients) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    cpu = (window_ticks(pids) - ticks) / CLK_TCK
    for c in clients:
        c.t.close()
    latencies.sort()
    n = len(latencies)

    def pct(p):
        return latencies[min(n - 1, int(p * n))] * 1e3 if n else float("nan")

    return {
        "requests": n,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
        "queued": state["queued"],
        "cpu_s": cpu,
    }


async def client_hold(port: int, n: int) -> None:
    """Open n connections, one request each, then hold them until stdin closes."""
    loop = asyncio.get_running_loop()
    waiters = {}

    def done(c):
        fut = waiters.pop(c, None)
        if fut and not fut.done():
            fut.set_result(None)

    clients = await open_clients(port, n, done)
    futs = []
    for c in clients:
        waiters[c] = loop.create_future()
        futs.append(waiters[c])
        c.send(0.0)
    await asyncio.wait_for(asyncio.gather(*futs), 60)
    print(json.dumps({"open": len(clients)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    for c in clients:
        c.t.close()


# ----------------------------------------------------------------------------- orchestration


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pss_uss_kib(pid: int) -> tuple[int, int]:
    """(PSS, USS): RSS with shared pages divided among their sharers / only private pages."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields.get("Pss", 0), fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def role_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def run_client(*args: str) -> dict:
    out = subprocess.run(role_cmd("--role", "client", *args), capture_output=True)
    if out.returncode != 0:
        raise RuntimeError(f"client {' '.join(args)} failed:\n{out.stderr.decode()[-2000:]}")
    return json.loads(out.stdout)


class Topologies:
    """The server, and the proxy pairs in front of it; `port[name]` is where a
    client connects, `pids[name]` the proxies to measure."""

    def __init__(self, tmp: Path, log_level: str) -> None:
        from tests.proxy.support import (
            SidecarProcess,
            TestCA,
            allow,
            free_port,
            proxy_config,
            upstream,
        )

        self.procs: list[subprocess.Popen] = []
        self.sidecars: list = []
        self.port: dict[str, int] = {}
        self.pids: dict[str, list[int]] = {}

        server_port = free_port()
        self.server_pid = self._spawn(role_cmd("--role", "server", "--port", str(server_port))).pid
        self.port["direct"] = server_port
        self.pids["direct"] = []

        ca = TestCA()
        web = SidecarProcess(tmp, "web-sidecar-proxy", "--log-level", log_level)
        api = SidecarProcess(tmp, "api-sidecar-proxy", "--log-level", log_level)
        self.sidecars = [web, api]
        api_in, web_in, up = free_port(), free_port(), free_port()
        cert, key = ca.leaf("api")
        api.push(
            {
                "config": proxy_config(
                    "api",
                    version=1,
                    inbound_port=api_in,
                    app_port=server_port,
                    intentions=(allow("web"),),
                ),
                "cert": cert,
                "key": key,
                "roots": [ca.root_pem],
            }
        )
        cert, key = ca.leaf("web")
        web.push(
            {
                "config": proxy_config(
                    "web",
                    version=1,
                    inbound_port=web_in,
                    app_port=1,
                    upstreams=(upstream("api", up, [api_in]),),
                ),
                "cert": cert,
                "key": key,
                "roots": [ca.root_pem],
            }
        )
        self.port["sidecar"] = up
        self.pids["sidecar"] = [web.proc.pid, api.proc.pid]

        files = {}
        for name in ("web", "api"):
            files[name] = ca.write_leaf(tmp, f"naive-{name}", name)
        (tmp / "ca.pem").write_text(ca.root_pem)
        n_in, n_out = free_port(), free_port()
        specs = [
            ("inbound", n_in, server_port, files["api"]),
            ("outbound", n_out, n_in, files["web"]),
        ]
        pids = []
        for side, port, target, (cert_path, key_path) in specs:
            spec = {
                "side": side,
                "port": port,
                "target": target,
                "cert": cert_path,
                "key": key_path,
                "ca": str(tmp / "ca.pem"),
            }
            pids.append(self._spawn(role_cmd("--role", "naive", "--spec", json.dumps(spec))).pid)
        self.port["naive"] = n_out
        self.pids["naive"] = pids

        # The reference: an HAProxy pair (mode tcp, nbthread 1, client certificate
        # required) with the same certificates, when Debian's haproxy is installed.
        if Path(HAPROXY).exists():
            h_in, h_out = free_port(), free_port()
            pems = {}
            for name, (cert_path, key_path) in files.items():
                pems[name] = tmp / f"haproxy-{name}.pem"
                pems[name].write_text(Path(cert_path).read_text() + Path(key_path).read_text())
            ca_file = tmp / "ca.pem"
            common = (
                "global\n  nbthread 1\n  maxconn 4000\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n"
                "  timeout client 1m\n  timeout server 1m\n"
            )
            cfg_in = common + (
                f"frontend in\n  bind 127.0.0.1:{h_in} ssl crt {pems['api']} "
                f"ca-file {ca_file} verify required\n  default_backend app\n"
                f"backend app\n  server app 127.0.0.1:{server_port}\n"
            )
            cfg_out = common + (
                f"frontend out\n  bind 127.0.0.1:{h_out}\n  default_backend api\n"
                f"backend api\n  server api 127.0.0.1:{h_in} ssl crt {pems['web']} "
                f"ca-file {ca_file} verify required\n"
            )
            hpids = []
            for label, cfg in (("out", cfg_out), ("in", cfg_in)):
                path = tmp / f"haproxy-{label}.cfg"
                path.write_text(cfg)
                hpids.append(self._spawn([HAPROXY, "-db", "-f", str(path)]).pid)
            self.port["haproxy"] = h_out
            self.pids["haproxy"] = hpids
        time.sleep(1.0)

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for s in self.sidecars:
            s.stop()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(10)


def measure(topo: Topologies, name: str, args: argparse.Namespace) -> dict:
    """One topology's run: max throughput, then latency at the fixed rate. CPU is
    counted by the client over its measuring windows only (connection set-up,
    TLS handshakes and warm-up excluded)."""
    port = str(topo.port[name])
    proxies = ",".join(map(str, topo.pids[name]))
    res = run_client(
        "--mode", "max", "--port", port, "--conns", str(args.conns),
        "--seconds", str(args.seconds), "--warmup", "1", "--pids", proxies,
    )  # fmt: skip
    lat = run_client(
        "--mode", "rate", "--port", port, "--rate", str(args.rate),
        "--seconds", str(args.seconds), "--conns", "64", "--warmup", "1", "--pids", proxies,
    )  # fmt: skip
    server = run_client(
        "--mode", "rate", "--port", port, "--rate", str(args.rate),
        "--seconds", "2", "--conns", "64", "--warmup", "0.5", "--pids", str(topo.server_pid),
    ) if name == "direct" else {"cpu_s": 0.0, "requests": 1}  # fmt: skip
    return {
        "rps": res["rps"],
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "cpu_us_max": res["cpu_s"] / max(1, res["requests"]) * 1e6,
        "cpu_us_rate": lat["cpu_s"] / max(1, lat["requests"]) * 1e6,
        # The 1 KiB server alone (one read, one write per request) at the fixed
        # rate: what one wake-up of a uvloop process costs on this machine.
        "server_us_rate": server["cpu_s"] / max(1, server["requests"]) * 1e6,
    }


def memory(topo: Topologies, name: str, hold: int) -> dict:
    pids = topo.pids[name]
    time.sleep(0.5)
    idle = [rss_kib(p) for p in pids]
    idle_pss_uss = [pss_uss_kib(p) for p in pids]
    proc = subprocess.Popen(
        role_cmd("--role", "client", "--mode", "hold", "--port", str(topo.port[name]),
                 "--conns", str(hold)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    line = proc.stdout.readline()
    opened = json.loads(line)["open"] if line else 0
    time.sleep(1.0)
    loaded = [rss_kib(p) for p in pids]
    proc.stdin.close()
    proc.wait(30)
    time.sleep(11.0)  # the sidecar returns freed heap from a 10 s timer
    after = [rss_kib(p) for p in pids]
    return {
        "idle": idle,
        "idle_pss_uss": idle_pss_uss,
        "loaded": loaded,
        "after": after,
        "open": opened,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--role", choices=["bench", "server", "naive", "client"], default="bench")
    p.add_argument("--port", type=int)
    p.add_argument("--spec")
    p.add_argument("--mode", choices=["max", "rate", "hold"])
    p.add_argument("--conns", type=int, default=32, help="connections for the throughput runs")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=1000.0, help="fixed rate for latency (req/s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hold", type=int, default=1000, help="open connections for the RSS figure")
    p.add_argument(
        "--topologies",
        default="direct,sidecar,naive,haproxy",
        help="comma-separated subset to run (haproxy: when /usr/sbin/haproxy exists)",
    )
    p.add_argument("--log-level", default="warning", help="the sidecars' log level")
    p.add_argument("--pids", default="", help="(client role) processes whose CPU to count")
    args = p.parse_args()

    import uvloop

    if args.role == "server":
        uvloop.run(serve(args.port))
        return
    if args.role == "naive":
        uvloop.run(naive_proxy(json.loads(args.spec)))
        return
    if args.role == "client":
        pids = [int(p) for p in args.pids.split(",") if p]
        if args.mode == "max":
            out = uvloop.run(client_max(args.port, args.conns, args.seconds, args.warmup, pids))
        elif args.mode == "rate":
            out = uvloop.run(
                client_rate(args.port, args.rate, args.seconds, args.conns, args.warmup, pids)
            )
        else:
            uvloop.run(client_hold(args.port, args.conns))
            return
        print(json.dumps(out))
        return

    names = [n for n in args.topologies.split(",") if n]
    if "haproxy" in names and not Path(HAPROXY).exists():
        progress(f"{HAPROXY} not installed: skipping the haproxy topology")
        names.remove("haproxy")
    with tempfile.TemporaryDirectory(prefix="sidecar-micro-") as tmp:
        topo = Topologies(Path(tmp), args.log_level)
        try:
            results: dict[str, list[dict]] = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names:
                    progress(f"round {r + 1}/{args.rounds}: {name}")
                    results[name].append(measure(topo, name, args))
            mem = {}
            for name in names:
                if topo.pids[name]:
                    progress(f"memory: {name} with {args.hold} connections")
                    mem[name] = memory(topo, name, args.hold)
        finally:
            topo.close()

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    print(
        f"\nloadavg {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, medians of {args.rounds} rounds"
    )
    if not args.rounds:
        names = []  # memory only
    print(f"{'topology':<10} {'max req/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'cpu µs/req @max':>16} {'cpu µs/req @rate':>17}")  # fmt: skip
    for name in names:
        print(
            f"{name:<10} {med(name, 'rps'):>10,.0f} {med(name, 'p50_ms'):>8.3f} "
            f"{med(name, 'p99_ms'):>8.3f} {med(name, 'cpu_us_max'):>16.1f} "
            f"{med(name, 'cpu_us_rate'):>17.1f}"
        )
    if "direct" in names and names:
        print(
            f"(the 1 KiB server alone costs {med('direct', 'server_us_rate'):.1f} µs/req "
            f"at {args.rate:,.0f} req/s: one uvloop wake-up, read and write)"
        )
    if "direct" in names:
        for name in names:
            if name == "direct":
                continue
            print(
                f"{name}: throughput {med(name, 'rps') / med('direct', 'rps'):.2f}x direct, "
                f"p99 added {med(name, 'p99_ms') - med('direct', 'p99_ms'):.3f} ms at "
                f"{args.rate:,.0f} req/s"
            )
    if "sidecar" in names and "haproxy" in names:
        print(
            f"sidecar / haproxy: throughput {med('sidecar', 'rps') / med('haproxy', 'rps'):.2f}x, "
            f"cpu/req @rate {med('sidecar', 'cpu_us_rate') / med('haproxy', 'cpu_us_rate'):.2f}x, "
            f"p99 {med('sidecar', 'p99_ms'):.3f} vs {med('haproxy', 'p99_ms'):.3f} ms"
        )
    if "sidecar" in names and "naive" in names:
        print(
            f"sidecar / naive: throughput {med('sidecar', 'rps') / med('naive', 'rps'):.2f}x, "
            f"cpu/req {med('sidecar', 'cpu_us_rate') / med('naive', 'cpu_us_rate'):.2f}x"
        )
    for name, m in mem.items():
        for role, idle, (pss, uss), loaded, after in zip(
            ("client-side", "server-side"),
            m["idle"],
            m["idle_pss_uss"],
            m["loaded"],
            m["after"],
            strict=True,
        ):
            per = (loaded - idle) / max(1, m["open"])
            print(
                f"memory {name:<8} {role}: RSS idle {idle / 1024:.1f} MiB (PSS {pss / 1024:.1f}, "
                f"USS {uss / 1024:.1f}), with {m['open']} connections {loaded / 1024:.1f} MiB "
                f"({per:.1f} KiB/conn), after close {after / 1024:.1f} MiB"
            )


if __name__ == "__main__":
    main()
