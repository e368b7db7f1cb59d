#!/usr/bin/env python
"""Mesh-gateway benchmark: a call through two gateways against the same call
without gateways, and a gateway pair against an HAProxy pair.

Prints figures, asserts nothing. A 1 KiB response over keep-alive HTTP/1.1
from Debian's nginx on 127.0.0.1, loaded by wrk (maximum throughput) and by
h2load at a fixed rate (default 1,000 req/s: p50 / p99), exactly as
`bench/dataplane.py` loads it (its helpers are reused).

Every topology starts at the same caller sidecar (`mesh-sidecar` for `web`,
one upstream listener per topology) and ends at the same callee sidecar
(`mesh-sidecar` for `api`, in front of nginx); mTLS runs end to end between
the two sidecars in all three:

- `direct`:   web's sidecar -> api's sidecar;
- `gateways`: web's sidecar -> dc1's `mesh-gateway` -> dc2's `mesh-gateway`
  -> api's sidecar. The sidecar sends SNI `api.default.dc2.internal.<td>`;
  dc1's gateway routes `*.dc2.internal.<td>` to dc2's gateway, which routes
  the exact name to api's sidecar (each gateway one process, one thread);
- `haproxy`:  the same, with two Debian HAProxy processes in their place
  (`mode tcp`, `nbthread 1`, `tcp-request inspect-delay` until the
  ClientHello is in, `use_backend ... if { req.ssl_sni -m end .dc2... }` and
  `{ req.ssl_sni -i api.default.dc2... }`).

The sidecars and gateways are fed their configs directly (a small CA made
here, the agents' socket protocol for the sidecars, `--config` files for the
gateways): no control plane runs, so only the data path is measured. Proxy
CPU per request is that of the two middle proxies of a pair (both gateways,
or both HAProxies) from /proc/<pid>/stat around each run.

Run from the repository root (tools: `scripts/install-bench-tools`):

    .venv/bin/python bench/gateways.py [--rounds 3] [--duration 10]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "bench":
    sys.path.pop(0)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.dataplane import (  # noqa: E402
    Stack,
    alive,
    free_port,
    progress,
    run_h2load,
    run_wrk,
    start_nginx,
    tool,
    wait_serving,
)
from meshproto.gatewaycfg import GatewayConfig, GatewayRoute, RemoteDatacenter  # noqa: E402
from meshproto.proxycfg import (  # noqa: E402
    Cluster,
    Endpoint,
    Gateway,
    Inbound,
    ProxyConfig,
    Upstream,
)

TD = "0b5e7c1a-9f3d-4e21-8a6b-3c2d1e0f9a8b.mesh"
TOPOLOGIES = ("direct", "gateways", "haproxy")
AIM_THROUGHPUT_VS_HAPROXY = 0.8
BIN = Path(sys.executable).parent


def spiffe(service: str, dc: str) -> str:
    return f"spiffe://{TD}/ns/default/dc/{dc}/svc/{service}"


def sni(service: str, dc: str) -> str:
    return f"{service}.default.{dc}.internal.{TD}"


class CA:
    """A throwaway CA (ECDSA P-256) issuing SPIFFE leaves, as the mesh CA does."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.x509, self.hashes, self.ec, self.oid = x509, hashes, ec, NameOID
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def leaf(self, uri: str) -> tuple[str, str]:
        from cryptography.hazmat.primitives import serialization

        x509 = self.x509
        key = self.ec.generate_private_key(self.ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(self.oid.COMMON_NAME, "leaf")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=12))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
            )
            .sign(self.key, self.hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


class Fed:
    """A `mesh-sidecar` and the agent's end of its socket (kept open while it runs)."""

    def __init__(self, stack: Stack, proxy_id: str) -> None:
        self.path = stack.tmp / f"{proxy_id}.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.proc = stack.spawn(
            proxy_id,
            [str(BIN / "mesh-sidecar"), "--proxy-id", proxy_id, "--socket", str(self.path)],
        )
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(30)
        self.reader = self.conn.makefile("rb")
        self.reader.readline()  # its hello
        stack.closers.append(self.close)

    def push(self, bundle: dict) -> dict:
        self.conn.sendall(json.dumps(bundle).encode() + b"\n")
        reply = json.loads(self.reader.readline())
        if "ack" not in reply:
            raise RuntimeError(f"sidecar refused its config: {reply}")
        return reply

    def close(self) -> None:
        self.conn.close()
        self.listener.close()


def start_pairs(stack: Stack, nginx_port: int) -> dict[str, tuple[int, list[int]]]:
    """The two sidecars, the gateway pair and the HAProxy pair; topology ->
    (caller-side port, middle proxies' pids)."""
    ca = CA()
    roots = [ca.pem()]
    api_in = free_port()
    ports = {name: free_port() for name in TOPOLOGIES}
    gw1, gw2, ha1, ha2 = (free_port() for _ in range(4))
    api = Fed(stack, "api-sidecar-proxy")
    cert, key = ca.leaf(spiffe("api", "dc2"))
    api.push(
        {
            "config": ProxyConfig(
                version=1,
                proxy_id="api-sidecar-proxy",
                service="api",
                service_id="api",
                node="b",
                datacenter="dc2",
                trust_domain=TD,
                spiffe_id=spiffe("api", "dc2"),
                inbound=Inbound("127.0.0.1", api_in, "127.0.0.1", nginx_port),
                intentions=({"SourceName": "web", "DestinationName": "api", "Action": "allow"},),
                roots=tuple(roots),
            ).to_json(),
            "cert": cert,
            "key": key,
            "roots": roots,
        }
    )

    def cluster(via: int | None) -> Cluster:
        return Cluster(
            name="api.default.dc2",
            service="api",
            datacenter="dc2",
            spiffe_id=spiffe("api", "dc2"),
            sni=sni("api", "dc2"),
            endpoints=(Endpoint("127.0.0.1", via or api_in),),
            gateway=Gateway("127.0.0.1", via) if via else None,
        )

    upstreams = tuple(
        Upstream("api", "127.0.0.1", ports[name], "tcp", datacenter="dc2", clusters=(c,))
        for name, c in (
            ("direct", cluster(None)),
            ("gateways", cluster(gw1)),
            ("haproxy", cluster(ha1)),
        )
    )
    web = Fed(stack, "web-sidecar-proxy")
    cert, key = ca.leaf(spiffe("web", "dc1"))
    web.push(
        {
            "config": ProxyConfig(
                version=1,
                proxy_id="web-sidecar-proxy",
                service="web",
                service_id="web",
                node="a",
                datacenter="dc1",
                trust_domain=TD,
                spiffe_id=spiffe("web", "dc1"),
                inbound=Inbound("127.0.0.1", free_port(), "127.0.0.1", 1),
                upstreams=upstreams,
                roots=tuple(roots),
            ).to_json(),
            "cert": cert,
            "key": key,
            "roots": roots,
        }
    )

    gateway_pids = []
    for dc, port, routes, remotes in (
        ("dc1", gw1, (), (RemoteDatacenter("dc2", f".dc2.internal.{TD}", (Endpoint("127.0.0.1", gw2),)),)),
        ("dc2", gw2, (GatewayRoute(sni("api", "dc2"), "local", "api", "dc2", endpoints=(Endpoint("127.0.0.1", api_in),)),), ()),
    ):  # fmt: skip
        path = stack.tmp / f"gateway-{dc}.json"
        config = GatewayConfig(
            version=1,
            proxy_id=f"gateway-{dc}",
            service="mesh-gateway",
            node=dc,
            datacenter=dc,
            trust_domain=TD,
            bind_address="127.0.0.1",
            port=port,
            routes=routes,
            datacenters=remotes,
        )
        path.write_text(json.dumps(config.to_json()))
        proc = stack.spawn(
            f"gateway-{dc}",
            [str(BIN / "mesh-gateway"), "--config", str(path), "--log-level", "warning"],
        )
        gateway_pids.append(proc.pid)

    common = (
        "global\n  nbthread 1\n  maxconn 8000\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10m\n  timeout server 10m\n"
    )
    sniff = (
        "  tcp-request inspect-delay 5s\n  tcp-request content accept if { req_ssl_hello_type 1 }\n"
    )
    haproxy_configs = {
        "haproxy-dc1": common
        + f"frontend gw\n  bind 127.0.0.1:{ha1}\n{sniff}"
        + f"  use_backend dc2 if {{ req.ssl_sni -m end .dc2.internal.{TD} }}\n"
        + f"backend dc2\n  server gw2 127.0.0.1:{ha2}\n",
        "haproxy-dc2": common
        + f"frontend gw\n  bind 127.0.0.1:{ha2}\n{sniff}"
        + f"  use_backend api if {{ req.ssl_sni -i {sni('api', 'dc2')} }}\n"
        + f"backend api\n  server api 127.0.0.1:{api_in}\n",
    }
    haproxy_pids = []
    for label, text in haproxy_configs.items():
        path = stack.tmp / f"{label}.cfg"
        path.write_text(text)
        proc = stack.spawn(label, [tool("haproxy"), "-db", "-f", str(path)])
        haproxy_pids.append(proc.pid)
    procs = dict(stack.procs)
    for name in TOPOLOGIES:
        wait_serving(
            ports[name], 20, name, lambda: [stack.check(label, p) for label, p in procs.items()]
        )
    return {
        "direct": (ports["direct"], []),
        "gateways": (ports["gateways"], gateway_pids),
        "haproxy": (ports["haproxy"], haproxy_pids),
    }


def bench(args: argparse.Namespace, stack: Stack) -> dict:
    for t in ("nginx", "wrk", "h2load", "haproxy"):
        tool(t)
    nginx_port, nginx_pids = start_nginx(stack)
    progress(f"nginx on 127.0.0.1:{nginx_port}")
    topo = start_pairs(stack, nginx_port)
    progress("sidecars, gateway pair and HAProxy pair serving")
    runs: dict[str, list[dict]] = {n: [] for n in TOPOLOGIES}
    for r in range(args.rounds):
        order = TOPOLOGIES[r % 3 :] + TOPOLOGIES[: r % 3]
        for name in order:
            port, pids = topo[name]
            for pid in pids:
                if not alive(pid):
                    raise RuntimeError(f"{name}: proxy pid {pid} died")
            w = run_wrk(port, args.connections, args.duration, pids, nginx_pids)
            h = run_h2load(
                port, args.rate, args.clients, args.duration, args.warmup, pids,
                stack.tmp / "h2load.log",
            )  # fmt: skip
            runs[name].append({"wrk": w, "h2load": h, "load": os.getloadavg()[0]})
            progress(
                f"round {r + 1}/{args.rounds} {name:<8}: {w['rps']:>8,.0f} req/s, at "
                f"{args.rate:,} req/s p50 {h['p50_ms']:.3f} p99 {h['p99_ms']:.3f} ms"
                + (f" (pair {w['cpu_us']:.1f} µs/req)" if pids else "")
                + (f", errors {w['errors']}+{h['errors']}" if w["errors"] or h["errors"] else "")
            )
    return runs


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    def med(name: str, part: str, key: str) -> float:
        return statistics.median(r[part][key] for r in runs[name])

    print(
        f"\nmesh gateways vs HAProxy: {args.rounds} rounds x {args.duration:g}s, "
        f"wrk -c{args.connections}, h2load at {args.rate:,} req/s over {args.clients} "
        f"connections; 1 KiB from nginx; medians; {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}\n"
    )
    header = f"{'path':<34}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'pair µs/req':>13}"
    print(header)
    print("-" * len(header))
    labels = {
        "direct": "sidecar -> sidecar (no gateway)",
        "gateways": "... through 2 mesh gateways",
        "haproxy": "... through 2 HAProxy (req.ssl_sni)",
    }
    for name in TOPOLOGIES:
        cpu = med(name, "wrk", "cpu_us") if name != "direct" else float("nan")
        print(
            f"{labels[name]:<34}{med(name, 'wrk', 'rps'):>10,.0f}{med(name, 'h2load', 'p50_ms'):>9.3f}"
            f"{med(name, 'h2load', 'p99_ms'):>9.3f}"
            + (f"{cpu:>13.1f}" if name != "direct" else f"{'':>13}")
        )
    ratio = med("gateways", "wrk", "rps") / med("haproxy", "wrk", "rps")
    added_gw = med("gateways", "h2load", "p99_ms") - med("direct", "h2load", "p99_ms")
    added_ha = med("haproxy", "h2load", "p99_ms") - med("direct", "h2load", "p99_ms")
    print(
        f"\ngateway pair throughput / HAProxy pair's: {ratio:.2f} "
        f"(aim >= {AIM_THROUGHPUT_VS_HAPROXY})"
    )
    print(
        f"added p99 at {args.rate:,} req/s over no gateway: gateways {added_gw:+.3f} ms, "
        f"HAProxy {added_ha:+.3f} ms (aim: gateways no worse)"
    )
    errors = sum(r["wrk"]["errors"] + r["h2load"]["errors"] for rs in runs.values() for r in rs)
    if errors:
        print(f"errors during the runs: {errors}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--rate", type=int, default=1000, help="fixed rate, req/s (default 1000)")
    p.add_argument("--clients", type=int, default=10, help="h2load connections (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds left out (default 1)")
    p.add_argument("--json", type=Path, help="also write the raw figures to this file")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.rate < args.clients:
        p.error("--rounds and --duration must be positive, --rate >= --clients")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-gw-"))
    stack = Stack(tmp)
    try:
        runs = bench(args, stack)
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    finally:
        stack.close()
        if not args.keep_tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            progress(f"kept {tmp}")
    report(args, runs)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
