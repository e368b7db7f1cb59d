"""HTTP test apps and clients for the sidecar's HTTP listeners.

`HttpApp` is a real threaded HTTP/1.1 server (keep-alive) that records every
request it gets and answers as told: its name by default; a status, a delay
or a body per path through `behave`.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from meshproto.proxycfg import (
    Cluster,
    Endpoint,
    Inbound,
    ProxyConfig,
    Route,
    RouteMatch,
    Upstream,
    WeightedCluster,
)
from tests.proxy.support import DC, TRUST_DOMAIN, spiffe


class HttpApp:
    """A loopback HTTP/1.1 app. `requests` holds (method, path, headers, body)."""

    def __init__(self, name: str = "app") -> None:
        self.name = name
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.status = 200  # for every request unless `behave` says otherwise
        self.delay = 0.0
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        app = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # head and body are two writes

            def log_message(self, *a) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                with app.lock:
                    app.requests.append(
                        (
                            self.command,
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                        )  # fmt: skip
                    )
                    app.in_flight += 1
                    app.max_in_flight = max(app.max_in_flight, app.in_flight)
                try:
                    if self.path.startswith("/reset"):
                        # Half a response head, then a TCP reset.
                        self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-len")
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))  # fmt: skip
                        self.close_connection = True
                        self.connection.close()
                        return
                    if app.delay:
                        time.sleep(app.delay)
                    out = json.dumps({"name": app.name, "path": self.path}).encode()
                    self.send_response(app.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(out)))
                    self.send_header("x-served-by", app.name)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(out)
                finally:
                    with app.lock:
                        app.in_flight -= 1

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def reset(self) -> None:
        deadline = time.monotonic() + 10
        while self.in_flight and time.monotonic() < deadline:  # earlier slow calls
            time.sleep(0.02)
        with self.lock:
            self.requests.clear()
            self.max_in_flight = 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Client:
    """A keep-alive HTTP/1.1 client on one local port (reconnects when closed)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str = "GET", path: str = "/", body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                out = (resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
                if resp.will_close:
                    self.close()
                return out
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str = "/", **kw) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, **kw)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def cluster(service: str, ports: list[int], *, subset: str = "", **kw) -> Cluster:
    name = f"{subset + '.' if subset else ''}{service}.default.{DC}"
    return Cluster(
        name=name,
        service=service,
        datacenter=DC,
        spiffe_id=spiffe(service),
        sni=f"{name}.internal.{TRUST_DOMAIN}",
        endpoints=tuple(Endpoint("127.0.0.1", p) for p in ports),
        subset=subset,
        connect_timeout_s=kw.pop("connect_timeout_s", 2.0),
        **kw,
    )


def http_upstream(destination: str, bind_port: int, clusters: tuple[Cluster, ...],
                  routes: tuple[Route, ...] = ()) -> Upstream:  # fmt: skip
    if not routes:
        routes = (Route(RouteMatch(path_prefix="/"), (WeightedCluster(clusters[0].name, 100.0),)),)
    return Upstream(destination, "127.0.0.1", bind_port, "http", routes=routes, clusters=clusters)


def config(service: str, *, version: int, inbound_port: int, app_port: int,
           upstreams: tuple[Upstream, ...] = (), intentions: tuple[dict, ...] = (),
           inbound: dict | None = None, proxy_id: str | None = None) -> dict:  # fmt: skip
    return ProxyConfig(
        version=version,
        proxy_id=proxy_id or f"{service}-sidecar-proxy",
        service=service,
        service_id=service,
        node="node-a",
        datacenter=DC,
        trust_domain=TRUST_DOMAIN,
        spiffe_id=spiffe(service),
        inbound=Inbound(
            "127.0.0.1",
            inbound_port,
            "127.0.0.1",
            app_port,
            **{"protocol": "http", **(inbound or {})},
        ),  # fmt: skip
        upstreams=upstreams,
        intentions=intentions,
    ).to_json()
