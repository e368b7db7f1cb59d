"""Two tiny demo services for `mesh dev` and the end-to-end tests (Django-free).

- `api` answers `GET /` with JSON `{"service": "api", "instance": ..., "host": ...,
  "time": ...}`. `GET /healthz` says `ok` (200), or `failing` (500) while the
  `--fail-file` exists: touch the file to make its HTTP health check fail,
  remove it to heal (no extra port, and nothing a caller through the mesh
  can flip).
  With `--fail-percent P` it answers `503` to about P % of `GET /` (a
  flaky version, for retries to hide).
- `web` answers `GET /` by calling its upstream (`--upstream`, default
  `127.0.0.1:9191`: the local listener of its sidecar for `api`) on a fresh
  connection each time, and returns both answers:
  `{"service": "web", ..., "upstream": {<api's answer>}}`, or a 502 with
  `{"service": "web", "error": ...}` when the call fails (refused by an
  intention, no healthy endpoint, ...). A fresh connection per call is what
  makes an intention change visible on the very next call.

  It passes the caller's `traceparent`, `tracestate` and `x-request-id` on
  to api, as an application in a mesh does, so one trace spans both hops.
- `traffic` calls `--target` about `--rate` times a second until stopped
  (the demo's generated load; one request at a time, each bounded by a
  timeout), and prints a line of counts every 10 s.

    mesh demo-app api --port 9091
    mesh demo-app web --port 9090 --upstream 127.0.0.1:9191
    mesh demo-app traffic --target http://127.0.0.1:9090/ --rate 5

Both are stdlib `http.server` apps (a thread per connection, HTTP/1.1 with
keep-alive); neither is meant to be fast, only obvious.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import http.server
import json
import os
import random
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

UPSTREAM_TIMEOUT = 3.0  # seconds: connect + answer of one upstream call
PROPAGATED = ("traceparent", "tracestate", "x-request-id")  # passed on to the upstream


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _split(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{addr!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class DemoApp:
    """What one demo service answers; the HTTP handler only routes to it."""

    def __init__(
        self,
        role: str,
        instance: str,
        upstream: tuple[str, int] | None = None,
        fail_file: Path | None = None,
        fail_percent: float = 0.0,
    ) -> None:
        self.role = role
        self.fail_percent = fail_percent
        self.instance = instance
        self.host = socket.gethostname()
        self.upstream = upstream
        self.fail_file = fail_file

    def identity(self) -> dict[str, Any]:
        return {
            "service": self.role,
            "instance": self.instance,
            "host": self.host,
            "time": _now(),
        }

    def healthy(self) -> bool:
        return self.fail_file is None or not self.fail_file.exists()

    def index(self, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        body = self.identity()
        if self.upstream is None:
            if self.fail_percent and random.random() * 100 < self.fail_percent:
                body["error"] = "failing on purpose (--fail-percent)"
                return 503, body
            return 200, body
        try:
            body["upstream"] = self.call_upstream(headers or {})
            return 200, body
        except (OSError, http.client.HTTPException, ValueError) as exc:
            body["error"] = (
                f"calling {self.upstream[0]}:{self.upstream[1]}: {exc or type(exc).__name__}"
            )
            return 502, body

    def call_upstream(self, incoming: dict[str, str] | None = None) -> dict[str, Any]:
        """One call on a new connection (closed after): each call is a new mTLS session."""
        assert self.upstream is not None
        headers = {k: v for k, v in (incoming or {}).items() if k in PROPAGATED}
        headers["Connection"] = "close"
        conn = http.client.HTTPConnection(*self.upstream, timeout=UPSTREAM_TIMEOUT)
        try:
            conn.request("GET", "/", headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise ValueError(f"upstream answered {resp.status}")
        return json.loads(data)


def _handler(app: DemoApp) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"mesh-demo-{app.role}"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok = app.healthy()
                self._send(200 if ok else 500, b"ok\n" if ok else b"failing\n", "text/plain")
            elif path == "/":
                status, body = app.index({k.lower(): v for k, v in self.headers.items()})
                self._send(status, json.dumps(body).encode() + b"\n", "application/json")
            else:
                self._send(404, b'{"error": "not found"}\n', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # quiet: the sidecars count and log the traffic

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(app: DemoApp, bind: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT; prints one line when listening."""
    server = _Server((bind, port), _handler(app))

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    where = f"http://{bind}:{server.server_address[1]}/"
    extra = f", upstream {app.upstream[0]}:{app.upstream[1]}" if app.upstream else ""
    print(f"demo {app.role} ({app.instance}) listening on {where}{extra}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def generate_traffic(
    target: str, rate: float, *, limit: int | None = None, stopped=lambda: False
) -> dict[int, int]:
    """Call `target` about `rate` times a second (one call at a time) until `stopped()`
    or `limit` calls; the count of answers by status (0: no answer)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    counts: dict[int, int] = {}
    print(f"demo traffic: calling {target} about {rate:g} times a second", flush=True)
    period, sent, next_at, next_report = 1.0 / rate, 0, time.monotonic(), time.monotonic() + 10
    try:
        while not stopped() and (limit is None or sent < limit):
            try:
                with opener.open(target, timeout=UPSTREAM_TIMEOUT * 2) as resp:
                    resp.read()
                    status = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except (OSError, http.client.HTTPException):
                status = 0
            counts[status] = counts.get(status, 0) + 1
            sent += 1
            now = time.monotonic()
            if now >= next_report:
                print(f"demo traffic: answers by status {dict(sorted(counts.items()))}", flush=True)
                next_report = now + 10
            next_at += period
            time.sleep(max(0.0, next_at - now))
    except KeyboardInterrupt:
        pass
    return counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "role", choices=("web", "api", "traffic"), help="which demo service (or load) to run"
    )
    p.add_argument("--port", "-port", type=int, help="listen port (web and api)")
    p.add_argument(
        "--bind", "-bind", default="127.0.0.1", help="listen address (default 127.0.0.1)"
    )
    p.add_argument(
        "--upstream",
        "-upstream",
        default="127.0.0.1:9191",
        help="web only: its sidecar's local listener for api (default 127.0.0.1:9191)",
    )
    p.add_argument("--name", "-name", help="instance name in answers (default ROLE-PORT)")
    p.add_argument(
        "--fail-file",
        "-fail-file",
        help="GET /healthz answers 500 while this file exists",
    )
    p.add_argument(
        "--fail-percent",
        "-fail-percent",
        type=float,
        default=0.0,
        help="api only: answer 503 to about this share (0-100) of GET /",
    )
    p.add_argument("--target", "-target", help="traffic only: the URL to call")
    p.add_argument(
        "--rate",
        "-rate",
        type=float,
        default=5.0,
        help="traffic only: calls per second (default 5)",
    )


def run(args: argparse.Namespace) -> int:
    if args.role == "traffic":
        if not args.target or not args.target.startswith(("http://", "https://")):
            print("mesh demo-app: traffic needs --target http://HOST:PORT/...", file=sys.stderr)
            return 2
        if not 0.1 <= args.rate <= 1000:
            print("mesh demo-app: --rate must be within 0.1..1000", file=sys.stderr)
            return 2
        stop: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, _frame: stop.append(signum))
        generate_traffic(args.target, args.rate, stopped=lambda: bool(stop))
        return 0
    if args.port is None:
        print(f"mesh demo-app: {args.role} needs --port", file=sys.stderr)
        return 2
    if not 0 <= args.fail_percent <= 100:
        print("mesh demo-app: --fail-percent must be within 0..100", file=sys.stderr)
        return 2
    upstream = None
    if args.role == "web":
        try:
            upstream = _split(args.upstream)
        except ValueError as exc:
            print(f"mesh demo-app: --upstream: {exc}", file=sys.stderr)
            return 2
    app = DemoApp(
        args.role,
        args.name or f"{args.role}-{args.port}",
        upstream=upstream,
        fail_file=Path(args.fail_file) if args.fail_file else None,
        fail_percent=args.fail_percent,
    )
    try:
        serve(app, args.bind, args.port)
    except OSError as exc:
        print(
            f"mesh demo-app: cannot listen on {args.bind}:{args.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `demo-app` to the `mesh` subcommands."""
    p = sub.add_parser(
        "demo-app",
        help="run one of the demo services (web or api) that `mesh dev` starts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesh demo-app", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
