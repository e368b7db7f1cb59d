#!/usr/bin/env python
"""Connect CA benchmark: prints figures, asserts nothing.

Sections (`--sections`, default all), each a function that prints its table rows:

- `signing`: leaf signings per second with a P-256 root and with an RSA-2048
  root (the leaf key is always P-256; the root's key is what signs):
  1. the provider alone (`BuiltinProvider.sign_leaf`: the cryptography cost);
  2. `registry.domain.connect_ca.sign_csr` in this process (CSR parse and
     validation, signing, the `IssuedCert` record in its own transaction);
  3. `POST /api/ca/sign` on a real `mesh server` (ACLs off) over N keep-alive
     connections, next to `GET /api/ca/roots` through the same /api stack
     (the floor any /api request pays).
  The CSR rate limit is switched off (CSRMaxPerSecond 0): these are the
  CA's raw rates; in production the limit (default 50/s per server) caps them.
- `intentions`: intention authorizations per second with 10,000 intentions
  loaded (`bench/intentions.py`'s section).

Run from the repository root: `.venv/bin/python bench/ca.py --help`.
Progress goes to stderr, the figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/ca.py`, the script's folder comes first on sys.path and
# bench/registry.py would shadow the `registry` package: put the repo root there instead.
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "bench":
    sys.path.pop(0)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402

from tests.support.servers import create_database, drop_database, make_server  # noqa: E402

ROOT_KINDS = [("P-256", "ec", 256), ("RSA-2048", "rsa", 2048)]


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def row(root: str, path: str, count: int, seconds: float) -> float:
    """Print one table row; returns the rate."""
    rate = count / seconds if seconds > 0 else 0.0
    print(f"{root:<10} {path:<44} {count:>8,} {seconds:>7.2f}s {rate:>10,.0f}/s", flush=True)
    return rate


def timed(fn: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Call `fn` for about `seconds`; (calls, elapsed)."""
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        fn()
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count, now - start


# --- the in-process Django side ----------------------------------------------------------------


class InProcess:
    """Django set up in this process on a database of its own (made and dropped here)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="bench-ca-"))
        self.database_url: str | None = None
        if args.database == "postgres":
            self.database_url = create_database(args.postgres_url)
        os.environ.update(
            {
                "DJANGO_SETTINGS_MODULE": "meshweb.settings",
                "MESH_DATA_DIR": str(self.data_dir),
                "MESH_ACL_ENABLED": "false",
                "MESH_CA_CSR_RATE": "0",
                "MESH_SECRET_KEY": "bench-secret-key",
                "MESH_LOG_LEVEL": "WARNING",
            }
        )
        if self.database_url:
            os.environ["DATABASE_URL"] = self.database_url
        else:
            os.environ.pop("DATABASE_URL", None)
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        from registry.ca.manager import ensure_initialized

        ensure_initialized()

    def close(self) -> None:
        from django.db import connections

        connections.close_all()
        if self.database_url:
            drop_database(self.database_url)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def signing_section(args: argparse.Namespace) -> dict:
    """Leaf signings per second: provider alone, in-process domain, HTTP."""
    figures: dict = {}
    print(f"== CA: leaf signings ({args.database}; leaf keys P-256; rate limit off) ==")
    print(f"{'root':<10} {'path':<44} {'signings':>8} {'time':>8} {'rate':>12}")
    local = InProcess(args)
    srv = None
    try:
        from meshproto import pki, spiffe
        from registry.acl_rules import Authorizer
        from registry.domain import connect_ca
        from registry.domain.acl import Identity

        operator = Identity("bench", Authorizer.management(), "bench")
        if not args.no_http:
            progress("starting a mesh server for the HTTP figures ...")
            srv = make_server(
                Path(tempfile.mkdtemp(prefix="bench-ca-srv-")),
                database_url=create_database(args.postgres_url)
                if args.database == "postgres"
                else None,
                extra_env={"MESH_CA_CSR_RATE": "0", "MESH_LOG_LEVEL": "WARNING"},
            )
            srv.owns_database = args.database == "postgres"
        for label, key_type, bits in ROOT_KINDS:
            config = {"PrivateKeyType": key_type, "PrivateKeyBits": bits, "CSRMaxPerSecond": 0}
            connect_ca.set_configuration({"Provider": "consul", "Config": config})
            state = connect_ca.signing_state()
            key = pki.generate_key()
            uri = spiffe.service_id(state.trust_domain, "web", "dc1").uri
            csr_pem = pki.make_csr(key, uri)
            csr = x509.load_pem_x509_csr(csr_pem.encode())
            ttl = dt.timedelta(hours=72)
            progress(f"{label}: provider only ...")
            n, s = timed(
                lambda state=state, csr=csr, uri=uri, ttl=ttl: state.provider.sign_leaf(
                    state.signer, csr, uri, [], ttl, "web"
                ),
                args.seconds,
            )
            figures[f"{label} provider"] = row(label, "provider.sign_leaf (crypto only)", n, s)
            progress(f"{label}: sign_csr in-process ...")
            n, s = timed(
                lambda csr_pem=csr_pem: connect_ca.sign_csr(operator, csr_pem), args.seconds
            )
            figures[f"{label} domain"] = row(label, "connect_ca.sign_csr (in-process)", n, s)
            if srv is not None:
                progress(f"{label}: POST /api/ca/sign ...")
                n, s = http_signings(srv, config, args)
                figures[f"{label} http"] = row(
                    label, f"POST /api/ca/sign ({args.connections} conns)", n, s
                )
        if srv is not None:
            progress("baseline: GET /api/ca/roots ...")
            n, s = http_baseline(srv, args)
            figures["api baseline"] = row(
                "-", f"GET /api/ca/roots ({args.connections} conns, no signing)", n, s
            )
    finally:
        if srv is not None:
            srv.close()
        local.close()
    sys.stdout.flush()
    return figures


def http_signings(srv, config: dict, args: argparse.Namespace) -> tuple[int, float]:
    """Set the server's root kind, then sign over keep-alive connections for `seconds`."""
    from bench.registry import HttpConn, open_conns, run_async
    from meshproto import pki, spiffe

    async def run() -> tuple[int, float]:
        admin = await HttpConn("127.0.0.1", srv.http_port).open()
        body = json.dumps({"Provider": "consul", "Config": config}).encode()
        r = await admin.request("PUT", "/v1/connect/ca/configuration", body)
        assert r.status == 200, r.body
        roots = json.loads((await admin.request("GET", "/v1/connect/ca/roots")).body)
        admin.close()
        uri = spiffe.service_id(roots["TrustDomain"], "web", "dc1").uri
        payload = json.dumps({"csr": pki.make_csr(pki.generate_key(), uri)}).encode()
        conns = await open_conns("127.0.0.1", srv.http_port, args.connections)
        warm = await conns[0].request("POST", "/api/ca/sign", payload)
        assert warm.status == 200, warm.body
        try:
            return await _drive(conns, "POST", "/api/ca/sign", payload, args.seconds)
        finally:
            for c in conns:
                c.close()

    return run_async(run())


async def _drive(conns, method: str, path: str, body: bytes, seconds: float) -> tuple[int, float]:
    """Send `method path` on every connection back to back for `seconds`; (200s, elapsed)."""
    done, failed = 0, 0
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(conn) -> None:
        nonlocal done, failed
        while time.perf_counter() < deadline:
            resp = await conn.request(method, path, body)
            if resp.status == 200:
                done += 1
            else:
                failed += 1

    await asyncio.gather(*(worker(c) for c in conns))
    if failed:
        progress(f"  {failed} {method} {path} failed")
    return done, time.perf_counter() - start


def http_baseline(srv, args: argparse.Namespace) -> tuple[int, float]:
    """The /api floor: a read through the same DRF stack that signs nothing."""
    from bench.registry import open_conns, run_async

    async def run() -> tuple[int, float]:
        conns = await open_conns("127.0.0.1", srv.http_port, args.connections)
        try:
            return await _drive(conns, "GET", "/api/ca/roots", b"", args.seconds)
        finally:
            for c in conns:
                c.close()

    return run_async(run())


def intentions_section(args: argparse.Namespace) -> dict:
    """Intention authorizations per second with 10,000 intentions (bench/intentions.py)."""
    from bench import intentions

    parser = argparse.ArgumentParser()
    intentions.add_arguments(parser)
    own = parser.parse_args([])
    for name in ("seconds", "database", "postgres_url", "connections", "no_http"):
        if hasattr(own, name):
            setattr(own, name, getattr(args, name))
    return intentions.section(own)


SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "signing": signing_section,
    "intentions": intentions_section,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: {','.join(SECTIONS)})",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    p.add_argument("--connections", type=int, default=8, help="HTTP keep-alive connections")
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
    )
    p.add_argument("--no-http", action="store_true", help="in-process figures only")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in args.sections:
        SECTIONS[name](args)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
