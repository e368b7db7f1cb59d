#!/usr/bin/env python
"""Intention authorization benchmark: prints figures, asserts nothing.

With 10,000 intentions loaded (exact pairs, wildcard sources, wildcard
destinations), measures:

1. pure decisions per second (`meshproto.intentions.IntentionIndex.decide`,
   what a sidecar runs), next to the same with 10 intentions loaded: the two
   should be close, since a decision never scans;
2. authorizations per second through `POST /v1/agent/connect/authorize` on a
   real `mesh server` (ACLs off), over N keep-alive connections, with
   p50/p99 latency; every answer is checked against the pure decision.

Run from the repository root: `.venv/bin/python bench/intentions.py --help`.
`section(args)` is the entry point another benchmark (bench/ca.py) can call.
Progress goes to stderr, the figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "bench":
    sys.path.pop(0)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meshproto.intentions import Intention, IntentionIndex  # noqa: E402
from tests.support.servers import create_database, drop_database, make_server  # noqa: E402


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def workload(n: int) -> list[tuple[str, str, str]]:
    """`n` intentions (source, destination, action) over n/10 destinations:
    mostly exact pairs, one `* => dst` deny per destination, a few `src => *`."""
    dests = max(1, n // 10)
    out: list[tuple[str, str, str]] = []
    for d in range(dests):
        out.append(("*", f"svc-{d}", "deny"))
    wild = max(1, n // 1000)
    i = 0
    while len(out) < n - wild:
        out.append((f"client-{i}", f"svc-{i % dests}", "allow" if i % 7 else "deny"))
        i += 1
    for j in range(n - len(out)):
        out.append((f"ops-{j}", "*", "allow"))
    return out


def queries(rows: list[tuple[str, str, str]], count: int, seed: int = 7) -> list[tuple[str, str]]:
    """Source/destination pairs to ask about: hits, wildcard hits and misses."""
    rnd = random.Random(seed)
    exact = [(s, d) for s, d, _ in rows if s != "*" and d != "*"]
    out = []
    for _ in range(count):
        r = rnd.random()
        if r < 0.6:
            out.append(rnd.choice(exact))  # an exact intention
        elif r < 0.9:
            out.append((f"stranger-{rnd.randrange(10**6)}", rnd.choice(exact)[1]))  # `* => dst`
        else:
            out.append((f"stranger-{rnd.randrange(10**6)}", f"nowhere-{rnd.randrange(1000)}"))
    return out


def pure_rate(n: int, asks: list[tuple[str, str]], seconds: float) -> tuple[float, IntentionIndex]:
    """Decisions/s of one thread asking `asks` over and over of an index of `n` intentions."""
    index = IntentionIndex(
        Intention(source_name=s, destination_name=d, action=a, id=str(i))
        for i, (s, d, a) in enumerate(workload(n))
    )
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for source, destination in asks:
            index.decide(source, destination)
        done += len(asks)
    return done / (time.perf_counter() - start), index


async def _load(base: str, rows: list[tuple[str, str, str]], conns: int) -> None:
    import httpx

    # One service-intentions entry per destination: a tenth of the writes of
    # one exact PUT per intention, and the same rows.
    by_destination: dict[str, list[dict]] = {}
    for source, destination, action in rows:
        by_destination.setdefault(destination, []).append({"Name": source, "Action": action})
    queue: asyncio.Queue = asyncio.Queue()
    for destination, sources in by_destination.items():
        queue.put_nowait({"Kind": "service-intentions", "Name": destination, "Sources": sources})

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            r = await client.put("/v1/config", json=queue.get_nowait())
            r.raise_for_status()

    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(conns)))


async def _authorize(
    port: int, asks: list[tuple[str, str]], domain: str, conns: int, seconds: float, index
) -> tuple[int, list[float], int]:
    """POST authorize back to back on `conns` keep-alive connections (bench/registry.py's
    tiny client: microseconds per request, so the server is what is measured)."""
    import json

    from bench.registry import open_conns

    latencies: list[float] = []
    wrong = done = 0
    deadline = time.perf_counter() + seconds
    bodies = [
        (
            source,
            destination,
            json.dumps(
                {
                    "Target": destination,
                    "ClientCertURI": f"spiffe://{domain}/ns/default/dc/dc1/svc/{source}",
                    "ClientCertSerial": "01",
                }
            ).encode(),
        )
        for source, destination in asks
    ]

    async def worker(k: int, conn) -> None:
        nonlocal done, wrong
        i = k
        while time.perf_counter() < deadline:
            source, destination, body = bodies[i % len(bodies)]
            i += conns
            t0 = time.perf_counter()
            r = await conn.request("POST", "/v1/agent/connect/authorize", body)
            latencies.append(time.perf_counter() - t0)
            if r.status != 200:
                raise RuntimeError(f"authorize answered {r.status}: {r.body[:200]!r}")
            if json.loads(r.body)["Authorized"] != index.decide(source, destination).allowed:
                wrong += 1
            done += 1

    pool = await open_conns("127.0.0.1", port, conns)
    try:
        await asyncio.gather(*(worker(k, c) for k, c in enumerate(pool)))
    finally:
        for c in pool:
            c.close()
    return done, latencies, wrong


async def _baseline(port: int, conns: int, seconds: float) -> float:
    """Requests/s of the cheapest endpoint on the same server and client: the
    ceiling the HTTP stack (and this machine) puts on any endpoint."""
    from bench.registry import open_conns

    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(conn) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            r = await conn.request("GET", "/v1/status/leader")
            if r.status != 200:
                raise RuntimeError(f"status/leader answered {r.status}")
            done += 1

    pool = await open_conns("127.0.0.1", port, conns)
    try:
        await asyncio.gather(*(worker(c) for c in pool))
    finally:
        for c in pool:
            c.close()
    return done / seconds


def http_rate(args, rows, asks, index) -> dict:
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="bench-intentions-"))
    db_url = create_database(args.postgres_url) if args.database == "postgres" else None
    # make_server falls back to $DATABASE_URL: keep it out for the embedded default.
    saved = os.environ.pop("DATABASE_URL", None)
    try:
        srv = make_server(tmp, database_url=db_url, extra_env={"MESH_LOG_LEVEL": "WARNING"})
    finally:
        if saved is not None:
            os.environ["DATABASE_URL"] = saved
    try:
        progress(f"loading {len(rows)} intentions into {srv.url} ({args.database}) ...")
        t0 = time.perf_counter()
        asyncio.run(_load(srv.url, rows, args.connections))
        load_s = time.perf_counter() - t0
        with httpx.Client(base_url=srv.url) as c:
            r = c.get("/v1/connect/ca/roots")
            domain = (r.json().get("TrustDomain") if r.status_code == 200 else "") or "bench.mesh"
            assert len(c.get("/v1/connect/intentions").json()) == len(rows)
        progress(f"loaded in {load_s:.1f}s; baseline GET /v1/status/leader for {args.seconds}s ...")
        baseline = asyncio.run(_baseline(srv.http_port, args.connections, args.seconds))
        progress(f"authorizing for {args.seconds}s ...")
        asyncio.run(_authorize(srv.http_port, asks[:200], domain, args.connections, 1.0, index))
        done, lat, wrong = asyncio.run(
            _authorize(srv.http_port, asks, domain, args.connections, args.seconds, index)
        )
        return {
            "load_s": load_s,
            "rate": done / args.seconds,
            "p50_ms": pct(lat, 0.5) * 1000,
            "p99_ms": pct(lat, 0.99) * 1000,
            "answers": done,
            "wrong": wrong,
            "baseline": baseline,
        }
    finally:
        srv.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if db_url:
            drop_database(db_url)


def section(args: argparse.Namespace) -> dict:
    """The intentions section: pure and HTTP authorization rates; prints and returns the figures."""
    rows = workload(args.intentions)
    asks = queries(rows, 5000)
    progress(f"pure decisions with {len(rows)} and with 10 intentions ...")
    # Alternate the two and keep each one's best round: a shared machine's load
    # then weighs on both alike.
    small_asks = queries(workload(10), 5000)
    small_rate = rate = 0.0
    for _ in range(3):
        small_rate = max(small_rate, pure_rate(10, small_asks, args.seconds / 3)[0])
        r, index = pure_rate(len(rows), asks, args.seconds / 3)
        rate = max(rate, r)
    figures = {"intentions": len(rows), "pure_rate": rate, "pure_rate_10": small_rate}
    print("== intentions: authorization ==")
    print(f"intentions loaded                   {len(rows):>10,}")
    print(f"pure decide, 10,000 intentions      {rate:>10,.0f} decisions/s")
    print(f"pure decide, 10 intentions          {small_rate:>10,.0f} decisions/s")
    if not args.no_http:
        h = http_rate(args, rows, asks, index)
        figures["http"] = h
        print(f"HTTP authorize ({args.database}, {args.connections} conns)")
        print(f"  POST /v1/agent/connect/authorize  {h['rate']:>10,.0f} authorizations/s")
        print(f"  baseline GET /v1/status/leader    {h['baseline']:>10,.0f} requests/s")
        print(f"  latency p50 / p99                 {h['p50_ms']:>7.2f} / {h['p99_ms']:.2f} ms")
        print(f"  answers checked / wrong           {h['answers']:>10,} / {h['wrong']}")
        print(f"  loading (service-intentions)      {h['load_s']:>10.1f} s")
    sys.stdout.flush()
    return figures


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--intentions", type=int, default=10_000, help="intentions to load")
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    p.add_argument("--connections", type=int, default=16, help="HTTP keep-alive connections")
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
    )
    p.add_argument("--no-http", action="store_true", help="pure decisions only")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    section(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
