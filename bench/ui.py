#!/usr/bin/env python
"""Web UI page timings: prints figures, asserts nothing.

Starts a real `mesh server` (ACLs on; SQLite by default, or a fresh
PostgreSQL database with `--postgres`), loads `--instances` service instances
over `--services` services through `PUT /v1/catalog/register` (1% of them
with a critical check), gives every service a sidecar declaring up to three
upstreams and writes a few hundred intentions, then measures, signed in with
the management token:

1. server time: time to first byte of `GET /ui/services` (the first page of
   the list, all instances aggregated), a filtered list, a service page and
   `GET /ui/topology.json` (the graph), over `--rounds` requests (median, p95);
2. in Chromium (`/usr/bin/chromium`, headless, 1280x800): the services list's
   navigation timings (first byte, DOMContentLoaded, load) and the topology
   page until its graph is drawn (dagre layout + SVG).

Run from the repository root: `.venv/bin/python bench/ui.py --help`.
Progress goes to stderr, the figures to stdout. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.support.servers import create_database, make_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def instance_body(service: int, instance: int, nodes: int) -> dict:
    node = (service * 7 + instance) % nodes
    sid = f"svc-{service:03d}-{instance}"
    return {
        "Node": f"bench-node-{node:04d}",
        "Address": f"127.0.{node // 250}.{node % 250 + 1}",
        "Service": {
            "ID": sid,
            "Service": f"svc-{service:03d}",
            "Port": 8000 + instance,
            "Tags": ["bench", f"v{instance % 3}"],
            "Meta": {"version": str(instance % 3)},
        },
        "Check": {
            "CheckID": f"service:{sid}",
            "Name": "bench check",
            "Status": "critical" if (service * 131 + instance) % 100 == 0 else "passing",
            "Output": "HTTP GET /healthz: 200 OK",
            "ServiceID": sid,
        },
    }


def sidecar_body(service: int, services: int) -> dict:
    name = f"svc-{service:03d}"
    ups = sorted({(service * k + 1) % services for k in (3, 7, 11)} - {service})
    return {
        "Node": f"bench-node-{service % 50:04d}",
        "Address": "127.0.0.1",
        "Service": {
            "ID": f"{name}-sidecar-proxy",
            "Service": f"{name}-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {
                "DestinationServiceName": name,
                "Upstreams": [
                    {"DestinationName": f"svc-{u:03d}", "LocalBindPort": 9000 + i}
                    for i, u in enumerate(ups)
                ],
            },
        },
    }


def load(srv, args) -> None:
    per = max(1, args.instances // args.services)
    bodies = [instance_body(s, i, args.nodes) for s in range(args.services) for i in range(per)]
    bodies += [sidecar_body(s, args.services) for s in range(args.services)]
    headers = {"X-Consul-Token": srv.token}
    started = time.perf_counter()
    deadline = time.monotonic() + args.load_seconds

    def put(chunk: list[dict]) -> int:
        done = 0
        with httpx.Client(base_url=srv.url, headers=headers, timeout=60) as c:
            for body in chunk:
                if time.monotonic() > deadline:
                    break
                r = c.put("/v1/catalog/register", json=body)
                if r.status_code != 200:
                    raise SystemExit(f"register failed: {r.status_code} {r.text[:200]}")
                done += 1
        return done

    chunks = [bodies[i :: args.concurrency] for i in range(args.concurrency)]
    with ThreadPoolExecutor(args.concurrency) as pool:
        done = sum(pool.map(put, chunks))
    log(f"loaded {done} registrations in {time.perf_counter() - started:.1f}s")
    with httpx.Client(base_url=srv.url, headers=headers, timeout=60) as c:
        for s in range(0, args.services, 2):
            action = "deny" if s % 10 == 0 else "allow"
            up = (s * 3 + 1) % args.services
            c.put(
                "/v1/connect/intentions/exact",
                params={"source": f"svc-{s:03d}", "destination": f"svc-{up:03d}"},
                json={"Action": action},
            )


def session_client(srv) -> httpx.Client:
    """An HTTP client signed in to the UI (the session cookie, as a browser holds it)."""
    c = httpx.Client(base_url=srv.url, timeout=60)
    r = c.get("/ui/login")
    csrf = c.cookies["csrftoken"]
    r = c.post("/ui/login", data={"token": srv.token, "csrfmiddlewaretoken": csrf, "next": "/ui/"})
    assert r.status_code in (302, 200), r.status_code
    assert "sessionid" in c.cookies, "sign-in failed"
    return c


def ttfb(client: httpx.Client, path: str, rounds: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(rounds):
        start = time.perf_counter()
        with client.stream("GET", path) as r:
            first = None
            body = b""
            for chunk in r.iter_raw():
                if first is None:
                    first = time.perf_counter() - start
                body += chunk
            if r.status_code != 200:
                raise SystemExit(f"{path}: {r.status_code}")
        times.append(first or 0.0)
        size = len(body)
    return times, size


def fmt(times: list[float]) -> str:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return f"median {statistics.median(ordered) * 1000:7.1f} ms   p95 {p95 * 1000:7.1f} ms"


def browser_figures(srv, args) -> list[str]:
    if not Path(CHROMIUM).exists():
        return [f"browser: skipped ({CHROMIUM} missing: apt-get install -y chromium)"]
    from playwright.sync_api import sync_playwright

    out = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(srv.url + "/ui/login")
        page.fill("#token", srv.token)
        page.click("main button[type=submit]")
        page.wait_for_url("**/ui/")
        for name, path, ready in (
            ("services list", "/ui/services", None),
            ("topology", "/ui/topology", "#topology[data-drawn]"),
        ):
            loads, usable = [], []
            for _ in range(args.browser_rounds):
                start = time.perf_counter()
                page.goto(srv.url + path)
                if ready:
                    page.wait_for_selector(ready, state="attached", timeout=120000)
                usable.append(time.perf_counter() - start)
                nav = json.loads(
                    page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])")
                )
                loads.append(nav)
            first_byte = [n["responseStart"] / 1000 for n in loads]
            dom = [n["domContentLoadedEventEnd"] / 1000 for n in loads]
            out.append(f"{name:22s} first byte    {fmt(first_byte)}")
            out.append(f"{name:22s} DOM ready     {fmt(dom)}")
            out.append(f"{name:22s} usable{' (drawn)' if ready else ''} {fmt(usable)}")
        browser.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--services", type=int, default=200)
    p.add_argument("--nodes", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--load-seconds", type=float, default=600, help="bound on the load phase")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--browser-rounds", type=int, default=5)
    p.add_argument("--postgres", default="", help="base URL: use a fresh PostgreSQL database")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    db = create_database(args.postgres) if args.postgres else None
    # httpx's cookie jar keeps Secure cookies off plain HTTP: serve them without the flag.
    extra = {"MESH_TASK_TICK_SECONDS": "1", "MESH_UI_SECURE_COOKIES": "false"}
    env_db = os.environ.pop("DATABASE_URL", None)
    srv = make_server(tmp / "server", acl=True, database_url=db, extra_env=extra, redis=False)
    if env_db is not None:
        os.environ["DATABASE_URL"] = env_db
    srv.owns_database = bool(db)
    try:
        log(f"server on {srv.url} ({'postgres' if db else 'sqlite'}); loading…")
        load(srv, args)
        client = session_client(srv)
        rows = [
            f"# web UI, {args.instances} instances over {args.services} services, "
            f"{'PostgreSQL' if db else 'SQLite'}, load average {os.getloadavg()[0]:.2f}",
            "server (time to first byte, signed in):",
        ]
        for name, path in (
            ("services list", "/ui/services"),
            ("services, filtered", "/ui/services?q=svc-01&health=critical"),
            ("service page", "/ui/services/svc-007"),
            ("overview", "/ui/"),
            ("topology graph JSON", "/ui/topology.json"),
        ):
            times, size = ttfb(client, path, args.rounds)
            rows.append(f"  {name:22s} {fmt(times)}   ({size // 1024} KiB)")
        rows.append("browser (Chromium headless, 1280x800):")
        rows += ["  " + r for r in browser_figures(srv, args)]
        print("\n".join(rows))
    finally:
        srv.close()


if __name__ == "__main__":
    main()
