"""Health checking for the checks on the control plane's own node.

`tick()` is the one periodic entry point (the in-process loop and Celery beat
both call it). Each call, idempotently and safely beside other workers:

1. claims the due HTTP / TCP / gRPC checks (a conditional UPDATE of
   `next_run_at`, so two workers never run the same check run) and probes them
   on a small bounded thread pool, each with its own timeout;
2. turns TTL checks whose `ttl_expires_at` passed critical ("TTL expired"),
   once per lapse;
3. recomputes alias checks when any check, service or node changed;
4. deregisters services whose check has been critical longer than its
   `DeregisterCriticalServiceAfter`;
5. expires sessions whose TTL lapsed (`sessions.expire_sessions`, when present).

Only checks of the server's own node (`MESH_NODE_NAME`) run here: other nodes'
checks belong to their per-host agents.

Results are stored with `catalog.apply_check_result` inside a `Change`, which
bumps indexes (and wakes watchers) only when a status or output changed; a
result equal to the stored one writes nothing.

Probes (`probe_http`, `probe_tcp`, `probe_grpc`) and the Consul rules around
them (`threshold_step`, `alias_result`, `ttl_expired_output`) are plain
functions on plain data, testable without a database.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urljoin, urlsplit

from django.conf import settings
from django.db import InterfaceError, OperationalError, connections, transaction
from django.db.models import Q
from django.utils import timezone

from registry.domain import catalog, connect_ca
from registry.domain.txn import Change, topic_index
from registry.errors import NotFound
from registry.models import Check, Node, ServiceInstance

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # seconds, as Consul's HTTP/TCP/gRPC checks
DEFAULT_OUTPUT_MAX = 4096  # bytes of a response body kept in the output, as Consul
USER_AGENT = "Consul Health Check"
MAX_REDIRECTS = 10
PROBED_TYPES = ("http", "tcp", "grpc")
# Private to this module: the consecutive-results counter kept in Check.definition
# for SuccessBeforePassing / FailuresBeforeCritical (never shown by the API).
STREAK_KEY = "_streak"
# A change to any of these topics may change an alias check's answer.
ALIAS_TOPICS = ("checks", "services", "nodes")


@dataclass(frozen=True)
class Result:
    """What one probe found: a Consul status and its output text."""

    status: str
    output: str


@dataclass(frozen=True)
class Probe:
    """A claimed check run, as plain data (what the pool threads get)."""

    pk: int
    kind: str
    definition: dict[str, Any]
    timeout: float


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
        return Result(Check.CRITICAL, f"dial tcp {addr}: {_os_reason(exc)}")
    return Result(Check.PASSING, f"TCP connect {addr}: Success")


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
                Check.CRITICAL,
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
        return Result(Check.CRITICAL, f'{method.capitalize()} "{url}": {reason_text}')
    text = data.decode("utf-8", errors="replace")
    output = f"HTTP {method} {url}: {status} {reason} Output: {text}"
    if 200 <= status <= 299:
        return Result(Check.PASSING, output)
    if status == 429:
        return Result(Check.WARNING, output)
    return Result(Check.CRITICAL, output)


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
        return Result(Check.CRITICAL, f"gRPC check {spec}: failed: {_os_reason(exc)}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        code = _grpc_code_name(exc.code()) if hasattr(exc, "code") else "Unknown"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return Result(Check.CRITICAL, f"rpc error: code = {code} desc = {details}")
    finally:
        channel.close()
    if resp.status == health_pb2.HealthCheckResponse.SERVING:
        return Result(Check.PASSING, f"gRPC check {spec}: success")
    status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return Result(Check.CRITICAL, f"gRPC {spec} serving status: {status_name}")


def run_probe(probe: Probe) -> Result:
    """Run one probe; never raises (an unexpected error is a critical result)."""
    try:
        if probe.kind == "http":
            return probe_http(probe.definition, probe.timeout)
        if probe.kind == "tcp":
            return probe_tcp(str(probe.definition["TCP"]), probe.timeout)
        if probe.kind == "grpc":
            return probe_grpc(probe.definition, probe.timeout)
    except Exception as exc:  # a bad definition must not kill the pool thread
        log.warning("check %s probe failed unexpectedly", probe.pk, exc_info=True)
        return Result(Check.CRITICAL, f"check failed: {exc}")
    return Result(Check.CRITICAL, f"unsupported check type {probe.kind!r}")


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
    ok = status in (Check.PASSING, Check.WARNING)
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
    status, output = Check.PASSING, "No checks found."
    for sid, name, st, out in checks:
        if sid and sid != service_id:
            continue
        if st == Check.PASSING:
            if status == Check.PASSING:
                output = "All checks passing."
            continue
        # Warning or critical (an unknown status counts as critical); a critical
        # settles it, a warning may still be overtaken by a critical.
        status = st if st == Check.WARNING else Check.CRITICAL
        output = f'Aliased check "{name}" failing: {out}'
        if status == Check.CRITICAL:
            break
    if service_id and not service_found:
        return Result(Check.CRITICAL, f"Service {service_id} could not be found on node {node}")
    return Result(status, output)


# --- the pool of probe threads ---------------------------------------------------------

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_in_flight: set[int] = set()


def _executor() -> ThreadPoolExecutor:
    """The process's probe pool (recreated after a fork: Celery's prefork children)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(
                getattr(settings, "MESH_CHECK_CONCURRENCY", 8), thread_name_prefix="mesh-check"
            )
            _pool_pid = os.getpid()
            _in_flight.clear()
        return _pool


def _with_db_retry(fn, *args: Any) -> Any:
    """Run DB code from a pool thread; a dead pooled connection is dropped and retried once."""
    try:
        return fn(*args)
    except (OperationalError, InterfaceError):
        for conn in connections.all(initialized_only=True):
            conn.close()
        return fn(*args)
    finally:
        for conn in connections.all(initialized_only=True):
            if conn.errors_occurred and not conn.in_atomic_block:
                conn.close_if_unusable_or_obsolete()


def _probe_and_record(probe: Probe) -> None:
    try:
        result = run_probe(probe)
        _with_db_retry(record_result, probe, result)
    except Exception:
        log.exception("recording the result of check %s failed", probe.pk)
    finally:
        with _pool_lock:
            _in_flight.discard(probe.pk)


# --- the database shell ------------------------------------------------------------------


def _comparable(defn: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (defn or {}).items() if k != STREAK_KEY}


def record_result(probe: Probe, result: Result) -> bool:
    """Store a probe's result; True when the check's status or output changed.

    A result for a check that was deleted or re-registered with another
    definition while it ran is dropped (the next run uses the new definition).
    """
    check = Check.objects.filter(pk=probe.pk).only("status", "output", "definition").first()
    if check is None or _comparable(check.definition) != _comparable(probe.definition):
        return False
    defn = check.definition or {}
    apply, streak = True, None
    if uses_thresholds(defn):
        apply, streak = threshold_step(
            defn.get(STREAK_KEY),
            result.status,
            int(defn.get("SuccessBeforePassing") or 0),
            int(defn.get("FailuresBeforeCritical") or 0),
        )
    if apply and (result.status != check.status or result.output != check.output):
        # Lock order as every writer: the global index (Change) first, then the row.
        with Change() as change:
            row = (
                Check.objects.select_related("node").select_for_update().filter(pk=probe.pk).first()
            )
            if row is None or _comparable(row.definition) != _comparable(probe.definition):
                return False
            if streak is not None:
                row.definition = {**row.definition, STREAK_KEY: streak}
            catalog.apply_check_result(change, row, result.status, result.output)
        return True
    if streak is not None and streak != defn.get(STREAK_KEY):
        # Only the counter moved: no index, no topic, nobody to wake.
        with transaction.atomic():
            row = Check.objects.select_for_update().filter(pk=probe.pk).first()
            if row is not None and _comparable(row.definition) == _comparable(probe.definition):
                row.definition = {**row.definition, STREAK_KEY: streak}
                row.save(update_fields=["definition"])
    return False


def _claim(check: Check, now: datetime) -> bool:
    """Take this run of a due check: only one worker's UPDATE matches the value it read."""
    next_run = now + timedelta(seconds=max(check.interval, 0.1))
    return bool(
        Check.objects.filter(pk=check.pk, next_run_at=check.next_run_at).update(
            next_run_at=next_run
        )
    )


def _probe_of(check: Check) -> Probe:
    return Probe(
        pk=check.pk,
        kind=check.type,
        definition=dict(check.definition or {}),
        timeout=probe_timeout(check.timeout, check.interval),
    )


def run_due_checks(due: list[Check], now: datetime, *, wait: bool = False) -> int:
    """Claim and start the due probes; returns how many this worker took.

    With `wait`, probes still run concurrently but results are written by the
    calling thread before returning (tests use it); otherwise the pool
    threads write them as they finish, so a slow endpoint never holds up the
    tick loop.
    """
    pool = _executor()
    claimed: list[Probe] = []
    for check in due:
        with _pool_lock:
            if check.pk in _in_flight:  # still running here from an earlier tick
                continue
        if _claim(check, now):
            claimed.append(_probe_of(check))
    if not claimed:
        return 0
    if wait:
        futures: dict[Future, Probe] = {pool.submit(run_probe, p): p for p in claimed}
        for fut in as_completed(futures):
            record_result(futures[fut], fut.result())
        return len(claimed)
    with _pool_lock:
        _in_flight.update(p.pk for p in claimed)
    for p in claimed:
        pool.submit(_probe_and_record, p)
    return len(claimed)


def run_check(check_pk: int) -> Result | None:
    """Run one HTTP/TCP/gRPC check now and store its result (None: nothing to run).

    The run is claimed like a scheduled one (its next run moves one interval
    on), so a tick running the same check at the same moment does not double it.
    """
    check = Check.objects.filter(pk=check_pk, type__in=PROBED_TYPES).first()
    if check is None or not _claim(check, timezone.now()):
        return None
    probe = _probe_of(check)
    result = run_probe(probe)
    record_result(probe, result)
    return result


def expire_ttl_checks(lapsed: list[Check]) -> int:
    """Turn lapsed TTL checks critical, once per lapse (the timer is cleared until
    the next pass/warn/fail re-arms it)."""
    expired = 0
    for check in lapsed:
        with Change() as change:
            claimed = Check.objects.filter(pk=check.pk, ttl_expires_at=check.ttl_expires_at).update(
                ttl_expires_at=None
            )
            if not claimed:  # renewed, deleted or expired by another worker meanwhile
                continue
            row = Check.objects.select_related("node").select_for_update().get(pk=check.pk)
            catalog.apply_check_result(change, row, Check.CRITICAL, ttl_expired_output(row.output))
            # apply_check_result re-arms a TTL timer; a lapsed one stays unarmed.
            Check.objects.filter(pk=row.pk).update(ttl_expires_at=None)
            expired += 1
    return expired


_alias_seen: dict[str, int] = {}


def update_alias_checks(node_name: str, *, force: bool = False) -> int:
    """Recompute the node's alias checks when a check, service or node changed.

    One small query (the topics' index) when nothing changed since this
    process last looked; the answer is idempotent, so several workers agree.
    """
    seen_key = f"{os.getpid()}:{node_name}"
    index = topic_index(*ALIAS_TOPICS)
    if not force and _alias_seen.get(seen_key) == index:
        return 0
    aliases = list(Check.objects.filter(node__name=node_name, type="alias").select_related("node"))
    changed = 0
    for alias in aliases:
        result = _alias_status(alias)
        if (result.status, result.output) == (alias.status, alias.output):
            continue
        with Change() as change:
            row = (
                Check.objects.select_related("node").select_for_update().filter(pk=alias.pk).first()
            )
            if row is None:
                continue
            result = _alias_status(row)
            if (result.status, result.output) != (row.status, row.output):
                catalog.apply_check_result(change, row, result.status, result.output)
                changed += 1
    _alias_seen[seen_key] = index
    return changed


def _alias_status(alias: Check) -> Result:
    defn = alias.definition or {}
    service_id = defn.get("AliasService") or ""
    node_name = defn.get("AliasNode") or alias.node.name
    node = Node.objects.filter(name=node_name).only("pk").first()
    if node is None:
        return Result(Check.CRITICAL, f"Node {node_name} could not be found")
    found = (
        bool(service_id)
        and ServiceInstance.objects.filter(node=node, service_id=service_id).exists()
    )
    q = Q(service_id="") | Q(service_id=service_id) if service_id else Q(service_id="")
    rows = (
        Check.objects.filter(node=node)
        .filter(q)
        .exclude(pk=alias.pk)
        .order_by("check_id")
        .values_list("service_id", "name", "status", "output")
    )
    return alias_result(rows, service_id, node_name, found)


def reap_critical_services(candidates: list[Check], now: datetime) -> int:
    """Deregister services whose check stayed critical past DeregisterCriticalServiceAfter."""
    reaped = 0
    for check in candidates:
        if not check.service_id or check.critical_since is None:
            continue
        if check.critical_since + timedelta(seconds=check.deregister_after) > now:
            continue
        with Change():
            # Re-read under the lock: the check may have passed since we looked.
            row = Check.objects.select_for_update().filter(pk=check.pk).first()
            if row is None or row.status != Check.CRITICAL or row.critical_since is None:
                continue
            if row.critical_since + timedelta(seconds=row.deregister_after) > now:
                continue
            try:
                catalog.deregister_agent_service(check.node, check.service_id)
            except NotFound:  # already gone (another worker, or a user)
                continue
            log.info(
                "deregistered service %s: check %s critical since %s",
                check.service_id,
                check.check_id,
                check.critical_since.isoformat(),
            )
            reaped += 1
    return reaped


def expire_sessions() -> int:
    """Session TTL expiry, when the sessions module offers it."""
    from registry.domain import sessions

    fn = getattr(sessions, "expire_sessions", None)
    if fn is None:
        return 0
    return int(fn() or 0)


def tick(*, wait: bool = False) -> dict[str, int]:
    """One pass of health work for this server's node; returns what it did.

    Idempotent and safe beside other workers (see the module docstring). With
    nothing due it costs two small queries (plus session expiry's own).
    """
    now = timezone.now()
    node_name = settings.MESH_NODE_NAME
    rows = list(
        Check.objects.select_related("node")
        .filter(node__name=node_name)
        .filter(
            Q(type__in=PROBED_TYPES, next_run_at__lte=now)
            | Q(type="ttl", ttl_expires_at__lte=now)
            | Q(deregister_after__gt=0, critical_since__isnull=False)
        )
        .order_by("next_run_at", "pk")
    )
    due = [c for c in rows if c.type in PROBED_TYPES and c.next_run_at and c.next_run_at <= now]
    lapsed = [c for c in rows if c.type == "ttl" and c.ttl_expires_at and c.ttl_expires_at <= now]
    dying = [c for c in rows if c.deregister_after > 0 and c.critical_since is not None]
    connect_ca.retire_expired_roots()  # old CA roots whose last leaf expired (idle: no query)
    return {
        "checks_run": run_due_checks(due, now, wait=wait) if due else 0,
        "ttl_expired": expire_ttl_checks(lapsed) if lapsed else 0,
        "aliases_updated": update_alias_checks(node_name),
        "services_deregistered": reap_critical_services(dying, now) if dying else 0,
        "sessions_expired": expire_sessions(),
    }
