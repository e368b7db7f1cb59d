"""Two tiny demo services for `mesh dev` and the end-to-end tests (Django-free).

- `api` answers `GET /` with JSON `{"service": "api", "instance": ..., "host": ...,
  "time": ...}`. `GET /healthz` says `ok` (200), or `failing` (500) while the
  `--fail-file` exists: touch the file to make its HTTP health check fail,
  remove it to heal (no extra port, and nothing a caller through the mesh
  can flip).
- `web` answers `GET /` by calling its upstream (`--upstream`, default
  `127.0.0.1:9191`: the local listener of its sidecar for `api`) on a fresh
  connection each time, and returns both answers:
  `{"service": "web", ..., "upstream": {<api's answer>}}`, or a 502 with
  `{"service": "web", "error": ...}` when the call fails (refused by an
  intention, no healthy endpoint, ...). A fresh connection per call is what
  makes an intention change visible on the very next call.

    mesh demo-app api --port 9091
    mesh demo-app web --port 9090 --upstream 127.0.0.1:9191

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
import signal
import socket
import sys
from pathlib import Path
from typing import Any

UPSTREAM_TIMEOUT = 3.0  # seconds: connect + answer of one upstream call


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
    ) -> None:
        self.role = role
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

    def index(self) -> tuple[int, dict[str, Any]]:
        body = self.identity()
        if self.upstream is None:
            return 200, body
        try:
            body["upstream"] = self.call_upstream()
            return 200, body
        except (OSError, http.client.HTTPException, ValueError) as exc:
            body["error"] = (
                f"calling {self.upstream[0]}:{self.upstream[1]}: {exc or type(exc).__name__}"
            )
            return 502, body

    def call_upstream(self) -> dict[str, Any]:
        """One call on a new connection (closed after): each call is a new mTLS session."""
        assert self.upstream is not None
        conn = http.client.HTTPConnection(*self.upstream, timeout=UPSTREAM_TIMEOUT)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
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
                status, body = app.index()
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("role", choices=("web", "api"), help="which demo service to run")
    p.add_argument("--port", "-port", type=int, required=True, help="listen port")
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


def run(args: argparse.Namespace) -> int:
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
