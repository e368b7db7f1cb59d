"""`mesh-gateway`: the mesh gateway process.

    mesh-gateway --proxy-id mesh-gateway --socket /var/lib/mesh/gateways/mesh-gateway.sock \\
                 [--metrics-addr 127.0.0.1:19100] [--log-level info]
    mesh-gateway --config routes.json [--listen 0.0.0.0:8443]

The agent starts one per `kind: mesh-gateway` service definition and feeds it
its compiled `GatewayConfig` over a Unix socket (JSON lines, the sidecar's
protocol without key material: `{"config": ...}` in, `{"ack": version}` or
`{"nack": version, "error": ...}` out). With `--config`, it serves a fixed
routing table from a file instead (no agent; benchmarks and static sites).

Static stability: losing the agent or the control plane changes nothing for
traffic; the gateway keeps the last table it applied and reconnects.
No Django, no key material; runs on uvloop when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import random
import signal
import socket
import sys
from typing import Any

from gateways.gateway import Gateway, Metrics
from gateways.routing import RoutingTable
from meshproto.gatewaycfg import GatewayConfig

log = logging.getLogger("mesh.gateway")

BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
MAX_MESSAGE = 32 * 1024 * 1024
IO_TIMEOUT = 10.0


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mesh-gateway", description="meshweb mesh gateway (SNI)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--socket", help="the agent's Unix socket for this gateway")
    src.add_argument("--config", help="a GatewayConfig JSON file to serve (no agent)")
    p.add_argument("--proxy-id", default="mesh-gateway", help="the gateway's service ID")
    p.add_argument("--listen", type=_host_port, help="HOST:PORT (default: the config's)")
    p.add_argument("--metrics-addr", type=_host_port, help="HOST:PORT for GET /metrics")
    p.add_argument("--hello-timeout", type=float, default=10.0, help="seconds for a ClientHello")
    p.add_argument("--drain-timeout", type=float, default=4.0, help="seconds to drain on SIGTERM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


class Listener:
    """The gateway's listening sockets (LAN, and WAN when another address),
    rebound when the config moves them; open connections go on meanwhile."""

    def __init__(self, gw: Gateway, fixed: tuple[str, int] | None) -> None:
        self.gw = gw
        self.fixed = fixed
        self.servers: dict[tuple[str, int], asyncio.base_events.Server] = {}

    async def ensure(self, addresses: list[tuple[str, int]]) -> None:
        wanted = [self.fixed] if self.fixed else addresses
        new: dict[tuple[str, int], asyncio.base_events.Server] = {}
        loop = asyncio.get_running_loop()
        try:
            for address in wanted:
                server = self.servers.get(address)
                if server is None:
                    sock = _listen_socket(*address)
                    server = await loop.create_server(self.gw.protocol, sock=sock)
                    log.info("listening on %s:%s", *server.sockets[0].getsockname()[:2])
                new[address] = server
        except OSError:
            for address, server in new.items():
                if address not in self.servers:
                    server.close()
            raise
        for address, server in self.servers.items():
            if address not in new:
                server.close()
        self.servers = new

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(4096)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def apply(gw: Gateway, listener: Listener, config: GatewayConfig) -> None:
    """Bind where the config says, then swap the routing table (one step for traffic)."""
    await listener.ensure(config.listen_addresses())
    gw.set_table(RoutingTable(config), config.connect_timeout_s)
    log.info(
        "config applied: version %s, %s routes, %s remote datacenters",
        config.version,
        len(config.routes),
        len(config.datacenters),
    )


async def handle_line(gw: Gateway, listener: Listener, raw: bytes) -> dict[str, Any]:
    """One message from the agent -> the reply (ack or nack); never raises."""
    try:
        msg = json.loads(raw)
        if not isinstance(msg, dict) or not isinstance(msg.get("config"), dict):
            raise ValueError('expected {"config": {...}}')
        version = msg["config"].get("version")
        config = GatewayConfig.from_json(msg["config"])
    except ValueError as exc:
        gw.metrics.config_rejected += 1
        log.warning("config rejected: %s", exc)
        return {"nack": None, "error": str(exc)[:500]}
    try:
        await apply(gw, listener, config)
    except OSError as exc:
        gw.metrics.config_rejected += 1
        log.warning("config %s rejected: cannot listen: %s", version, exc)
        return {"nack": config.version, "error": f"cannot listen on {config.port}: {exc}"}
    return {"ack": config.version}


async def follow_agent(gw: Gateway, listener: Listener, path: str, proxy_id: str) -> None:
    """Forever: connect to the agent's socket, apply what it sends, reconnect on loss."""
    delay = BACKOFF_MIN
    failures = 0
    while True:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(path, limit=MAX_MESSAGE), IO_TIMEOUT
            )
        except (TimeoutError, OSError) as exc:
            failures += 1
            if failures == 1 or failures % 50 == 0:
                log.warning("agent socket unreachable (%s); serving the last table", exc)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        failures, delay = 0, BACKOFF_MIN
        gw.metrics.control_connected = 1
        try:
            await _send(writer, {"proxy_id": proxy_id})
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    gw.metrics.config_rejected += 1
                    await _send(writer, {"nack": None, "error": "message too large"})
                    break
                if not line:
                    break
                if line.strip():
                    await _send(writer, await handle_line(gw, listener, line))
        except (TimeoutError, OSError) as exc:
            log.warning("agent stream failed: %s", exc)
        finally:
            gw.metrics.control_connected = 0
            writer.close()
        log.warning("agent socket closed; serving the last table, reconnecting")
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))


async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    await asyncio.wait_for(writer.drain(), IO_TIMEOUT)


async def serve_metrics(host: str, port: int, gw: Gateway) -> asyncio.base_events.Server:
    """`GET /metrics` in Prometheus text; anything else 404."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = head.split(b"\r\n", 1)[0].split()
            ok = len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics"
            body = gw.metrics.render(gw.conns).encode() if ok else b"not found\n"
            status = b"200 OK" if ok else b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                b"Content-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await asyncio.wait_for(writer.drain(), 5)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, sock=_listen_socket(host, port))


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gw = Gateway(Metrics(), hello_timeout=args.hello_timeout)
    listener = Listener(gw, args.listen)
    metrics_server = None
    tasks = []
    try:
        if args.metrics_addr:
            metrics_server = await serve_metrics(*args.metrics_addr, gw)
            log.info("metrics on %s:%s", *metrics_server.sockets[0].getsockname()[:2])
        if args.config:
            try:
                with open(args.config, "rb") as f:
                    config = GatewayConfig.loads(f.read())
            except (OSError, ValueError) as exc:
                log.error("cannot use %s: %s", args.config, exc)
                return 2
            await apply(gw, listener, config)
        else:
            tasks.append(loop.create_task(follow_agent(gw, listener, args.socket, args.proxy_id)))
        # Start-up objects live forever: keep them out of the collector's way
        # (shorter pauses under load).
        gc.freeze()
        log.info("started (%s loop)", type(loop).__module__.split(".")[0])
        await stop.wait()
        for t in tasks:
            t.cancel()
        listener.close()
        await gw.drain(args.drain_timeout)
    finally:
        if metrics_server is not None:
            metrics_server.close()
    log.info("stopped")
    return 0


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "msg": record.getMessage(),
                "component": "gateway",
            }
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(run(args))
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
