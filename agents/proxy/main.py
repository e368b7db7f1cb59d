"""`mesh-sidecar`: the per-proxy data-plane process the agent spawns.

    mesh-sidecar --proxy-id web-sidecar-proxy --socket /var/lib/mesh/sidecars/web-sidecar-proxy.sock \\
                 [--metrics-addr 127.0.0.1:19000] [--log-level info] [--drain-timeout 4]

It imports only `agents.proxy` and the Django-, grpc- and cryptography-free
parts of `meshproto`, and runs on uvloop when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys

from agents.proxy.control import ControlClient
from agents.proxy.logs import LEVELS, log
from agents.proxy.memory import Trimmer
from agents.proxy.metrics import Metrics, serve_metrics
from agents.proxy.observe.observer import MeshObserver, ObserveOptions
from agents.proxy.sidecar import Sidecar
from agents.proxy.tls import KeyDir


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mesh-sidecar", description="meshweb sidecar proxy (L4 and HTTP)"
    )
    p.add_argument("--proxy-id", required=True, help="the proxy's service ID")
    p.add_argument("--socket", required=True, help="the agent's Unix socket for this proxy")
    p.add_argument(
        "--metrics-addr", type=_host_port, default=None, help="HOST:PORT for GET /metrics"
    )
    p.add_argument("--log-level", choices=sorted(LEVELS, key=LEVELS.get), default="info")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=4.0,
        # Shorter than the agent's stop grace (5 s before SIGKILL): the sidecar
        # cuts what is left itself and exits cleanly.
        help="seconds open connections may take to finish after SIGTERM (default 4)",
    )
    p.add_argument("--handshake-timeout", type=float, default=10.0, help="TLS handshake timeout")
    try:
        env = ObserveOptions.from_env()
    except ValueError as exc:
        p.error(str(exc))
    p.add_argument(
        "--otlp-endpoint",
        default=env.otlp_endpoint,
        help="OTLP/HTTP collector URL for spans (default $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT "
        "or $OTEL_EXPORTER_OTLP_ENDPOINT; empty: no export, trace context still propagates)",
    )
    p.add_argument(
        "--trace-sample-ratio",
        type=float,
        default=env.sample_ratio,
        help="share of new traces sampled, 0..1; a caller's decision is followed "
        "(default $OTEL_TRACES_SAMPLER_ARG or 0.01)",
    )
    p.add_argument(
        "--access-log",
        default=env.access_log,
        help="file for JSON access log lines (default $MESH_ACCESS_LOG; empty: none)",
    )
    p.add_argument(
        "--access-log-max-bytes",
        type=int,
        default=env.access_log_max_bytes,
        help="rotate the access log when it would pass this size (default 50 MiB)",
    )
    p.add_argument(
        "--access-log-keep", type=int, default=env.access_log_keep, help="rotated files kept"
    )
    p.add_argument(
        "--http-read-timeout",
        type=float,
        default=10.0,
        help="seconds a caller may take to send a whole HTTP request (slowloris guard)",
    )
    args = p.parse_args(argv)
    try:
        args.observe = ObserveOptions(
            otlp_endpoint=args.otlp_endpoint,
            sample_ratio=args.trace_sample_ratio,
            access_log=args.access_log,
            access_log_max_bytes=args.access_log_max_bytes,
            access_log_keep=args.access_log_keep,
        )
    except ValueError as exc:
        p.error(str(exc))
    return args


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_log_loop_error)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = Metrics()
    keydir = KeyDir()
    try:
        observer = MeshObserver(args.observe)
    except (OSError, ValueError) as exc:
        log.error("cannot set up observability", error=str(exc))
        return 2
    sidecar = Sidecar(
        args.proxy_id,
        metrics,
        keydir,
        handshake_timeout=args.handshake_timeout,
        http_read_timeout=args.http_read_timeout,
        observer=observer,
    )

    def render() -> str:
        return metrics.render(sidecar.conns) + "\n".join(observer.render(sidecar.conns)) + "\n"

    metrics_server = None
    try:
        if args.metrics_addr is not None:
            host, port = args.metrics_addr
            metrics_server = await serve_metrics(host, port, render)
            bound = metrics_server.sockets[0].getsockname()
            log.info("metrics", address=f"{bound[0]}:{bound[1]}")
        # Start-up objects live forever: keep them out of the collector's way, so
        # that a full collection never walks them (shorter pauses under load).
        gc.freeze()
        trimmer = Trimmer(metrics.closed)
        trimmer.trim()  # what start-up (imports, compiling) left free

        async def handle(line: bytes) -> dict:
            reply = await sidecar.handle_line(line)
            trimmer.trim()  # parsing a config and building contexts leaves garbage
            return reply

        control = ControlClient(args.socket, args.proxy_id, handle, metrics)
        control_task = loop.create_task(control.run())
        trim_task = loop.create_task(trimmer.run())
        log.info("started", socket=args.socket, loop=type(loop).__module__.split(".")[0])
        await stop.wait()
        log.info("stopping", connections=len(sidecar.conns))
        control_task.cancel()
        trim_task.cancel()
        await sidecar.shutdown(args.drain_timeout)
        # Last access-log lines and batched spans; a collector that does not
        # answer costs at most the bound, never a hung stop.
        await _bounded(loop.run_in_executor(None, observer.close), 3.0)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        keydir.remove()
    log.info("stopped")
    return 0


async def _bounded(awaitable, seconds: float) -> None:
    try:
        await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        log.warning("observability flush did not finish in time", seconds=seconds)
    except Exception as exc:
        log.error("observability flush failed", error=repr(exc))


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """What the loop cannot hand to anyone (a callback's exception, a transport's
    fatal error) becomes a JSON log line like everything else on stderr."""
    exc = context.get("exception")
    log.error(
        "unexpected error in the event loop",
        message=context.get("message", ""),
        error=repr(exc) if exc is not None else None,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log.set_level(args.log_level)
    log.base = {"proxy_id": args.proxy_id}
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(run(args))
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
