#!/usr/bin/env python
"""Registry benchmark: prints figures for the issue's targets, asserts nothing.

Starts a real `mesh server` process (ACLs off) per database, on the embedded
default (SQLite) and/or a fresh PostgreSQL database, and measures:

1. registrations per second through `PUT /v1/agent/service/register`
   (one TTL check each, distinct IDs) over N keep-alive connections, and
   instances per second written through the agents' gRPC `SyncNode`
   (real mTLS clients that joined with a join token); on PostgreSQL also
   with several `mesh server` processes sharing the database;
2. `GET /v1/health/service/:name` latency with 10,000 instances across
   1,000 services (loaded through `PUT /v1/catalog/register`, timed);
3. blocking-query fan-out: 1,000 watchers of one service (in a separate
   process), one write, time from the write's response to each watcher's
   answer, over several rounds;
4. server RSS per waiting blocking query;
5. transactions per second through `PUT /v1/txn`, each of 10 KV `set`
   operations (one index, all or nothing), over N keep-alive connections.

Run from the repository root: `.venv/bin/python bench/registry.py --help`.
Progress goes to stderr, the figures to stdout. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/registry.py`, the script's folder comes first on sys.path
# and this file would shadow the `registry` package: put the repo root there instead.
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "bench":
    sys.path.pop(0)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.servers import (  # noqa: E402
    MeshServer,
    create_database,
    drop_database,
    make_server,
)

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None

DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres"
TARGETS = {
    "reg_per_s": 2000.0,  # on PostgreSQL
    "sync_per_s": 1000.0,  # instances through SyncNode
    "load_s": 30.0,  # 10,000 instances
    "fanout_p99_ms": 500.0,
    "health_p99_ms": 20.0,
    "kb_per_waiter": 50.0,
}


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_async(coro):
    """Run `coro` on uvloop when available (the client must not be the bottleneck)."""
    if uvloop is not None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of `values`; NaN when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


# --- a minimal HTTP/1.1 client over asyncio streams ------------------------------------


class HttpError(Exception):
    pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class HttpConn:
    """One keep-alive HTTP/1.1 connection: write a request, read one response.

    Deliberately tiny (content-length and chunked bodies only) so that the
    client costs microseconds per request next to the server's milliseconds.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, timeout: float = 10) -> HttpConn:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=1 << 22), timeout
        )
        return self

    def send(self, method: str, path: str, body: bytes = b"") -> None:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Length: {len(body)}\r\n"
            + ("Content-Type: application/json\r\n" if body else "")
            + "\r\n"
        )
        self.writer.write(head.encode() + body)

    async def read_response(self) -> Response:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise HttpError(f"bad status line {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(chunks)
        else:
            body = b""
        return Response(int(parts[1]), headers, body)

    async def request(
        self, method: str, path: str, body: bytes = b"", timeout: float = 30
    ) -> Response:
        self.send(method, path, body)
        return await asyncio.wait_for(self.read_response(), timeout)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def open_conns(host: str, port: int, n: int, parallel: int = 64) -> list[HttpConn]:
    """Open `n` connections, `parallel` at a time (no SYN floods on the listen backlog)."""
    sem = asyncio.Semaphore(parallel)

    async def one() -> HttpConn:
        async with sem:
            return await HttpConn(host, port).open()

    return list(await asyncio.gather(*(one() for _ in range(n))))


# --- server-side probes -----------------------------------------------------------------


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line (11 and 12 here).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_quiet(pid: int, *, window: float = 0.6, max_cpu: float = 0.15, limit: float = 20):
    """Wait until the server's CPU use and RSS level off: it has taken every request in.

    Quiet means under `max_cpu` of one core and RSS within 1% over `window`
    seconds (the background task loop still ticks). Returns the seconds waited.
    """
    t0 = time.monotonic()
    samples: list[tuple[float, float, int]] = []
    while time.monotonic() - t0 < limit:
        samples.append((time.monotonic(), cpu_seconds(pid), rss_kb(pid)))
        old = [s for s in samples if s[0] <= samples[-1][0] - window]
        if old:
            t_a, c_a, r_a = old[-1]
            t_b, c_b, r_b = samples[-1]
            if (c_b - c_a) / (t_b - t_a) <= max_cpu and abs(r_b - r_a) <= 0.01 * r_a:
                return time.monotonic() - t0
        await asyncio.sleep(0.1)
    progress(f"  warning: server still busy after {limit:.0f}s")
    return time.monotonic() - t0


def py_spy() -> str | None:
    """py-spy from PATH or beside this interpreter (the venv), if installed."""
    found = shutil.which("py-spy")
    if found:
        return found
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else None


@contextlib.asynccontextmanager
async def profiled(srv: MeshServer, args, name: str):
    """With `--profile DIR`, sample the server with py-spy while the block runs.

    Writes DIR/<name>.txt as collapsed stacks (`frame;frame;... count` per
    line, idle time excluded) for flamegraph.pl or speedscope.
    """
    if not args.profile:
        yield
        return
    spy = py_spy()
    out = Path(args.profile) / f"{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(srv.proc.pid), "--rate", "250", "--threads",
        "--format", "raw", "--output", str(out), "--nonblocking",
        *(["--gil"] if args.profile_gil else []),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(0.5)  # let it attach
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        progress(f"  profile: {out}")


# --- figures ------------------------------------------------------------------------


@dataclass
class Figures:
    db: str
    values: dict[str, float | str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --- 1. registrations -----------------------------------------------------------------


def cpu_of(servers: list[MeshServer]) -> float:
    return sum(cpu_seconds(s.proc.pid) for s in servers)


async def bench_registrations(servers: list[MeshServer], fig: Figures, args) -> None:
    """Registrations over `--concurrency` connections spread evenly over `servers`."""
    per = [args.concurrency // len(servers)] * len(servers)
    for k in range(args.concurrency % len(servers)):
        per[k] += 1
    conns = []
    for srv, n in zip(servers, per, strict=True):
        conns += await open_conns("127.0.0.1", srv.http_port, n)
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(10**9))

    def body(i: int) -> bytes:
        return json.dumps(
            {
                "ID": f"bench-reg-{i}",
                "Name": f"bench-reg-{i % 100}",
                "Port": 20000 + i % 10000,
                "Tags": ["bench"],
                # Long TTL: no check expires (and writes) while the benchmark runs.
                "Check": {"TTL": "30m"},
            }
        ).encode()

    async def worker(c: HttpConn, deadline: float, limit: int, record: bool) -> None:
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= limit:
                return
            t = time.perf_counter()
            r = await c.request("PUT", "/v1/agent/service/register", body(i))
            if r.status != 200:
                errors.append(f"{r.status} {r.body[:200]!r}")
                continue
            if record:
                latencies.append(time.perf_counter() - t)

    try:
        # Warm-up (first requests import and compile lazily on the server).
        await asyncio.gather(*(worker(c, time.monotonic() + 10, 64, False) for c in conns))
        cpu0 = cpu_of(servers)
        start = time.perf_counter()
        deadline = time.monotonic() + args.reg_seconds
        await asyncio.gather(*(worker(c, deadline, 64 + args.reg_count, True) for c in conns))
        elapsed = time.perf_counter() - start
        cpu = cpu_of(servers) - cpu0
    finally:
        for c in conns:
            c.close()
    n = len(latencies)
    fig.values["reg_cpu_ms"] = cpu / max(n, 1) * 1000
    fig.values["reg_per_s"] = n / elapsed
    fig.values["reg_p50_ms"] = pct(latencies, 0.5) * 1000
    fig.values["reg_p99_ms"] = pct(latencies, 0.99) * 1000
    fig.values["reg_count"] = n
    if errors:
        fig.notes.append(f"registrations: {len(errors)} errors, first: {errors[0]}")
    progress(
        f"  {n} registrations in {elapsed:.1f}s: {n / elapsed:.0f}/s, "
        f"p50 {fig.values['reg_p50_ms']:.1f} ms, p99 {fig.values['reg_p99_ms']:.1f} ms, "
        f"server CPU {fig.values['reg_cpu_ms']:.2f} ms each"
    )


# --- 5. transactions ------------------------------------------------------------------------


def txn_body(i: int, ops: int) -> bytes:
    """One transaction: `ops` KV sets on keys of its own (values change every time)."""
    value = base64.b64encode(f"value-{i}".encode()).decode()
    return json.dumps(
        [
            {"KV": {"Verb": "set", "Key": f"bench/txn/{i % 1000}/{k}", "Value": value}}
            for k in range(ops)
        ]
    ).encode()


async def bench_transactions(servers: list[MeshServer], fig: Figures, args) -> None:
    """`PUT /v1/txn` of `--txn-ops` KV sets each, over `--concurrency` connections."""
    conns = await open_conns("127.0.0.1", servers[0].http_port, args.concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(10**9))

    async def worker(c: HttpConn, deadline: float, limit: int, record: bool) -> None:
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= limit:
                return
            t = time.perf_counter()
            r = await c.request("PUT", "/v1/txn", txn_body(i, args.txn_ops))
            if r.status != 200:
                errors.append(f"{r.status} {r.body[:200]!r}")
                continue
            if record:
                latencies.append(time.perf_counter() - t)

    try:
        await asyncio.gather(*(worker(c, time.monotonic() + 10, 64, False) for c in conns))
        cpu0 = cpu_of(servers)
        start = time.perf_counter()
        deadline = time.monotonic() + args.txn_seconds
        await asyncio.gather(*(worker(c, deadline, 64 + args.txn_count, True) for c in conns))
        elapsed = time.perf_counter() - start
        cpu = cpu_of(servers) - cpu0
    finally:
        for c in conns:
            c.close()
    n = len(latencies)
    fig.values["txn_per_s"] = n / elapsed
    fig.values["txn_ops_per_s"] = n * args.txn_ops / elapsed
    fig.values["txn_p50_ms"] = pct(latencies, 0.5) * 1000
    fig.values["txn_p99_ms"] = pct(latencies, 0.99) * 1000
    fig.values["txn_cpu_ms"] = cpu / max(n, 1) * 1000
    if errors:
        fig.notes.append(f"transactions: {len(errors)} errors, first: {errors[0]}")
    progress(
        f"  {n} transactions of {args.txn_ops} ops in {elapsed:.1f}s: {n / elapsed:.0f}/s, "
        f"p50 {fig.values['txn_p50_ms']:.1f} ms, p99 {fig.values['txn_p99_ms']:.1f} ms, "
        f"server CPU {fig.values['txn_cpu_ms']:.2f} ms each"
    )


# --- 1b. instances through the agents' SyncNode --------------------------------------------


def sync_services(node: int, round_: int, per_node: int) -> list[dict]:
    """A node's services for one round: every instance changes (its tags) each round."""
    return [
        {
            "ID": f"sync-{node}-{i}",
            "Name": f"sync-svc-{i % 50}",
            "Port": 9000 + i,
            "Tags": ["bench", f"r{round_}"],
            "Check": {"CheckID": f"service:sync-{node}-{i}", "TTL": "30m"},
        }
        for i in range(per_node)
    ]


async def bench_syncnode(servers: list[MeshServer], fig: Figures, args) -> None:
    """`--agents` real agents (mTLS gRPC, joined with a join token), each syncing its
    node's `--per-node` services over and over, every sync changing every instance
    (the first registers them): instances written per second, and server CPU each.
    """
    import grpc

    from meshproto.proto import mesh_pb2, mesh_pb2_grpc
    from tests.grpc.conftest import Agent, new_token

    token = new_token(servers[0], uses=args.agents, ttl="1h")["token"]
    agents = [Agent(servers[k % len(servers)], f"bench-agent-{k:03d}") for k in range(args.agents)]
    for a in agents:
        await a.join(token)
    channels = [a.channel() for a in agents]
    stubs = [mesh_pb2_grpc.AgentControlStub(ch) for ch in channels]
    errors: list[str] = []
    written = 0
    counted = False

    async def agent_loop(k: int, deadline: float) -> None:
        nonlocal written
        round_ = 0
        while time.monotonic() < deadline:
            round_ += 1
            state = mesh_pb2.NodeState(
                address="127.0.0.1",
                services_json=[json.dumps(s) for s in sync_services(k, round_, args.per_node)],
            )
            try:
                await stubs[k].SyncNode(state, timeout=60)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            if counted:
                written += args.per_node

    try:
        # Warm-up round: every node registers its instances once.
        await asyncio.gather(
            *(stubs[k].SyncNode(
                mesh_pb2.NodeState(
                    address="127.0.0.1",
                    services_json=[json.dumps(s) for s in sync_services(k, 0, args.per_node)],
                ),
                timeout=60,
            ) for k in range(len(agents)))
        )  # fmt: skip
        counted = True
        cpu0 = cpu_of(servers)
        start = time.perf_counter()
        await asyncio.gather(
            *(agent_loop(k, time.monotonic() + args.reg_seconds) for k in range(len(agents)))
        )
        elapsed = time.perf_counter() - start
        cpu = cpu_of(servers) - cpu0
    finally:
        for ch in channels:
            await ch.close()
    fig.values["sync_per_s"] = written / elapsed
    fig.values["sync_cpu_ms"] = cpu / max(written, 1) * 1000
    if errors:
        fig.notes.append(f"SyncNode: {len(errors)} errors, first: {errors[0]}")
    progress(
        f"  {written} instances through SyncNode ({args.agents} agents x {args.per_node}) "
        f"in {elapsed:.1f}s: {written / elapsed:.0f}/s, server CPU "
        f"{fig.values['sync_cpu_ms']:.2f} ms each"
    )


# --- 2. health reads over a loaded catalog -------------------------------------------------


def catalog_body(service: int, instance: int, nodes: int) -> bytes:
    node = (service * 7 + instance) % nodes
    sid = f"svc-{service:04d}-{instance}"
    return json.dumps(
        {
            "Node": f"bench-node-{node:04d}",
            "Address": f"127.0.{node // 250}.{node % 250 + 1}",
            "Service": {
                "ID": sid,
                "Service": f"svc-{service:04d}",
                "Port": 8000 + instance,
                "Tags": ["bench", f"v{instance % 3}"],
                "Meta": {"version": str(instance % 3)},
            },
            "Check": {
                "CheckID": f"service:{sid}",
                "Name": "bench check",
                "Status": "passing",
                "ServiceID": sid,
            },
        }
    ).encode()


async def load_catalog(srv: MeshServer, fig: Figures, args) -> list[int]:
    """Register `--instances` over `--services` through the catalog, service by service.

    Bounded by `--load-seconds`; loading one service fully before the next
    means a bounded load still leaves complete services (`per` instances
    each) for the health reads. Returns the complete services' numbers.
    """
    per = max(1, args.instances // args.services)
    work = [(s, i) for s in range(args.services) for i in range(per)]
    conns = await open_conns("127.0.0.1", srv.http_port, args.concurrency)
    it = iter(work)
    errors: list[str] = []
    registered = [0] * args.services
    deadline = time.monotonic() + args.load_seconds

    async def worker(c: HttpConn) -> None:
        for s, i in it:
            if time.monotonic() > deadline:
                return
            r = await c.request("PUT", "/v1/catalog/register", catalog_body(s, i, args.nodes))
            if r.status != 200:
                errors.append(f"{r.status} {r.body[:200]!r}")
            else:
                registered[s] += 1

    cpu0 = cpu_seconds(srv.proc.pid)
    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    elapsed = time.perf_counter() - start
    done = sum(registered)
    complete = [s for s, n in enumerate(registered) if n == per]
    fig.values["load_cpu_ms"] = (cpu_seconds(srv.proc.pid) - cpu0) / max(done, 1) * 1000
    fig.values["load_per_s"] = done / elapsed
    fig.values["load_s"] = elapsed if done == len(work) else math.nan
    fig.values["loaded"] = done
    fig.values["loaded_services"] = len(complete)
    if errors:
        fig.notes.append(f"catalog load: {len(errors)} errors, first: {errors[0]}")
    if done < len(work):
        fig.notes.append(
            f"catalog load stopped at its {args.load_seconds:.0f}s bound: {done}/{len(work)} "
            f"instances; health reads use the {len(complete)} complete services"
        )
    progress(
        f"  loaded {done} instances ({len(complete)} complete services) in {elapsed:.1f}s "
        f"({done / elapsed:.0f}/s), server CPU {fig.values['load_cpu_ms']:.2f} ms each"
    )
    return complete


async def bench_health(srv: MeshServer, fig: Figures, args, services: list[int]) -> None:
    """Health reads, uncached then cached, one connection then several.

    The server keeps answers of blocking-capable reads while their topics
    are unchanged, so the first read of a service computes it (uncached) and
    later ones only validate its index (cached): each is measured apart.
    """
    rng = random.Random(42)
    per = max(1, args.instances // args.services)
    if not services:
        fig.notes.append("health: no service was fully loaded")
        return
    services = list(services)
    rng.shuffle(services)
    n_seq = min(args.health_sequential, len(services) // 4)
    seq_services, conc_services = services[:n_seq], services[n_seq:]
    conns = await open_conns("127.0.0.1", srv.http_port, args.health_concurrency)
    errors = 0

    def path(s: int) -> str:
        return f"/v1/health/service/svc-{s:04d}"

    cpu: dict[int, float] = {}  # id(latency list) -> server CPU seconds

    async def run(paths: list[str], use: list[HttpConn]) -> tuple[list[float], float]:
        nonlocal errors
        it = iter(paths)
        out: list[float] = []

        async def worker(c: HttpConn) -> None:
            nonlocal errors
            for p in it:
                t = time.perf_counter()
                r = await c.request("GET", p)
                out.append(time.perf_counter() - t)
                if r.status != 200:
                    errors += 1

        cpu0 = cpu_seconds(srv.proc.pid)
        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in use))
        cpu[id(out)] = cpu_seconds(srv.proc.pid) - cpu0
        return out, time.perf_counter() - start

    try:
        probe = await conns[0].request("GET", path(services[0]))
        got = len(json.loads(probe.body))
        if got != per:
            fig.notes.append(f"health: {path(services[0])} has {got} instances, expected {per}")
        for _ in range(20):  # warm-up on one service (code paths, connections)
            await conns[0].request("GET", path(services[0]))
        seq_cold, _ = await run([path(s) for s in seq_services], conns[:1])
        seq_warm, _ = await run(
            [path(rng.choice(seq_services)) for _ in range(args.health_sequential)], conns[:1]
        )
        conc_cold, t_cold = await run([path(s) for s in conc_services], conns)
        conc_warm, t_warm = await run(
            [path(rng.choice(services)) for _ in range(args.health_requests)], conns
        )
    finally:
        for c in conns:
            c.close()
    v = fig.values
    for name, lat in (
        ("seq_cold", seq_cold),
        ("seq_warm", seq_warm),
        ("cold", conc_cold),
        ("warm", conc_warm),
    ):
        v[f"health_{name}_p50_ms"] = pct(lat, 0.5) * 1000
        v[f"health_{name}_p99_ms"] = pct(lat, 0.99) * 1000
        v[f"health_{name}_cpu_ms"] = cpu.get(id(lat), math.nan) / max(len(lat), 1) * 1000
    v["health_cold_per_s"] = len(conc_cold) / t_cold if conc_cold else math.nan
    v["health_warm_per_s"] = len(conc_warm) / t_warm if conc_warm else math.nan
    if errors:
        fig.notes.append(f"health: {errors} non-200 answers")
    progress(
        f"  health, {len(conns)} conns: uncached ({len(conc_cold)}) p50 {v['health_cold_p50_ms']:.1f} ms "
        f"p99 {v['health_cold_p99_ms']:.1f} ms {v['health_cold_per_s']:.0f}/s "
        f"(server CPU {v['health_cold_cpu_ms']:.2f} ms each); cached ({len(conc_warm)}) "
        f"p50 {v['health_warm_p50_ms']:.1f} ms p99 {v['health_warm_p99_ms']:.1f} ms "
        f"{v['health_warm_per_s']:.0f}/s (server CPU {v['health_warm_cpu_ms']:.2f} ms each)"
    )
    progress(
        f"  health, 1 conn: uncached ({len(seq_cold)}) p50 {v['health_seq_cold_p50_ms']:.1f} ms "
        f"p99 {v['health_seq_cold_p99_ms']:.1f} ms; cached ({len(seq_warm)}) p50 "
        f"{v['health_seq_warm_p50_ms']:.1f} ms p99 {v['health_seq_warm_p99_ms']:.1f} ms"
    )


# --- 3 and 4. blocking-query fan-out and memory per waiter -------------------------------


def watcher_process(conn, port: int, n: int, path: str) -> None:
    """Child process: `n` keep-alive connections that each block on `path`.

    Protocol over the pipe: it answers ("open", n) once connected; then for
    each ("round", index) it sends every request, answers ("sent",), and once
    every answer is in, ("done", [(monotonic_time, status, x_consul_index)],
    its own CPU seconds while waiting and reading);
    ("quit",) ends it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up

    async def main() -> None:
        loop = asyncio.get_running_loop()
        conns = await open_conns("127.0.0.1", port, n)
        conn.send(("open", len(conns)))

        async def one(c: HttpConn) -> tuple[float, int, int]:
            try:
                r = await asyncio.wait_for(c.read_response(), 90)
            except TimeoutError:  # a watcher that never answers is a result too
                return time.monotonic(), -2, 0
            except (OSError, asyncio.IncompleteReadError, HttpError):
                return time.monotonic(), -1, 0
            return time.monotonic(), r.status, int(r.headers.get("x-consul-index", 0))

        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg[0] != "round":
                break
            target = f"{path}?index={msg[1]}&wait=60s"
            for c in conns:
                c.send("GET", target)
            tasks = [asyncio.ensure_future(one(c)) for c in conns]
            await asyncio.gather(*(c.writer.drain() for c in conns))
            conn.send(("sent",))
            cpu0 = time.process_time()
            answers = await asyncio.gather(*tasks)
            conn.send(("done", answers, time.process_time() - cpu0))
        for c in conns:
            c.close()

    with contextlib.suppress(EOFError, BrokenPipeError):
        run_async(main())


async def bench_fanout(srv: MeshServer, fig: Figures, args) -> None:
    pid = srv.proc.pid
    svc = "bench-fanout"
    path = f"/v1/health/service/{svc}"
    writer = await HttpConn("127.0.0.1", srv.http_port).open()
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    child = None
    loop = asyncio.get_running_loop()

    async def recv(timeout: float):
        if not await loop.run_in_executor(None, parent_end.poll, timeout):
            raise RuntimeError(f"watcher process did not answer within {timeout:.0f}s")
        return parent_end.recv()

    def instance(k: int) -> bytes:
        return json.dumps(
            {
                "Node": "bench-fanout-node",
                "Address": "127.0.9.1",
                "Service": {"ID": f"{svc}-{k}", "Service": svc, "Port": 9000 + k},
            }
        ).encode()

    try:
        r = await writer.request("PUT", "/v1/catalog/register", instance(0))
        assert r.status == 200, r
        r = await writer.request("GET", path)
        index = int(r.headers["x-consul-index"])
        await wait_quiet(pid)
        rss_before = rss_kb(pid)
        child = ctx.Process(
            target=watcher_process,
            args=(child_end, srv.http_port, args.watchers, path),
            daemon=True,
        )
        child.start()
        opened = await recv(60)
        progress(f"  {opened[1]} watcher connections open")
        rounds = []
        for rnd in range(1, args.rounds + 1):
            parent_end.send(("round", index))
            await recv(60)  # ("sent",)
            settled = await wait_quiet(pid)
            await asyncio.sleep(args.settle)
            rss_waiting = rss_kb(pid)
            if rnd == 1:
                fig.values["waiter_total_mb"] = (rss_waiting - rss_before) / 1024
                fig.values["kb_per_waiter"] = (rss_waiting - rss_before) / args.watchers
                progress(
                    f"  {args.watchers} waiting after {settled:.1f}s: RSS {rss_before / 1024:.1f} -> "
                    f"{rss_waiting / 1024:.1f} MB ({fig.values['kb_per_waiter']:.1f} KB each)"
                )
            cpu0 = cpu_seconds(pid)
            t_write = time.monotonic()
            r = await writer.request("PUT", "/v1/catalog/register", instance(rnd))
            t_acked = time.monotonic()
            assert r.status == 200, r
            _, answers, client_cpu = await recv(120)
            cpu = cpu_seconds(pid) - cpu0
            ok = [a for a in answers if a[1] == 200 and a[2] > index]
            early = sum(1 for a in answers if a[0] < t_write)
            lat = [(a[0] - t_acked) * 1000 for a in ok]
            lat_from_write = [(a[0] - t_write) * 1000 for a in ok]
            rounds.append(
                {
                    "p50": pct(lat, 0.5),
                    "p99": pct(lat, 0.99),
                    "max": max(lat) if lat else math.nan,
                    "max_from_write": max(lat_from_write) if lat else math.nan,
                    "write_ms": (t_acked - t_write) * 1000,
                    "ok": len(ok),
                    "cpu_ms": cpu * 1000,
                    "client_cpu_ms": client_cpu * 1000,
                }
            )
            if len(ok) != len(answers) or early:
                fig.notes.append(
                    f"fan-out round {rnd}: {len(ok)}/{len(answers)} watchers answered 200 with a new "
                    f"index, {early} returned before the write"
                )
            progress(
                f"  round {rnd}: {len(ok)} woken; from the write's response p50 "
                f"{rounds[-1]['p50']:.0f} ms, p99 {rounds[-1]['p99']:.0f} ms, max {rounds[-1]['max']:.0f} ms "
                f"(write took {rounds[-1]['write_ms']:.1f} ms, server CPU {cpu * 1000:.0f} ms, "
                f"watcher process CPU {client_cpu * 1000:.0f} ms)"
            )
            index = max([a[2] for a in ok] or [index + 1])
        fig.values["fanout_rounds"] = rounds
        fig.values["fanout_p99_ms"] = max(r["p99"] for r in rounds)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            parent_end.send(("quit",))
        if child is not None:
            child.join(5)
            if child.is_alive():
                child.terminate()
                child.join(5)


# --- one database ---------------------------------------------------------------------


async def run_phases(servers: list[MeshServer], fig: Figures, args, phases: set[str]) -> None:
    db = fig.db
    srv = servers[0]
    if "register" in phases:
        progress(
            f"[{db}] 1. registrations, {args.concurrency} connections, {args.reg_seconds:.0f}s"
        )
        async with profiled(srv, args, f"{db}-1-register"):
            await bench_registrations(servers, fig, args)
    if "sync" in phases:
        progress(f"[{db}] 1b. SyncNode, {args.agents} agents x {args.per_node} instances")
        async with profiled(srv, args, f"{db}-1b-sync"):
            await bench_syncnode(servers, fig, args)
    if "health" in phases:
        progress(
            f"[{db}] 2. loading {args.instances} instances of {args.services} services "
            f"through /v1/catalog/register"
        )
        async with profiled(srv, args, f"{db}-2-catalog-load"):
            loaded = await load_catalog(srv, fig, args)
        progress(f"[{db}]    health reads")
        async with profiled(srv, args, f"{db}-2-health"):
            await bench_health(srv, fig, args, loaded)
    if "fanout" in phases:
        progress(f"[{db}] 3. fan-out to {args.watchers} watchers, {args.rounds} rounds")
        async with profiled(srv, args, f"{db}-3-fanout"):
            await bench_fanout(srv, fig, args)
    if "txn" in phases:
        progress(
            f"[{db}] 5. transactions of {args.txn_ops} KV ops, {args.concurrency} connections, "
            f"{args.txn_seconds:.0f}s"
        )
        async with profiled(srv, args, f"{db}-5-txn"):
            await bench_transactions(servers, fig, args)


def run_db(db: str, args, servers: int = 1, phases: set[str] | None = None) -> Figures:
    """Run `phases` against `servers` fresh `mesh server` processes sharing one database."""
    label = db if servers == 1 else f"{db} x{servers}"
    phases = args.phases if phases is None else phases
    fig = Figures(label)
    # Other work on the machine skews every figure: say how busy it was.
    fig.values["loadavg"] = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix=f"meshweb-bench-{db}-"))
    database_url = None
    started: list[MeshServer] = []
    try:
        if db == "postgres":
            database_url = create_database(args.postgres)
            progress(f"[{label}] created database {database_url.rsplit('/', 1)[-1]}")
        os.environ.pop("DATABASE_URL", None)  # make_server reads it: choose explicitly
        for k in range(servers):
            started.append(
                make_server(
                    tmp / f"server-{k}",
                    # Several servers announce changes to each other over Redis.
                    redis=args.redis or servers > 1,
                    database_url=database_url,
                    extra_env={
                        "MESH_LOG_LEVEL": "WARNING",
                        # The production default (test servers tick 5 times a second).
                        "MESH_TASK_TICK_SECONDS": "1",
                        **dict(kv.split("=", 1) for kv in args.server_env),
                    },
                )
            )
            progress(f"[{label}] mesh server pid {started[-1].proc.pid} on {started[-1].addr}")
        run_async(run_phases(started, fig, args, phases))
    except Exception as exc:
        fig.notes.append(f"aborted: {type(exc).__name__}: {exc}")
        progress(f"[{label}] aborted: {type(exc).__name__}: {exc}")
        for srv in started:
            progress(srv.log()[-2000:])
    finally:
        for srv in started:
            srv.stop()
        if database_url:
            drop_database(database_url)
            progress(f"[{label}] dropped database")
        shutil.rmtree(tmp, ignore_errors=True)
    return fig


# --- report -----------------------------------------------------------------------------


def _fmt(v, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def report(figs: list[Figures], args) -> None:
    def row(label: str, cell: Callable[[Figures], str], target: str = "") -> str | None:
        texts = [cell(f) for f in figs]
        if all(t.strip(" /-") == "" for t in texts):
            return None  # a phase that did not run
        cells = "".join(f"{t:>22}" for t in texts)
        return f"{label:<44}{cells}   {target}".rstrip()

    def check(key: str, limit: float, higher: bool, spec: str) -> Callable[[Figures], str]:
        def cell(f: Figures) -> str:
            v = f.values.get(key)
            if v is None:
                return "-"
            ok = v >= limit if higher else v <= limit
            return f"{_fmt(v, spec)} {'ok' if ok else 'MISS'}"

        return cell

    def vals(*keys: str, spec: str = ".1f") -> Callable[[Figures], str]:
        """Values joined by " / "; a key may carry its own format as "key:spec"."""

        def cell(f: Figures) -> str:
            parts = []
            for k in keys:
                name, _, own = k.partition(":")
                parts.append(_fmt(f.values.get(name), own or spec))
            return " / ".join(parts)

        return cell

    def rnd(i: int) -> Callable[[Figures], str]:
        def cell(f: Figures) -> str:
            rounds = f.values.get("fanout_rounds") or []
            if i >= len(rounds):
                return "-"
            r = rounds[i]
            return f"{r['p50']:.0f}/{r['p99']:.0f}/{r['max']:.0f} ({r['cpu_ms']:.0f})"

        return cell

    hc = args.health_concurrency
    out = [
        f"meshweb registry benchmark - {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"redis {'on' if args.redis else 'off'}",
        row("figure", lambda f: f.db, "target"),
        row("machine load average before the run", vals("loadavg", spec=".2f")),
        row(
            f"registrations/s (agent, {args.concurrency} conns)",
            check("reg_per_s", TARGETS["reg_per_s"], True, ".0f"),
            ">= 2000/s on PostgreSQL",
        ),
        row("  latency p50 / p99 ms", vals("reg_p50_ms", "reg_p99_ms")),
        row("  server CPU ms per registration", vals("reg_cpu_ms", spec=".2f")),
        row(
            f"SyncNode instances/s ({args.agents} agents x {args.per_node})",
            check("sync_per_s", TARGETS["sync_per_s"], True, ".0f"),
            ">= 1000/s",
        ),
        row("  server CPU ms per instance", vals("sync_cpu_ms", spec=".2f")),
        row(
            f"catalog registers/s ({args.concurrency} conns)",
            vals("load_per_s", spec=".0f"),
        ),
        row(
            "  instances / complete services loaded", vals("loaded", "loaded_services", spec=".0f")
        ),
        row(
            f"  seconds to load {args.instances} instances",
            check("load_s", TARGETS["load_s"], False, ".1f"),
            "< 30 s",
        ),
        row("  server CPU ms per catalog register", vals("load_cpu_ms", spec=".2f")),
        row(
            f"health p99 ms, {hc} conns, uncached",
            check("health_cold_p99_ms", TARGETS["health_p99_ms"], False, ".1f"),
            "< 20 ms",
        ),
        row("  p50 ms / req/s", vals("health_cold_p50_ms", "health_cold_per_s:.0f")),
        row("  server CPU ms per read", vals("health_cold_cpu_ms", spec=".2f")),
        row(
            f"health p99 ms, {hc} conns, cached",
            check("health_warm_p99_ms", TARGETS["health_p99_ms"], False, ".1f"),
            "< 20 ms",
        ),
        row("  p50 ms / req/s", vals("health_warm_p50_ms", "health_warm_per_s:.0f")),
        row("  server CPU ms per read", vals("health_warm_cpu_ms", spec=".2f")),
        row(
            "health 1 conn p50 / p99 ms, uncached",
            vals("health_seq_cold_p50_ms", "health_seq_cold_p99_ms"),
        ),
        row(
            "health 1 conn p50 / p99 ms, cached",
            vals("health_seq_warm_p50_ms", "health_seq_warm_p99_ms"),
        ),
        row(
            f"fan-out to {args.watchers}: worst round p99 ms",
            check("fanout_p99_ms", TARGETS["fanout_p99_ms"], False, ".0f"),
            "< 500 ms",
        ),
    ]
    out += [
        row(f"  round {i + 1} p50/p99/max ms (server CPU ms)", rnd(i)) for i in range(args.rounds)
    ]
    out += [
        row(
            "memory per waiting query KB",
            check("kb_per_waiter", TARGETS["kb_per_waiter"], False, ".1f"),
            "< 50 KB",
        ),
        row(f"  RSS growth for {args.watchers} waiters MB", vals("waiter_total_mb")),
        row(
            f"transactions/s ({args.txn_ops} KV ops each, {args.concurrency} conns)",
            vals("txn_per_s", spec=".0f"),
        ),
        row("  KV ops/s in transactions", vals("txn_ops_per_s", spec=".0f")),
        row("  latency p50 / p99 ms", vals("txn_p50_ms", "txn_p99_ms")),
        row("  server CPU ms per transaction", vals("txn_cpu_ms", spec=".2f")),
    ]
    for f in figs:
        for note in f.notes:
            out.append(f"note [{f.db}]: {note}")
    print("\n".join(line for line in out if line is not None), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument(
        "--redis", action="store_true", help="give the server REDIS_URL (fan-out via Redis)"
    )
    p.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
        help="PostgreSQL server to create the benchmark's database on (default %(default)s)",
    )
    p.add_argument(
        "--phases",
        type=lambda v: set(v.split(",")),
        default={"register", "sync", "health", "fanout", "txn"},
        help="comma-separated subset of register,sync,health,fanout,txn "
        "(health loads the catalog first)",
    )
    p.add_argument(
        "--servers",
        type=int,
        default=2,
        help="PostgreSQL only: also run register,sync with this many servers on one "
        "database (1: skip)",
    )
    p.add_argument("--agents", type=int, default=16, help="SyncNode: agents (nodes) at once")
    p.add_argument("--per-node", type=int, default=25, help="SyncNode: instances per node")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server (repeatable), e.g. MESH_DB_THREADS=4",
    )
    p.add_argument("--concurrency", type=int, default=16, help="connections for writes")
    p.add_argument("--reg-seconds", type=float, default=10, help="registration phase length")
    p.add_argument("--reg-count", type=int, default=20000, help="registration phase cap")
    p.add_argument("--txn-ops", type=int, default=10, help="KV operations per transaction")
    p.add_argument("--txn-seconds", type=float, default=10, help="transaction phase length")
    p.add_argument("--txn-count", type=int, default=20000, help="transaction phase cap")
    p.add_argument("--instances", type=int, default=10000)
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--nodes", type=int, default=200, help="nodes the instances spread over")
    p.add_argument("--load-seconds", type=float, default=60, help="catalog load bound")
    p.add_argument("--health-concurrency", type=int, default=8)
    p.add_argument(
        "--health-requests", type=int, default=2000, help="cached reads at --health-concurrency"
    )
    p.add_argument(
        "--health-sequential", type=int, default=250, help="reads on one connection, each way"
    )
    p.add_argument("--watchers", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settle", type=float, default=0.5, help="extra sleep once watchers are in")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="sample the server with py-spy during each phase into DIR/<db>-<phase>.txt",
    )
    p.add_argument(
        "--profile-gil",
        action="store_true",
        help="profile only threads holding the GIL (where Python CPU goes), not all threads",
    )
    args = p.parse_args(argv)
    if any("=" not in kv for kv in args.server_env):
        p.error("--server-env takes NAME=VALUE")
    if args.profile and py_spy() is None:
        p.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    unknown = args.phases - {"register", "sync", "health", "fanout", "txn"}
    if unknown:
        p.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    return args


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(max(soft, need), hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < need:
        progress(f"warning: open-file limit {want} is below the {need} this run wants")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Client sockets, plus the server's (it inherits the limit): watchers, twice, and slack.
    raise_nofile(2 * args.watchers + 1024)

    def on_term(signum, frame):  # run the cleanup in `finally` blocks on SIGTERM too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    figs: list[Figures] = []
    started = time.monotonic()
    try:
        for db in dbs:
            figs.append(run_db(db, args))
            multi = args.phases & {"register", "sync"}
            if db == "postgres" and args.servers > 1 and multi:
                figs.append(run_db(db, args, servers=args.servers, phases=multi))
    except KeyboardInterrupt:
        progress("interrupted: cleaned up")
        if not figs:
            return 130
    progress(f"done in {time.monotonic() - started:.0f}s")
    report(figs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
