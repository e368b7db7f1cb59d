"""Health-check probes and Consul's rules around their results (no database).

One implementation for both runners: the control plane's checks on its own
node (`registry.domain.health`) and the per-host agent (`agents.checks`).
Every probe is blocking and bounded by its `timeout`; callers run them on a
thread pool. Statuses are Consul's strings: passing, warning, critical.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
DEFAULT_TIMEOUT = 10.0  # seconds, as Consul's HTTP/TCP/gRPC checks
DEFAULT_OUTPUT_MAX = 4096  # bytes of a response body kept in the output, as Consul
USER_AGENT = "Consul Health Check"
MAX_REDIRECTS = 10
PROBED_TYPES = ("http", "tcp", "grpc")


@dataclass(frozen=True)
class Result:
    """What one probe found: a Consul status and its output text."""

    status: str
    output: str


# --- probes (no database) ------------------------------------------------------------


def probe_timeout(timeout: float, interval: float) -> float:
    """The check's Timeout (default 10s as Consul), never longer than its interval."""
    t = timeout if timeout and timeout > 0 else DEFAULT_TIMEOUT
    if interval and interval > 0:
        t = min(t, interval)
    return max(t, 0.001)


def _host_port(addr: str, default_port: int | None = None) -> tuple[str, int]:
    """Split `host:port` (`[v6]:port` too)."""
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest.lstrip(":")
    elif addr.count(":") == 1:
        host, port = addr.split(":")
    else:
        host, port = addr, ""
    if not port:
        if default_port is None:
            raise ValueError(f"address {addr!r} has no port")
        return host, default_port
    return host, int(port)


def _os_reason(exc: BaseException) -> str:
    """Go-like text for a socket error ("connect: connection refused", "i/o timeout")."""
    if isinstance(exc, socket.timeout | TimeoutError):
        return "i/o timeout"
    if isinstance(exc, socket.gaierror):
        return f"lookup: {exc.strerror or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connect: connection refused"
    if isinstance(exc, ssl.SSLError):
        return f"tls: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def probe_tcp(addr: str, timeout: float) -> Result:
    """Passing when a TCP connection to `addr` opens within `timeout`."""
    try:
        host, port = _host_port(addr)
        socket.create_connection((host, port), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        return Result(CRITICAL, f"dial tcp {addr}: {_os_reason(exc)}")
    return Result(PASSING, f"TCP connect {addr}: Success")


class _HTTPSConnection(http.client.HTTPSConnection):
    """HTTPS with an explicit SNI / verification name (Consul's TLSServerName)."""

    def __init__(self, host: str, port: int, *, server_name: str, **kw: Any) -> None:
        super().__init__(host, port, **kw)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)


def _tls_context(skip_verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _http_once(
    method: str,
    url: str,
    headers: dict[str, list[str]],
    body: bytes | None,
    defn: dict[str, Any],
    timeout: float,
    max_output: int,
) -> tuple[int, str, str | None, bytes]:
    """One request: (status, reason, Location, first `max_output` bytes of the body)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = _HTTPSConnection(
            host,
            parts.port or 443,
            server_name=defn.get("TLSServerName") or host,
            timeout=timeout,
            context=_tls_context(bool(defn.get("TLSSkipVerify"))),
        )
    elif parts.scheme == "http":
        conn = http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)
    else:
        raise ValueError(f"unsupported protocol scheme {parts.scheme!r}")
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lower = {k.lower() for k in headers}
        conn.putrequest(method, target, skip_host="host" in lower, skip_accept_encoding=True)
        for name, values in headers.items():
            for value in values:
                conn.putheader(name, value)
        if "user-agent" not in lower:
            conn.putheader("User-Agent", USER_AGENT)
        if "accept" not in lower:
            conn.putheader("Accept", "text/plain, text/*, */*")
        conn.putheader("Connection", "close")
        if body:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        data = resp.read(max_output) if max_output > 0 else b""
        return resp.status, resp.reason, resp.getheader("Location"), data
    finally:
        conn.close()


def probe_http(defn: dict[str, Any], timeout: float) -> Result:
    """Consul's HTTP check: 2xx passing, 429 warning, anything else critical.

    Sends Method (default GET), Header, Body; honours TLSSkipVerify and
    TLSServerName; follows up to 10 redirects as Go's client does. The output
    is "HTTP GET <url>: 200 OK Output: <first OutputMaxSize bytes of body>".
    """
    url = str(defn["HTTP"])
    method = (defn.get("Method") or "GET").upper()
    headers = {k: list(v) for k, v in (defn.get("Header") or {}).items()}
    body = str(defn["Body"]).encode() if defn.get("Body") else None
    max_output = int(defn.get("OutputMaxSize") or DEFAULT_OUTPUT_MAX)
    deadline = time.monotonic() + timeout
    current, current_method, current_body = url, method, body
    try:
        for _ in range(MAX_REDIRECTS + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            status, reason, location, data = _http_once(
                current_method, current, headers, current_body, defn, remaining, max_output
            )
            if status in (301, 302, 303, 307, 308) and location:
                current = urljoin(current, location)
                if status == 303 or (
                    status in (301, 302) and current_method not in ("GET", "HEAD")
                ):
                    current_method, current_body = "GET", None
                continue
            break
        else:
            return Result(
                CRITICAL,
                f'{method.capitalize()} "{url}": stopped after {MAX_REDIRECTS} redirects',
            )
    except (OSError, ValueError, http.client.HTTPException) as exc:
        if isinstance(exc, socket.timeout | TimeoutError):
            reason_text = (
                f"context deadline exceeded (Client.Timeout {timeout:g}s exceeded "
                "while awaiting headers)"
            )
        elif isinstance(exc, OSError):
            host, port = urlsplit(current).hostname, urlsplit(current).port
            reason_text = f"dial tcp {host}:{port}: {_os_reason(exc)}"
        else:
            reason_text = str(exc) or type(exc).__name__
        return Result(CRITICAL, f'{method.capitalize()} "{url}": {reason_text}')
    text = data.decode("utf-8", errors="replace")
    output = f"HTTP {method} {url}: {status} {reason} Output: {text}"
    if 200 <= status <= 299:
        return Result(PASSING, output)
    if status == 429:
        return Result(WARNING, output)
    return Result(CRITICAL, output)


def _grpc_code_name(code: Any) -> str:
    """Go's spelling of a gRPC status code (DEADLINE_EXCEEDED -> DeadlineExceeded)."""
    name = getattr(code, "name", str(code))
    return "".join(part.capitalize() for part in name.split("_"))


def _grpc_tls_credentials(target: str, defn: dict[str, Any], timeout: float):
    """Channel credentials for GRPCUseTLS; TLSSkipVerify trusts the presented certificate."""
    import grpc

    options: list[tuple[str, Any]] = []
    if defn.get("TLSSkipVerify"):
        # gRPC has no "skip verify": fetch the server's certificate and trust exactly
        # it, checking the name it was issued for rather than the dialled address.
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        host, port = _host_port(target, 443)
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
        cert = x509.load_pem_x509_certificate(pem.encode())
        name = defn.get("TLSServerName") or ""
        if not name:
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                dns = san.value.get_values_for_type(x509.DNSName)
                ips = san.value.get_values_for_type(x509.IPAddress)
                name = dns[0] if dns else (str(ips[0]) if ips else "")
            except x509.ExtensionNotFound:
                pass
        if not name:
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            name = str(cns[0].value) if cns else host
        options.append(("grpc.ssl_target_name_override", name))
        return grpc.ssl_channel_credentials(root_certificates=pem.encode()), options
    if defn.get("TLSServerName"):
        options.append(("grpc.ssl_target_name_override", defn["TLSServerName"]))
    return grpc.ssl_channel_credentials(), options


def probe_grpc(defn: dict[str, Any], timeout: float) -> Result:
    """The standard grpc.health.v1 Check: SERVING passes, anything else is critical.

    `GRPC` is "host:port" or "host:port/service"; GRPCUseTLS dials with TLS.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    spec = str(defn["GRPC"])
    target, _, service = spec.partition("/")
    try:
        if defn.get("GRPCUseTLS"):
            creds, options = _grpc_tls_credentials(target, defn, timeout)
            channel = grpc.secure_channel(target, creds, options=options)
        else:
            channel = grpc.insecure_channel(target)
    except (OSError, ValueError) as exc:
        return Result(CRITICAL, f"gRPC check {spec}: failed: {_os_reason(exc)}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        code = _grpc_code_name(exc.code()) if hasattr(exc, "code") else "Unknown"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return Result(CRITICAL, f"rpc error: code = {code} desc = {details}")
    finally:
        channel.close()
    if resp.status == health_pb2.HealthCheckResponse.SERVING:
        return Result(PASSING, f"gRPC check {spec}: success")
    status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return Result(CRITICAL, f"gRPC {spec} serving status: {status_name}")


def run(kind: str, definition: dict[str, Any], timeout: float) -> Result:
    """Run one probe of `kind` (http, tcp, grpc); may raise on a malformed definition."""
    if kind == "http":
        return probe_http(definition, timeout)
    if kind == "tcp":
        return probe_tcp(str(definition["TCP"]), timeout)
    if kind == "grpc":
        return probe_grpc(definition, timeout)
    return Result(CRITICAL, f"unsupported check type {kind!r}")


# --- Consul's rules around results (no database) ------------------------------------


def threshold_step(
    streak: int | None, status: str, success_before: int, failures_before: int
) -> tuple[bool, int | None]:
    """SuccessBeforePassing / FailuresBeforeCritical as Consul's StatusHandler.

    `streak` counts consecutive results: +n successes (passing or warning), -n
    failures; None is the initial state, where Consul starts both counters at
    their thresholds so the first result applies at once. Returns whether to
    apply this result and the new streak (capped at the thresholds, so a steady
    check stops changing it).
    """
    success_before, failures_before = max(success_before, 1), max(failures_before, 1)
    ok = status in (PASSING, WARNING)
    if streak is None:
        successes, failures = success_before, failures_before
    else:
        successes, failures = max(streak, 0), max(-streak, 0)
    if ok:
        successes = min(successes + 1, success_before)
        return successes >= success_before, successes
    failures = min(failures + 1, failures_before)
    return failures >= failures_before, -failures


def uses_thresholds(defn: dict[str, Any]) -> bool:
    return int(defn.get("SuccessBeforePassing") or 0) > 1 or (
        int(defn.get("FailuresBeforeCritical") or 0) > 1
    )


def ttl_expired_output(last_output: str) -> str:
    """Consul's output for a lapsed TTL check (it keeps the last output it had)."""
    if not last_output:
        return "TTL expired"
    return f"TTL expired (last output before timeout follows): {last_output}"


def alias_result(
    checks: Iterable[tuple[str, str, str, str]], service_id: str, node: str, service_found: bool
) -> Result:
    """An alias check's status: the worst of the aliased service's and node's checks.

    `checks` are (service_id, name, status, output) of the node's node-level
    checks and the aliased service's checks. An aliased service that does not
    exist is critical.
    """
    status, output = PASSING, "No checks found."
    for sid, name, st, out in checks:
        if sid and sid != service_id:
            continue
        if st == PASSING:
            if status == PASSING:
                output = "All checks passing."
            continue
        # Warning or critical (an unknown status counts as critical); a critical
        # settles it, a warning may still be overtaken by a critical.
        status = st if st == WARNING else CRITICAL
        output = f'Aliased check "{name}" failing: {out}'
        if status == CRITICAL:
            break
    if service_id and not service_found:
        return Result(CRITICAL, f"Service {service_id} could not be found on node {node}")
    return Result(status, output)
