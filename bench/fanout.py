#!/usr/bin/env python
"""Change -> 1,000 sidecars: how long an intention write takes to reach every
proxy-config stream it concerns, and how many compilations it costs.

Starts a real `mesh server` (ACLs off; embedded SQLite, or a fresh PostgreSQL
database with `--db postgres`), joins `--nodes` agents with one join token
(real `Join` RPCs, each with its own key and CSR), registers `--streams`
services with sidecars across them (`SyncNode`; `--services` distinct names,
each calling the next as its upstream), and opens one `StreamProxyConfigs`
call per sidecar (in-process grpc.aio clients, one mTLS channel per node,
each stream subscribed to its one proxy, acking every config). Then, for
`--writes` rounds:

* a wildcard-destination intention (`bench-src-N -> *`): every sidecar
  enforces it, so every stream must get a new config;
* an intention to one service (`bench-src-N -> fan-0`): only that service's
  sidecars must.

Each figure is the time from just before the write's HTTP request to a
stream's next update (`time.monotonic()`), p50 / p99 over every stream and
write of the kind, and the time to the last stream of each write. The
compilations per write come from the server's own count
(`/api/connect/status/`, `config.compiles`, summed over the sidecars, read
once the server is quiet). Server CPU is its process's user+system time from
the write to the last update. Prints progress to stderr and one table to
stdout; asserts nothing. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "bench":
    sys.path.pop(0)  # the script's folder would shadow the `registry` package
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import httpx  # noqa: E402

from meshproto import pki, spiffe  # noqa: E402
from meshproto.proto import mesh_pb2, mesh_pb2_grpc  # noqa: E402
from tests.support.servers import (  # noqa: E402
    MeshServer,
    create_database,
    drop_database,
    make_server,
)

DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres"
AIM_P99_MS = 1000.0


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process (threads of one name summed;
    the main thread, which runs the event loop, as `main`)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = "main" if task.name == str(pid) else comm.rstrip("0123456789_-") or comm
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf(
            "SC_CLK_TCK"
        )
    return out


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def wait_quiet(pid: int, *, window: float = 1.0, max_cpu: float = 0.1, limit: float = 120):
    """Until the server uses under `max_cpu` of a core over `window` seconds."""
    t0 = time.monotonic()
    samples: list[tuple[float, float]] = []
    while time.monotonic() - t0 < limit:
        samples.append((time.monotonic(), cpu_seconds(pid)))
        old = [s for s in samples if s[0] <= samples[-1][0] - window]
        if old and (samples[-1][1] - old[-1][1]) / (samples[-1][0] - old[-1][0]) <= max_cpu:
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    progress(f"  warning: server still busy after {limit:.0f}s")
    return time.monotonic() - t0


# --- agents and streams -----------------------------------------------------------------


@dataclass
class Node:
    name: str
    key: object = field(default_factory=pki.generate_key)
    cert_pem: str = ""
    channel: grpc.aio.Channel | None = None


@dataclass
class ProxyStream:
    """One sidecar's config stream; `arrivals` stamps every update."""

    node: Node
    service: str
    proxy_id: str
    arrivals: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    call: object = None
    reader: asyncio.Task | None = None
    error: str = ""


class Fleet:
    def __init__(self, srv: MeshServer, args) -> None:
        self.srv = srv
        self.args = args
        self.target = f"127.0.0.1:{srv.grpc_port}"
        self.nodes: list[Node] = []
        self.streams: list[ProxyStream] = []
        self.roots = ""
        self.trust_domain = ""
        self.changed = asyncio.Event()  # set on every update: waiters re-check

    def _creds(self, node: Node | None) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.roots.encode(),
            private_key=pki.key_pem(node.key).encode() if node else None,
            certificate_chain=node.cert_pem.encode() if node else None,
        )

    async def join_all(self) -> None:
        async with httpx.AsyncClient(base_url=self.srv.url, timeout=60) as http:
            self.roots = (await http.get("/v1/connect/ca/roots", params={"pem": "true"})).text
            self.trust_domain = (await http.get("/v1/connect/ca/roots")).json()["TrustDomain"]
            r = await http.post(
                "/api/join-tokens/",
                json={"uses": self.args.nodes, "ttl": "1h", "services": ["fan-*"]},
            )
            r.raise_for_status()
            token = r.json()["token"]
        self.nodes = [Node(f"fan-node-{i:04d}") for i in range(self.args.nodes)]
        gate = asyncio.Semaphore(8)

        async def join(node: Node) -> None:
            csr = pki.make_csr(node.key, spiffe.agent_id(self.trust_domain, node.name, "dc1").uri)
            request = mesh_pb2.JoinRequest(
                join_token=token, node_name=node.name, csr_pem=csr, address="127.0.0.1"
            )
            async with gate, grpc.aio.secure_channel(self.target, self._creds(None)) as ch:
                resp = await mesh_pb2_grpc.AgentControlStub(ch).Join(request, timeout=60)
            node.cert_pem = resp.cert_pem
            node.channel = grpc.aio.secure_channel(self.target, self._creds(node))

        await asyncio.gather(*(join(n) for n in self.nodes))

    def layout(self) -> dict[str, list[dict]]:
        """node name -> its service definitions: proxy p on node p % nodes, of
        service fan-(p % services), calling fan-(p+1 % services)."""
        out: dict[str, list[dict]] = {n.name: [] for n in self.nodes}
        s = self.args.services
        for p in range(self.args.streams):
            node = self.nodes[p % len(self.nodes)]
            local = len(out[node.name])
            name, upstream = f"fan-{p % s}", f"fan-{(p + 1) % s}"
            sid = f"{name}-{p}"
            out[node.name].append(
                {
                    "ID": sid,
                    "Name": name,
                    "Port": 8000 + local,
                    "Connect": {
                        "SidecarService": {
                            "Proxy": {
                                "Upstreams": [
                                    {"DestinationName": upstream, "LocalBindPort": 9000 + local}
                                ]
                            }
                        }
                    },
                }
            )
            self.streams.append(ProxyStream(node, name, f"{sid}-sidecar-proxy"))
        return out

    async def sync_all(self) -> None:
        gate = asyncio.Semaphore(8)
        by_node = self.layout()

        async def sync(node: Node) -> None:
            state = mesh_pb2.NodeState(
                address="127.0.0.1", services_json=[json.dumps(s) for s in by_node[node.name]]
            )
            async with gate:
                await mesh_pb2_grpc.AgentControlStub(node.channel).SyncNode(state, timeout=120)

        await asyncio.gather(*(sync(n) for n in self.nodes))

    async def open_streams(self) -> None:
        for s in self.streams:
            s.call = mesh_pb2_grpc.AgentControlStub(s.node.channel).StreamProxyConfigs()
            await s.call.write(
                mesh_pb2.StreamRequest(subscribe=mesh_pb2.Subscribe(proxy_ids=[s.proxy_id]))
            )
            s.reader = asyncio.create_task(self._read(s))

    async def _read(self, s: ProxyStream) -> None:
        try:
            async for update in s.call:
                s.arrivals.append(time.monotonic())
                s.versions.append(update.version)
                self.changed.set()
                await s.call.write(
                    mesh_pb2.StreamRequest(
                        ack=mesh_pb2.Ack(proxy_id=update.proxy_id, version=update.version, ok=True)
                    )
                )
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            s.error = str(exc)[:200]

    async def wait_updates(self, want: dict[int, int], timeout: float) -> None:
        """Until stream i has more than want[i] updates, for every i (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            pending = [i for i, n in want.items() if len(self.streams[i].arrivals) <= n]
            if not pending or time.monotonic() >= deadline:
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))

    async def compiles(self) -> int:
        async with httpx.AsyncClient(base_url=self.srv.url, timeout=120) as http:
            r = await http.get("/api/connect/status/")
        r.raise_for_status()
        return sum(
            p["config"].get("compiles", 0) for s in r.json()["services"] for p in s["proxies"]
        )

    async def close(self) -> None:
        for s in self.streams:
            if s.call is not None:
                s.call.cancel()
            if s.reader is not None:
                s.reader.cancel()
        await asyncio.gather(*(s.reader for s in self.streams if s.reader), return_exceptions=True)
        for n in self.nodes:
            if n.channel is not None:
                await n.channel.close()


# --- rounds -----------------------------------------------------------------------------


@dataclass
class Round:
    kind: str  # "wildcard" or "one service"
    expected: int
    latencies_ms: list[float]
    unexpected: int  # streams outside the expected set that got an update
    compiles: int
    server_cpu_ms: float
    thread_cpu_ms: dict[str, float] = field(default_factory=dict)  # by thread name

    @property
    def last_ms(self) -> float:
        return max(self.latencies_ms) if self.latencies_ms else float("nan")


async def one_write(fleet: Fleet, kind: str, n: int, args) -> Round:
    destination = "*" if kind == "wildcard" else "fan-0"
    expected = {
        i for i, s in enumerate(fleet.streams) if destination == "*" or s.service == destination
    }
    before = {i: len(s.arrivals) for i, s in enumerate(fleet.streams)}
    compiles_before = await fleet.compiles()
    await wait_quiet(fleet.srv.proc.pid)
    cpu0 = cpu_seconds(fleet.srv.proc.pid)
    threads0 = thread_cpu(fleet.srv.proc.pid)
    sampler = None
    if args.profile and n == 0:
        # py-spy (not a dependency: `.venv/bin/pip install py-spy`) on the server for this write.
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        out = Path(args.profile) / f"{kind.replace(' ', '-')}.txt"
        sampler = subprocess.Popen(
            [
                "py-spy",
                "record",
                "-f",
                "raw",
                "-r",
                "200",
                "-o",
                str(out),
                "-p",
                str(fleet.srv.proc.pid),
                *(["--gil"] if args.profile_gil else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)
    async with httpx.AsyncClient(base_url=fleet.srv.url, timeout=60) as http:
        t0 = time.monotonic()
        r = await http.put(
            "/v1/connect/intentions/exact",
            params={"source": f"bench-src-{kind[0]}{n}", "destination": destination},
            json={"Action": "allow"},
        )
    r.raise_for_status()
    await fleet.wait_updates({i: before[i] for i in expected}, args.timeout)
    cpu1 = cpu_seconds(fleet.srv.proc.pid)
    threads1 = thread_cpu(fleet.srv.proc.pid)
    by_thread = {
        k: 1000 * (v - threads0.get(k, 0.0))
        for k, v in threads1.items()
        if v > threads0.get(k, 0.0)
    }
    if sampler is not None:
        sampler.send_signal(signal.SIGINT)
        await asyncio.to_thread(sampler.wait, 30)
    latencies = [
        1000 * (fleet.streams[i].arrivals[before[i]] - t0)
        for i in expected
        if len(fleet.streams[i].arrivals) > before[i]
    ]
    await wait_quiet(fleet.srv.proc.pid)
    unexpected = sum(
        1 for i, s in enumerate(fleet.streams) if i not in expected and len(s.arrivals) > before[i]
    )
    compiles = await fleet.compiles() - compiles_before
    return Round(
        kind, len(expected), latencies, unexpected, compiles, 1000 * (cpu1 - cpu0), by_thread
    )


async def run_bench(srv: MeshServer, args) -> dict:
    out: dict = {"loadavg_start": os.getloadavg()[0]}
    fleet = Fleet(srv, args)
    try:
        t = time.monotonic()
        await fleet.join_all()
        out["join_s"] = time.monotonic() - t
        progress(f"joined {len(fleet.nodes)} nodes in {out['join_s']:.1f}s")
        t = time.monotonic()
        await fleet.sync_all()
        out["sync_s"] = time.monotonic() - t
        progress(f"registered {len(fleet.streams)} services with sidecars in {out['sync_s']:.1f}s")
        t, cpu0 = time.monotonic(), cpu_seconds(srv.proc.pid)
        await fleet.open_streams()
        await fleet.wait_updates({i: 0 for i in range(len(fleet.streams))}, args.timeout * 4)
        out["first_config_s"] = time.monotonic() - t
        out["first_config_cpu_ms"] = 1000 * (cpu_seconds(srv.proc.pid) - cpu0)
        missing = sum(1 for s in fleet.streams if not s.arrivals)
        out["missing_first"] = missing
        progress(
            f"{len(fleet.streams) - missing}/{len(fleet.streams)} streams got their first config "
            f"in {out['first_config_s']:.1f}s"
        )
        await wait_quiet(srv.proc.pid)
        out["loadavg_writes"] = os.getloadavg()[0]
        client0 = own_cpu_seconds()
        rounds: list[Round] = []
        for n in range(args.writes):
            for kind in ("wildcard", "one service"):
                rnd = await one_write(fleet, kind, n, args)
                rounds.append(rnd)
                progress(
                    f"write {n + 1} {kind}: {len(rnd.latencies_ms)}/{rnd.expected} streams, "
                    f"last {rnd.last_ms:.0f} ms, {rnd.compiles} compilations, "
                    f"server CPU {rnd.server_cpu_ms:.0f} ms ("
                    + ", ".join(
                        f"{k} {v:.0f}"
                        for k, v in sorted(rnd.thread_cpu_ms.items(), key=lambda kv: -kv[1])
                    )
                    + ")"
                )
        out["client_cpu_s"] = own_cpu_seconds() - client0
        out["rounds"] = rounds
        out["stream_errors"] = sum(1 for s in fleet.streams if s.error)
    finally:
        await fleet.close()
    return out


# --- report -----------------------------------------------------------------------------


def report(db: str, args, res: dict) -> None:
    p = print
    p(
        f"\nChange -> sidecars (bench/fanout.py), {db}, {args.streams} streams on {args.nodes} nodes,"
    )
    p(
        f"{args.services} services ({args.streams // args.services} sidecars each), {args.writes} writes of each kind"
    )
    p(
        f"load average (1 min): {res['loadavg_start']:.2f} at start, "
        f"{res.get('loadavg_writes', float('nan')):.2f} before the writes (2 shared cores)"
    )
    p(
        f"setup: join {res.get('join_s', 0):.1f} s, register {res.get('sync_s', 0):.1f} s, "
        f"first config on every stream {res.get('first_config_s', 0):.1f} s "
        f"(server CPU {res.get('first_config_cpu_ms', 0) / max(args.streams, 1):.1f} ms per proxy)"
    )
    rounds: list[Round] = res.get("rounds", [])
    p("")
    p(
        f"| {'write':<26} | {'streams':>9} | {'p50 ms':>7} | {'p99 ms':>7} | {'last ms':>8} "
        f"| {'compiles':>8} | {'srv CPU ms':>10} | {'others':>6} |"
    )
    p(f"|{'-' * 28}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 8}|")
    for kind in ("wildcard", "one service"):
        mine = [r for r in rounds if r.kind == kind]
        for i, r in enumerate(mine, 1):
            label = f"{'intention -> *' if kind == 'wildcard' else 'intention -> fan-0'} #{i}"
            p(
                f"| {label:<26} | {len(r.latencies_ms):>4}/{r.expected:<4} "
                f"| {pct(r.latencies_ms, 50):>7.0f} | {pct(r.latencies_ms, 99):>7.0f} "
                f"| {r.last_ms:>8.0f} | {r.compiles:>8} | {r.server_cpu_ms:>10.0f} | {r.unexpected:>6} |"
            )
        if mine:
            every = [x for r in mine for x in r.latencies_ms]
            lasts = [r.last_ms for r in mine]
            p(
                f"| {'  all ' + kind:<26} | {len(every):>9} | {pct(every, 50):>7.0f} "
                f"| {pct(every, 99):>7.0f} | {pct(lasts, 50):>8.0f} "
                f"| {sum(r.compiles for r in mine) / len(mine):>8.0f} "
                f"| {sum(r.server_cpu_ms for r in mine) / len(mine):>10.0f} | {'':>6} |"
            )
    wild = [x for r in rounds if r.kind == "wildcard" for x in r.latencies_ms]
    if wild:
        p99 = pct(wild, 99)
        verdict = "met" if p99 < AIM_P99_MS else "MISSED"
        p(
            f"\naim: p99 write -> stream update < {AIM_P99_MS:.0f} ms to {args.streams} streams: {p99:.0f} ms, {verdict}"
        )
    p(
        "compiles = the server's compilations for the write (summed config.compiles); "
        "others = streams outside the write's sidecars that got an update (expected 0); "
        f"client CPU for the writes {res.get('client_cpu_s', 0):.1f} s; stream errors "
        f"{res.get('stream_errors', 0)}; streams without a first config {res.get('missing_first', 0)}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES))
    ap.add_argument("--redis", action="store_true", help="fan changes out through Redis")
    ap.add_argument("--streams", type=int, default=1000, help="sidecars, one stream each")
    ap.add_argument("--nodes", type=int, default=100, help="agents the sidecars are spread over")
    ap.add_argument("--services", type=int, default=10, help="distinct service names")
    ap.add_argument("--writes", type=int, default=5, help="writes of each kind")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one write")
    ap.add_argument("--server-env", action="append", default=[], metavar="K=V")
    ap.add_argument(
        "--profile", metavar="DIR", help="py-spy the server during the first write of each kind"
    )
    ap.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: only the thread holding the GIL (where the Python CPU goes)",
    )
    args = ap.parse_args(argv)
    if min(args.streams, args.nodes, args.services) < 1:
        ap.error("--streams, --nodes and --services must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="meshweb-fanout-"))
    database_url = None
    srv = None
    try:
        if args.db == "postgres":
            database_url = create_database(args.postgres)
        os.environ.pop("DATABASE_URL", None)  # make_server reads it: choose explicitly
        if not args.redis:
            os.environ.pop("REDIS_URL", None)
        srv = make_server(
            tmp,
            redis=args.redis,
            database_url=database_url,
            extra_env={
                "MESH_LOG_LEVEL": "WARNING",
                **dict(kv.split("=", 1) for kv in args.server_env),
            },
        )
        progress(f"mesh server pid {srv.proc.pid} on {srv.addr}, gRPC {srv.grpc_port}")
        res = asyncio.run(run_bench(srv, args))
        report(args.db, args, res)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if srv is not None:
            srv.stop()
        if database_url:
            drop_database(database_url)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
