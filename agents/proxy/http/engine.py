"""The HTTP proxy: each request's way through the sidecar.

Outbound (the local app calls an upstream's local listener): route by the
compiled discovery chain → fault injection → split → circuit breaker → pick an
endpoint (balancer, minus ejected outliers) → pooled mTLS connection to its
sidecar → answer; retried as the route's policy and the retry budget allow,
within the route's timeout.

Inbound (a peer sidecar over mTLS): the caller's identity was checked when the
connection was accepted; per request, L7 intentions (the same
`IntentionIndex` as the control plane) → rate limits → a pooled connection to
the local app → answer.

Every request is reported once to the observer (`agents.proxy.observe`).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from agents.proxy.authz import Verdict
from agents.proxy.balancing import (
    HTTP_POLICIES,
    Balancer,
    Maglev,
    RingHash,
    RoundRobin,
    hash_bytes,
    key_of,
)
from agents.proxy.http.guards import Circuit, Outliers, RetryBudget, TokenBucket
from agents.proxy.http.h2wire import H2Client, H2Stream
from agents.proxy.http.routes import Router, rewrite_prefix
from agents.proxy.http.wire import (
    HOP_BY_HOP,
    REASONS,
    ClientConn,
    Handler,
    Headers,
    Request,
    ServerConn,
    strip_hop_by_hop,
)
from agents.proxy.logs import log
from agents.proxy.observe import NULL_OBSERVER, Observer, RequestRecord
from agents.proxy.tls import peer_spiffe_id
from meshproto.proxycfg import Cluster, RetryPolicy, Route, Upstream, WeightedCluster

if TYPE_CHECKING:
    from agents.proxy.sidecar import Sidecar, Snapshot

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
GRPC_CODES = {
    "cancelled": b"1",
    "deadline-exceeded": b"4",
    "resource-exhausted": b"8",
    "internal": b"13",
    "unavailable": b"14",
}
MAX_IDLE_PER_POOL = 64
POOL_IDLE_TIMEOUT = 60.0
HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc"})
H2_PROTOCOLS = frozenset({"http2", "grpc"})
_COLON = b": "  # header lines are name + _COLON + value, joined by CRLF


class Failure(Exception):
    """An attempt that got no usable answer: `kind` is connect | timeout | reset |
    stale | protocol | overflow; `flag` the Envoy response flag."""

    def __init__(self, kind: str, flag: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind
        self.flag = flag


class SplitPlan:
    """What a (route, split) pair does to each request, worked out once per
    config: the request header edits as bytes (the route's, then the
    split's), the response header edits and the retry conditions. The
    per-request path only reads these."""

    __slots__ = ("edits", "resp_mods", "conditions", "max_retries", "grpc_retry")

    def __init__(self, route: Route, split: WeightedCluster) -> None:
        steps = (
            _edit(
                route.request_headers_remove, route.request_headers_set, route.request_headers_add
            ),
            _edit(split.request_headers_remove, split.request_headers_set, ()),
        )
        self.edits = tuple(e for e in steps if e is not None)
        self.resp_mods = (
            tuple(route.response_headers_remove) + tuple(split.response_headers_remove),
            tuple(route.response_headers_set) + tuple(split.response_headers_set),
            tuple(route.response_headers_add),
        )
        self.conditions = _conditions(route.retry)
        self.max_retries = route.retry.num_retries or (1 if self.conditions else 0)
        self.grpc_retry = any(c in GRPC_CODES for c in self.conditions)

    def apply(self, headers: Headers) -> Headers:
        for drop, set_, add in self.edits:
            if drop:
                headers = [(n, v) for n, v in headers if n not in drop]
            headers.extend(set_)
            headers.extend(add)
        return headers


def _edit(remove, set_, add) -> tuple[frozenset[bytes], Headers, Headers] | None:
    """One header edit step as bytes: names to drop, then headers to set and to add."""
    if not (remove or set_ or add):
        return None
    drop = frozenset(n.lower().encode() for n in remove) | {n.lower().encode() for n, _ in set_}
    return (
        drop,
        [(n.lower().encode(), v.encode()) for n, v in set_],
        [(n.lower().encode(), v.encode()) for n, v in add],
    )


class HttpUpstream:
    """One HTTP upstream under one config: its router, clusters and balancers."""

    def __init__(self, upstream: Upstream, active: dict) -> None:
        self.upstream = upstream
        self.router = Router(upstream)  # RouteError: the config is refused
        self.clusters = {c.name: c for c in upstream.clusters}
        self.balancers: dict[str, Balancer] = {
            c.name: HTTP_POLICIES.get(c.lb_policy, RoundRobin)(c.endpoints, active)
            for c in upstream.clusters
        }
        self.splits: dict[int, SplitPlan] = {
            id(split): SplitPlan(r.route, split) for r in self.router.routes for split in r.splits
        }


class Attempt:
    """One try of a request on one upstream connection (an `Exchange`).

    Only the head is always waited for; the futures for the end of the
    response and its first body byte are made when someone waits for them
    and the response is not there yet (a small response is usually whole by
    the time its head is handled)."""

    __slots__ = (
        "conn",
        "loop",
        "head_fut",
        "_done_fut",
        "_first_fut",
        "error",
        "status",
        "reason",
        "headers",
        "framing",
        "sink",
        "early",
        "finished",
        "nbytes",
        "trailer_headers",
    )

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.loop = loop
        self.head_fut: asyncio.Future[None] = loop.create_future()
        self._done_fut: asyncio.Future[None] | None = None
        self._first_fut: asyncio.Future[None] | None = None
        self.error: Failure | None = None
        self.status = 0
        self.reason = b""
        self.headers: Headers = []
        self.framing = ""
        self.sink: _Sink | None = None
        self.early: list[bytes] = []
        self.finished = False
        self.nbytes = 0
        self.trailer_headers: Headers | None = None

    @property
    def done_fut(self) -> asyncio.Future[None]:
        """Resolved when the response is over (raises its `Failure`)."""
        if self._done_fut is None:
            self._done_fut = self._settled(self.finished)
        return self._done_fut

    @property
    def first_fut(self) -> asyncio.Future[None]:
        """Resolved at the first body byte or the end."""
        if self._first_fut is None:
            self._first_fut = self._settled(self.finished or self.nbytes > 0)
        return self._first_fut

    def _settled(self, ready: bool) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        if ready:
            fut.set_result(None)
        elif self.error is not None:
            fut.set_exception(self.error)
            fut.exception()
        return fut

    def trailers(self, headers: Headers) -> None:
        self.trailer_headers = headers

    def head(self, status: int, reason: bytes, headers: Headers, framing: str) -> None:
        self.status, self.reason, self.headers, self.framing = status, reason, headers, framing
        if not self.head_fut.done():
            self.head_fut.set_result(None)

    def body(self, data: bytes) -> None:
        if not self.nbytes and self._first_fut is not None and not self._first_fut.done():
            self._first_fut.set_result(None)
        self.nbytes += len(data)
        if self.sink is not None:
            self.sink.chunk(data)
        else:
            self.early.append(data)

    def done(self) -> None:
        self.finished = True
        if self._first_fut is not None and not self._first_fut.done():
            self._first_fut.set_result(None)
        if self.sink is not None:
            self.sink.end(self.trailer_headers)
        if self._done_fut is not None and not self._done_fut.done():
            self._done_fut.set_result(None)

    def failed(self, kind: str) -> None:
        exc = self.error = Failure(kind, "UC" if kind != "protocol" else "UPE")
        for fut in (self.head_fut, self._done_fut, self._first_fut):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: no "never retrieved" warning

    def commit(self, sink: Any) -> None:
        """From now on the body goes to the caller."""
        self.sink = sink
        for data in self.early:
            sink.chunk(data)
        self.early = []
        if self.finished:
            sink.end(self.trailer_headers)


class _Sink:
    """Writes a streamed response body to the caller, re-framed. While `buf`
    is set (the head not yet written), pieces are gathered into it, so that a
    small response that has already arrived whole leaves in one write (one
    TLS record, one syscall) rather than one per piece."""

    __slots__ = ("conn", "chunked", "buf")

    def __init__(self, conn: ServerConn, chunked: bool, buf: list[bytes] | None = None) -> None:
        self.conn = conn
        self.chunked = chunked
        self.buf = buf

    def chunk(self, data: bytes) -> None:
        if self.chunked:
            if data:
                pieces = [b"%x\r\n" % len(data), data, b"\r\n"]
                if self.buf is not None:
                    self.buf.extend(pieces)
                else:
                    self.conn.writelines(pieces)
        elif self.buf is not None:
            self.buf.append(data)
        else:
            self.conn.write(data)

    def end(self, trailers: Headers | None = None) -> None:
        if self.chunked:
            if self.buf is not None:
                self.buf.append(b"0\r\n\r\n")
            else:
                self.conn.write(b"0\r\n\r\n")

    def flush(self) -> None:
        buf, self.buf = self.buf, None
        if buf:
            self.conn.writelines(buf)


def request_id() -> bytes:
    """A version-4 UUID for `x-request-id`. Like trace ids it must be unique,
    not secret: `random.getrandbits`, no system call per request."""
    n = (_getrandbits(128) & _UUID_CLEAR) | _UUID_V4
    h = b"%032x" % n
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


_getrandbits = random.getrandbits
_UUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # the version and variant bits
_UUID_V4 = (0x4000 << 64) | (0x8000 << 48)


def _text_headers(headers: Headers) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, v in headers:
        name = n.decode("latin-1")
        value = v.decode("latin-1")
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def _apply(headers: Headers, remove, set_, add) -> Headers:
    if remove or set_:
        drop = {n.lower().encode() for n in remove} | {n.lower().encode() for n, _ in set_}
        headers = [(n, v) for n, v in headers if n not in drop]
        headers.extend((n.lower().encode(), v.encode()) for n, v in set_)
    if add:
        headers.extend((n.lower().encode(), v.encode()) for n, v in add)
    return headers


class HttpProxy(Handler):
    """The HTTP side of one sidecar (see the module docstring)."""

    def __init__(self, sidecar: Sidecar, observer: Observer = NULL_OBSERVER) -> None:
        self.sc = sidecar
        self.observer = observer
        self.pools: dict[Any, list[ClientConn]] = {}
        self.circuits: dict[str, Circuit] = {}
        self.outliers: dict[str, Outliers] = {}
        self.budgets: dict[tuple, RetryBudget] = {}
        self.active: dict = {}  # endpoint → requests in flight (least_request)
        self.limiters: dict[Any, TokenBucket] = {}
        self.h2pool: dict[Any, H2Client] = {}
        self.h2dialing: dict[Any, asyncio.Future] = {}
        self.read_timeout = 10.0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The sidecar's loop, looked up once (each lookup costs a getpid())."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # ------------------------------------------------------------------ state

    def plan(self, upstream: Upstream) -> HttpUpstream:
        return HttpUpstream(upstream, self.active)

    def _circuit(self, cluster: Cluster) -> Circuit:
        c = self.circuits.get(cluster.name)
        if c is None or (c.limits is not cluster.limits and c.limits != cluster.limits):
            fresh = Circuit(cluster.limits)
            if c is not None:
                fresh.connections, fresh.active = c.connections, c.active
            c = self.circuits[cluster.name] = fresh
        return c

    def _outliers(self, cluster: Cluster) -> Outliers | None:
        if cluster.outlier is None:
            return None
        o = self.outliers.get(cluster.name)
        if o is None or (o.policy is not cluster.outlier and o.policy != cluster.outlier):
            o = self.outliers[cluster.name] = Outliers(cluster.outlier, len(cluster.endpoints))
        o.size = len(cluster.endpoints)
        return o

    def _budget(self, cluster: str, policy: RetryPolicy) -> RetryBudget:
        key = (cluster, policy.budget_percent, policy.budget_min_per_s, policy.budget_window_s)
        b = self.budgets.get(key)
        if b is None:
            b = self.budgets[key] = RetryBudget(policy)
        return b

    def _bucket(self, key: Any, rate: float, burst: int) -> TokenBucket:
        b = self.limiters.get(key)
        if b is None or b.rate != rate:
            b = self.limiters[key] = TokenBucket(rate, burst)
        return b

    # ------------------------------------------------------------------ accepting

    def accept(self, conn: ServerConn) -> bool:
        snap = self.sc.snapshot
        if snap is None:
            return False
        metrics = self.sc.metrics
        if conn.direction == "outbound":
            conn.tag = (snap, conn.tag)  # (snapshot at accept, listener key)
            return True
        inbound = snap.config.inbound
        limit = inbound.limits.max_connections
        if limit and metrics.active["inbound"] > limit:  # this one is counted already
            self.sc._refused("inbound connection refused: MaxInboundConnections reached")
            return False
        cert = conn.transport.get_extra_info("peercert")  # type: ignore[union-attr]
        uri = peer_spiffe_id(cert)
        verdict = snap.authz.check_http(uri)
        wrong = _wrong_issuer(snap, uri, conn.transport)
        if wrong is not None and verdict.identity_ok:
            verdict = Verdict(False, verdict.source, f"{uri}: {wrong}", False, wrong)
        if not verdict.allowed:
            if verdict.identity_ok:
                metrics.authz_denials[verdict.source] += 1
                msg = "inbound connection denied by intentions"
            else:
                metrics.handshake_failed("inbound", verdict.code)
                msg = "inbound connection refused: bad client identity"
            self.sc._refused(
                msg, source=uri, destination=snap.config.service, reason=verdict.reason
            )
            return False
        metrics.authz_allowed += 1
        conn.tag = (snap, verdict, uri)
        return True

    def bad_request(self, conn: ServerConn, status: int, reason: str) -> None:
        self.sc.metrics.http_bad_requests[(conn.direction, status)] += 1
        self.sc._refused("malformed request refused", direction=conn.direction, status=status,
                         reason=reason)  # fmt: skip

    # ------------------------------------------------------------------ requests

    async def serve(self, conn: ServerConn, req: Request) -> None:
        # Each request follows the current config (a keep-alive connection
        # lives across pushes); L4 connections keep theirs to the end.
        snap: Snapshot = self.sc.snapshot or conn.tag[0]
        inbound = conn.direction == "inbound"
        if inbound and snap is not conn.tag[0]:
            verdict = snap.authz.check_http(conn.tag[2])
            conn.tag = (snap, verdict, conn.tag[2])
            if not verdict.allowed:
                self.sc.metrics.authz_denials[verdict.source] += 1
                conn.answer(403, b"denied by intentions\n", close=True)
                return
        span = self.observer.begin("destination" if inbound else "source", req.headers)
        rid = req.header(b"x-request-id")
        if rid is None:
            rid = request_id()
            req.headers.append((b"x-request-id", rid))
        path, _, query = req.target.partition("?")
        rec = RequestRecord(
            reporter="destination" if inbound else "source",
            source_service=conn.tag[1].source if inbound else snap.config.service,
            destination_service=snap.config.service if inbound else "",
            method=req.method,
            path=path,
            authority=(req.header(b"host") or b"").decode("latin-1"),
            protocol="http",
            status=0,
            started=time.time(),
            duration_s=0.0,
            request_bytes=len(req.body),
            request_id=rid.decode("latin-1"),
        )
        t0 = time.monotonic()
        try:
            if inbound:
                await self._inbound(conn, req, snap, rec, span, path, query)
            else:
                await self._outbound(conn, req, snap, rec, span, path, query)
        except asyncio.CancelledError:
            rec.response_flags = "DC"
            raise
        except Exception as exc:  # a bug must cost one request, not the sidecar
            log.error("request failed unexpectedly", error=repr(exc), path=path)
            if not rec.status:
                rec.status = 500
                rec.response_bytes = conn.answer(500, b"internal proxy error\n", close=True)
        finally:
            rec.duration_s = time.monotonic() - t0
            if conn.lost and rec.response_flags == "-":
                rec.response_flags = "DC"
            self.sc.metrics.http_requests[(rec.reporter, rec.status)] += 1
            span.finish(rec)

    def _local(self, conn: ServerConn, rec: RequestRecord, status: int, msg: str, flag: str,
               headers: Headers = ()) -> None:  # fmt: skip
        rec.status = status
        rec.response_flags = flag
        rec.response_bytes = conn.answer(status, msg.encode() + b"\n", list(headers))

    # ---------------------------------------------------------------- inbound

    async def _inbound(self, conn, req, snap, rec, span, path, query) -> None:
        verdict = conn.tag[1]
        inbound = snap.config.inbound
        if verdict.l7:
            decision = snap.authz.request(verdict, req.method, path, _text_headers(req.headers))
            if not decision.allowed:
                rec.denied_by = decision.intention_id or "default"
                self.sc.metrics.http_denied[verdict.source] += 1
                self._local(conn, rec, 403, "denied by intentions", "RBAC",
                            [(b"x-mesh-denied-by", rec.denied_by.encode())])  # fmt: skip
                return
        wait = 0.0
        for i, rl in enumerate(snap.route_limits):
            if rl.matches(path):
                wait = self._bucket(("route", i, rl.path), rl.rate, rl.burst).take()
                break
        if not wait and inbound.rate_limit.requests_per_second > 0:
            wait = self._bucket(
                "instance", inbound.rate_limit.requests_per_second, inbound.rate_limit.burst
            ).take()
        if wait:
            self.sc.metrics.http_rate_limited += 1
            self._local(conn, rec, 429, "rate limited", "RL",
                        [(b"retry-after", b"%d" % max(1, math.ceil(wait)))])  # fmt: skip
            return
        headers = self._forward_headers(conn, req, span, "https")
        rec.cluster = "local_app"
        target = (inbound.local_app_address, inbound.local_app_port)
        rec.upstream = f"{target[0]}:{target[1]}"
        deadline = (
            (time.monotonic() + inbound.request_timeout_s) if inbound.request_timeout_s else None
        )
        use_h2 = inbound.protocol in H2_PROTOCOLS
        rec.protocol = inbound.protocol
        for stale_retry in (False, True):
            try:
                # A pooled connection without a coroutine; else dial (or h2).
                client = (None if use_h2 else self._idle(("app", target))) or (
                    await self._app_conn(target, use_h2)
                )
            except Failure as f:
                self.sc.metrics.connect_failures[("local_app", f.kind)] += 1
                self._local(conn, rec, 503, "cannot reach the local app", "UF")
                return
            att = Attempt(client, self.loop)
            _send(client, att, req, req.target, headers)
            try:
                await _wait(att.head_fut, deadline)
            except Failure as f:
                if f.kind == "stale" and not stale_retry:
                    continue
                self._local(conn, rec, 502, "the local app reset the connection", "UC")
                return
            except TimeoutError:
                client.detach()
                self._local(conn, rec, 504, "the local app did not answer in time", "UT")
                return
            await self._relay(conn, req, att, rec, (), (), (), deadline)
            return

    async def _app_conn(self, target: tuple[str, int], use_h2: bool) -> Any:
        key = ("app", target)
        if use_h2:
            return await self._h2_conn(key, target, None, None, None, None)
        conn = self._idle(key)
        if conn is not None:
            return conn
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: ClientConn(self._released), *target), 5.0
            )
        except (TimeoutError, OSError) as exc:
            raise Failure("connect", "UF", str(exc)) from None
        conn.key = key
        return conn

    # ---------------------------------------------------------------- outbound

    async def _outbound(self, conn, req, snap, rec, span, path, query) -> None:
        listener = conn.tag[1]
        plan: HttpUpstream | None = snap.http.get(listener)
        if plan is None:
            self._local(conn, rec, 503, "no upstream on this listener", "NR")
            return
        rec.destination_service = plan.upstream.destination
        headers_text = _text_headers(req.headers) if plan.router.needs_headers else {}
        croute = plan.router.match(req.method, path, query, headers_text)
        if croute is None:
            self._local(conn, rec, 404, "no route matches", "NR")
            return
        route: Route = croute.route
        rec.route = croute.name
        fault = route.fault
        if fault is not None:
            if fault.delay_s and random.random() * 100 < fault.delay_percent:
                await asyncio.sleep(fault.delay_s)
                rec.response_flags = "DI"
            if fault.abort_status and random.random() * 100 < fault.abort_percent:
                self._local(conn, rec, fault.abort_status, "fault injected", "FI")
                return
        split = croute.pick()
        chosen = plan.clusters[split.cluster]
        rec.cluster = chosen.name  # logged even when it has no healthy endpoint, as Envoy does
        cluster = self._usable(plan, chosen)
        if cluster is None:
            self._local(conn, rec, 503, "no healthy upstream", "UH")
            return
        rec.cluster = cluster.name
        circuit = self._circuit(cluster)
        overflow = circuit.request_overflow()
        if overflow:
            self.sc.metrics.http_overflows[(cluster.name, overflow)] += 1
            self._local(conn, rec, 503, f"circuit breaker open: {overflow}", "UO",
                        [(b"x-mesh-overflow", overflow.encode())])  # fmt: skip
            return
        target = req.target
        if route.prefix_rewrite and route.match.path_prefix:
            target = rewrite_prefix(target, route.match.path_prefix, route.prefix_rewrite)
        sp = plan.splits[id(split)]
        headers = sp.apply(self._forward_headers(conn, req, span, "http"))
        resp_mods = sp.resp_mods
        policy = route.retry
        timeout = route.timeout_s or cluster.request_timeout_s
        deadline = time.monotonic() + timeout if timeout else None
        budget = self._budget(cluster.name, policy)
        budget.request()
        conditions = sp.conditions
        max_retries = sp.max_retries
        may_retry_sent = req.method in IDEMPOTENT or policy.retry_non_idempotent
        balancer = plan.balancers[cluster.name]
        outliers = self._outliers(cluster)
        hash_key = (
            _hash_key(cluster, req, conn, query)
            if isinstance(balancer, RingHash | Maglev) and cluster.hash_policies
            else None
        )
        tried: set = set()
        data_cache: dict[str, list[bytes]] = {}
        use_h2 = plan.upstream.protocol in H2_PROTOCOLS
        rec.protocol = plan.upstream.protocol
        grpc_retry = use_h2 and sp.grpc_retry
        circuit.active += 1
        try:
            while True:
                exclude = set(tried)
                if outliers is not None:
                    exclude |= outliers.ejected()
                if hash_key is not None:
                    endpoint = (
                        balancer.pick(exclude, hash_key)  # type: ignore[call-arg]
                        or balancer.pick(tried, hash_key)  # type: ignore[call-arg]
                        or balancer.pick((), hash_key)  # type: ignore[call-arg]
                    )
                else:
                    endpoint = balancer.pick(exclude) or balancer.pick(tried) or balancer.pick()
                if endpoint is None and cluster.gateway is None:
                    self._local(conn, rec, 503, "no healthy upstream", "UH")
                    return
                ep = key_of(endpoint) if endpoint is not None else (
                    cluster.gateway.address, cluster.gateway.port)  # type: ignore[union-attr]  # fmt: skip
                tried.add(ep)
                rec.upstream = f"{ep[0]}:{ep[1]}"
                failure: Failure | None = None
                att: Attempt | None = None
                self.active[ep] = self.active.get(ep, 0) + 1
                try:
                    client = (
                        None
                        if use_h2
                        else self._idle(
                            (cluster.name, ep, cluster.sni, cluster.spiffe_id, id(snap.contexts))
                        )  # fmt: skip
                    ) or await self._peer_conn(snap, cluster, ep, circuit, deadline, use_h2)
                    att = Attempt(client, self.loop)
                    _send(client, att, req, target, headers, data_cache)
                    try:
                        await _wait(att.head_fut, _try_deadline(deadline, policy))
                    except TimeoutError:
                        client.detach()
                        raise Failure("timeout", "UT") from None
                except Failure as f:
                    failure = f
                finally:
                    n = self.active.get(ep, 1) - 1
                    if n > 0:
                        self.active[ep] = n
                    else:
                        self.active.pop(ep, None)
                # Classify the outcome.
                if failure is not None:
                    if failure.kind == "stale":  # an idle connection the peer closed: again
                        tried.discard(ep)
                        continue
                    if outliers is not None and failure.kind in ("connect", "reset", "timeout"):
                        self._eject_check(outliers, ep, cluster)
                    retriable = _retriable_failure(failure.kind, conditions) and (
                        failure.kind == "connect" or may_retry_sent
                    )
                    out_of_time = deadline is not None and time.monotonic() >= deadline
                    if retriable and not out_of_time and rec.retries < max_retries:
                        if budget.try_retry():
                            rec.retries += 1
                            self.sc.metrics.http_retries[cluster.name] += 1
                            await _backoff(policy, rec.retries, deadline)
                            continue
                        self.sc.metrics.http_budget_exhausted[cluster.name] += 1
                    if failure.kind == "overflow":
                        self.sc.metrics.http_overflows[(cluster.name, "max_pending_requests")] += 1
                        self._local(conn, rec, 503, "circuit breaker open: max_pending_requests",
                                    "UO", [(b"x-mesh-overflow", b"max_pending_requests")])  # fmt: skip
                    elif failure.kind == "timeout" or out_of_time:
                        self._local(conn, rec, 504, "upstream request timeout", "UT")
                    elif failure.kind == "connect":
                        self._local(conn, rec, 503, "upstream connect failure", "UF")
                    else:
                        self._local(conn, rec, 502, "upstream reset before answering",
                                    failure.flag)  # fmt: skip
                    if rec.retries:
                        rec.response_flags += ",URX"
                    return
                assert att is not None
                status = att.status
                if grpc_retry and att.framing == "stream" and not att.finished and not att.nbytes:
                    # A gRPC error may come as headers, then trailers: wait for the
                    # first message or the end before deciding (nothing is sent yet).
                    try:
                        await _wait(att.first_fut, _try_deadline(deadline, policy))
                    except TimeoutError:
                        att.conn.detach()
                        self._local(conn, rec, 504, "upstream request timeout", "UT")
                        return
                    except Failure:
                        self._local(conn, rec, 502, "upstream reset before answering", "UC")
                        return
                verdict_headers = att.headers
                if att.finished and not att.nbytes and att.trailer_headers:
                    verdict_headers = att.headers + att.trailer_headers
                if outliers is not None:
                    if status >= 500:
                        self._eject_check(outliers, ep, cluster)
                    else:
                        outliers.success(ep)
                if (
                    _retriable_status(status, verdict_headers, policy, conditions)
                    # gRPC calls are POSTs: a gRPC retry condition is the
                    # explicit consent to retry them on that status.
                    and (may_retry_sent or _grpc_status_match(verdict_headers, conditions))
                    and rec.retries < max_retries
                    and (deadline is None or time.monotonic() < deadline)
                ):
                    if budget.try_retry():
                        if not att.finished:
                            att.conn.detach()
                        rec.retries += 1
                        self.sc.metrics.http_retries[cluster.name] += 1
                        await _backoff(policy, rec.retries, deadline)
                        continue
                    self.sc.metrics.http_budget_exhausted[cluster.name] += 1
                if rec.retries and _retriable_status(status, verdict_headers, policy, conditions):
                    rec.response_flags = "URX"
                await self._relay(conn, req, att, rec, *resp_mods, deadline)
                return
        finally:
            circuit.active -= 1

    def _usable(self, plan: HttpUpstream, cluster: Cluster) -> Cluster | None:
        if cluster.endpoints or cluster.gateway is not None:
            return cluster
        for alt in cluster.failover:
            other = plan.clusters.get(alt)
            if other is not None and (other.endpoints or other.gateway is not None):
                return other
        return None

    def _eject_check(self, outliers: Outliers, ep, cluster: Cluster) -> None:
        if outliers.failure(ep):
            self.sc.metrics.http_ejections[cluster.name] += 1
            log.warning("endpoint ejected (outlier detection)", cluster=cluster.name,
                        endpoint=f"{ep[0]}:{ep[1]}")  # fmt: skip

    async def _peer_conn(
        self, snap, cluster: Cluster, ep, circuit: Circuit, deadline, use_h2: bool = False
    ) -> Any:
        key = (cluster.name, ep, cluster.sni, cluster.spiffe_id, id(snap.contexts))
        if use_h2:
            return await self._h2_conn(key, ep, snap, cluster, circuit, deadline)
        conn = self._idle(key)
        if conn is not None:
            return conn
        if not circuit.may_connect():
            if not circuit.may_wait():
                raise Failure("overflow", "UO")
            circuit.pending += 1
            try:
                while not circuit.may_connect():
                    conn = self._idle(key)
                    if conn is not None:
                        return conn
                    if deadline is not None and time.monotonic() >= deadline:
                        raise Failure("timeout", "UT")
                    await asyncio.sleep(0.005)
            finally:
                circuit.pending -= 1
        circuit.connections += 1
        loop = asyncio.get_running_loop()
        ctx = snap.contexts.client_h1
        timeout = cluster.connect_timeout_s
        if deadline is not None:
            timeout = max(0.001, min(timeout, deadline - time.monotonic()))
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: ClientConn(self._released),
                    ep[0],
                    ep[1],
                    ssl=ctx,
                    server_hostname=cluster.sni or None,
                    ssl_handshake_timeout=self.sc.handshake_timeout,
                ),
                timeout,
            )
        except (TimeoutError, OSError) as exc:
            circuit.connections -= 1
            reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            self.sc.metrics.connect_failures[(cluster.service, reason)] += 1
            self.sc._refused("upstream connect failed", upstream=cluster.name,
                             endpoint=f"{ep[0]}:{ep[1]}", reason=reason)  # fmt: skip
            raise Failure("connect", "UF", reason) from None
        conn.key = key
        conn.cluster = circuit
        uri = peer_spiffe_id(conn.transport.get_extra_info("peercert"))  # type: ignore[union-attr]
        wrong = _wrong_issuer(snap, uri, conn.transport) if uri == cluster.spiffe_id else None
        if wrong is not None:
            self.sc.metrics.handshake_failed("outbound", wrong)
            self.sc._refused("upstream refused: server certificate not issued by its trust "
                             "domain's CA", upstream=cluster.name, presented=uri)  # fmt: skip
            conn.close()
            raise Failure("connect", "UF", wrong)
        if uri != cluster.spiffe_id:
            self.sc.metrics.handshake_failed("outbound", "spiffe_id_mismatch")
            self.sc._refused("upstream refused: unexpected server identity", upstream=cluster.name,
                             expected=cluster.spiffe_id, presented=uri)  # fmt: skip
            conn.close()
            raise Failure("connect", "UF", "spiffe_id_mismatch")
        return conn

    async def _h2_conn(self, key, ep, snap, cluster: Cluster | None, circuit: Circuit | None,
                       deadline) -> H2Client:  # fmt: skip
        """The multiplexed HTTP/2 connection for `key` (one per endpoint), dialled
        when there is none usable: mTLS with ALPN h2 to a peer sidecar, or h2c
        (prior knowledge) to the local app when `cluster` is None."""
        conn = self.h2pool.get(key)
        if conn is not None and conn.usable:
            return conn
        waiting = self.h2dialing.get(key)
        if waiting is not None:
            return await asyncio.shield(waiting)
        fut: asyncio.Future[H2Client] = asyncio.get_running_loop().create_future()
        self.h2dialing[key] = fut
        try:
            conn = await self._h2_dial(key, ep, snap, cluster, circuit, deadline)
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Failure) else Failure("connect", "UF"))
            fut.exception()
            raise
        finally:
            self.h2dialing.pop(key, None)
        fut.set_result(conn)
        self.h2pool[key] = conn
        return conn

    async def _h2_dial(self, key, ep, snap, cluster, circuit, deadline) -> H2Client:
        loop = asyncio.get_running_loop()
        timeout = cluster.connect_timeout_s if cluster is not None else 5.0
        if deadline is not None:
            timeout = max(0.001, min(timeout, deadline - time.monotonic()))
        kw: dict[str, Any] = {}
        if cluster is not None:
            kw = {"ssl": snap.contexts.client_h2, "server_hostname": cluster.sni or None,
                  "ssl_handshake_timeout": self.sc.handshake_timeout}  # fmt: skip
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(H2Client, ep[0], ep[1], **kw), timeout
            )
        except (TimeoutError, OSError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            if cluster is not None:
                self.sc.metrics.connect_failures[(cluster.service, reason)] += 1
            raise Failure("connect", "UF", reason) from None
        conn.key = key

        def lost(c: H2Client) -> None:
            if self.h2pool.get(c.key) is c:
                del self.h2pool[c.key]
            if c.cluster is not None:
                c.cluster.connections -= 1
                c.cluster = None

        conn.on_lost = lost
        if cluster is not None:
            sslobj = conn.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
            uri = peer_spiffe_id(conn.transport.get_extra_info("peercert"))  # type: ignore[union-attr]
            alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
            wrong = _wrong_issuer(snap, uri, conn.transport) if uri == cluster.spiffe_id else None
            if uri != cluster.spiffe_id or wrong is not None or alpn != "h2":
                reason = "spiffe_id_mismatch" if uri != cluster.spiffe_id else wrong or "no_h2_alpn"
                self.sc.metrics.handshake_failed("outbound", reason)
                self.sc._refused("upstream refused", upstream=cluster.name, reason=reason,
                                 expected=cluster.spiffe_id, presented=uri)  # fmt: skip
                conn.close()
                raise Failure("connect", "UF", reason)
            if circuit is not None:
                circuit.connections += 1
                conn.cluster = circuit
        return conn

    # ---------------------------------------------------------------- pools

    def _idle(self, key) -> ClientConn | None:
        pool = self.pools.get(key)
        while pool:
            conn = pool.pop()
            if not conn.lost:
                conn.idle_since = None
                return conn
        return None

    def _released(self, conn: ClientConn, keep: bool) -> None:
        """A ClientConn finished a response (keep: it may be reused) or closed."""
        if conn.lost or not keep:
            pool = self.pools.get(conn.key)
            if pool and conn in pool:
                pool.remove(conn)
            if conn.lost and conn.cluster is not None:
                conn.cluster.connections -= 1
                conn.cluster = None
            if not conn.lost:
                conn.close()
            return
        pool = self.pools.setdefault(conn.key, [])
        if len(pool) >= MAX_IDLE_PER_POOL:
            conn.close()
            return
        pool.append(conn)
        conn.idle_since = self.loop.time()
        if conn.idle_timer is None:
            conn.idle_timer = self.loop.call_later(POOL_IDLE_TIMEOUT, self._idle_check, conn)

    def _idle_check(self, conn: ClientConn) -> None:
        """Close a pooled connection idle for POOL_IDLE_TIMEOUT. One timer per
        connection, re-armed while it is in use: a timer per request would
        cost a timer handle made and cancelled for every request."""
        conn.idle_timer = None
        if conn.lost:
            return
        since = conn.idle_since
        if since is None:
            wait = POOL_IDLE_TIMEOUT
        else:
            wait = since + POOL_IDLE_TIMEOUT - self.loop.time()
            if wait <= 0:
                conn.close()
                return
        conn.idle_timer = self.loop.call_later(wait, self._idle_check, conn)

    def close_idle(self) -> None:
        for pool in self.pools.values():
            for conn in list(pool):
                conn.close()
        self.pools.clear()
        for h2conn in list(self.h2pool.values()):
            h2conn.close()
        self.h2pool.clear()

    # ---------------------------------------------------------------- answers

    def _forward_headers(self, conn: ServerConn, req: Request, span, proto: str) -> Headers:
        """The request's headers for the next hop, in one pass: hop-by-hop ones
        dropped (`te: trailers` kept, gRPC needs it), `x-forwarded-for`
        extended, `x-forwarded-proto` set when absent, the span's trace
        context in place of the caller's."""
        extra = span.upstream_headers()
        traced = {n for n, _ in extra} if extra else ()
        headers: Headers = []
        xff = -1
        has_proto = False
        te: bytes | None = None
        named: set[bytes] | None = None  # what a Connection header names
        for n, v in req.headers:
            if n in HOP_BY_HOP:
                if n == b"connection":
                    named = named or set()
                    named.update(t.strip().lower() for t in v.split(b","))
                elif n == b"te" and te is None:
                    te = v
                continue
            if n in traced:
                continue
            if n == b"x-forwarded-for":
                xff = len(headers)
            elif n == b"x-forwarded-proto":
                has_proto = True
            headers.append((n, v))
        if named:
            headers = [(n, v) for n, v in headers if n not in named]
            xff = next((i for i, (n, _) in enumerate(headers) if n == b"x-forwarded-for"), -1)
            has_proto = any(n == b"x-forwarded-proto" for n, _ in headers)
        if te == b"trailers":
            headers.append((b"te", b"trailers"))
        peer = conn.peer[0].encode() if conn.peer else b"unknown"
        if xff < 0:
            headers.append((b"x-forwarded-for", peer))
        else:
            headers[xff] = (b"x-forwarded-for", headers[xff][1] + b", " + peer)
        if not has_proto:
            headers.append((b"x-forwarded-proto", b"https" if proto == "https" else proto.encode()))
        if extra:
            headers.extend(extra)
        return headers

    async def _relay(self, conn: ServerConn, req: Request, att: Attempt, rec: RequestRecord,
                     remove, set_, add, deadline) -> None:  # fmt: skip
        """Send the response head, then stream the body to the caller."""
        rec.status = att.status
        framing = att.framing
        if isinstance(conn, H2Stream):
            headers = strip_hop_by_hop(att.headers)
            if remove or set_ or add:
                headers = _apply(headers, remove, set_, add)
            rec.grpc_status = _grpc_status(att.trailer_headers or att.headers, rec.grpc_status)
            if framing == "length":
                cl = _content_length(att.headers)
                if cl is not None:
                    headers.append((b"content-length", cl))
            await self._stream_out(conn, att, rec, conn.start_response(
                att.status, att.reason, headers, framing, req), deadline)  # fmt: skip
            return
        if framing == "stream":  # an HTTP/2 upstream: length unknown
            framing = "chunked" if req.version == "1.1" else "close"
        lines = [b"HTTP/1.1 %d %s" % (att.status, att.reason or REASONS.get(att.status, b""))]
        if remove or set_ or add:
            lines += map(_COLON.join, _apply(strip_hop_by_hop(att.headers), remove, set_, add))
            rec.grpc_status = _grpc_status(att.headers, rec.grpc_status)
        else:
            rec.grpc_status = _head_lines(att.headers, lines, rec.grpc_status)
        if att.trailer_headers:
            rec.grpc_status = _grpc_status(att.trailer_headers, rec.grpc_status)
        chunked = False
        if framing == "length":
            lines.append(b"content-length: " + (_content_length(att.headers) or b"0"))
        elif framing == "chunked" or (framing == "close" and req.version == "1.1"):
            lines.append(b"transfer-encoding: chunked")
            chunked = True
        elif framing == "close":
            req.keep_alive = False
        elif framing == "none" and req.method == "HEAD":
            cl = _content_length(att.headers)
            if cl is not None:
                lines.append(b"content-length: " + cl)
        if not req.keep_alive:
            lines.append(b"connection: close")
        lines.append(b"\r\n")
        out = [b"\r\n".join(lines)]
        client = att.conn
        if isinstance(client, ClientConn):  # an HTTP/2 stream has its own flow control
            conn.on_writable = client.reading
        await self._stream_out(conn, att, rec, _Sink(conn, chunked, out), deadline)

    async def _stream_out(self, conn: Any, att: Attempt, rec: RequestRecord, sink: Any,
                          deadline) -> None:  # fmt: skip
        client = att.conn
        att.commit(sink)
        if isinstance(sink, _Sink):
            sink.flush()  # the head, and what arrived with it, in one write
        try:
            if not att.finished:
                await _wait(att.done_fut, deadline)
        except TimeoutError:
            client.detach()
            rec.response_flags = "UT"
            conn.abort()  # the head is out: the caller can only see a cut
        except Failure:
            rec.response_flags = "UC"
            conn.abort()
        finally:
            conn.on_writable = None
            rec.response_bytes = att.nbytes
            if att.trailer_headers:
                for n, v in att.trailer_headers:
                    if n == b"grpc-status":
                        rec.grpc_status = v.decode("latin-1")
            if conn.paused_writing and client.transport is not None and not client.lost:
                client.transport.resume_reading()


def _hash_key(cluster: Cluster, req: Request, conn: ServerConn, query: str) -> int | None:
    """The request's hash for ring_hash / maglev, from the cluster's hash
    policies in order (a terminal policy that yields a value stops the search);
    None when none yields one (the balancer then picks at random)."""
    parts: list[bytes] = []
    for hp in cluster.hash_policies:
        value: bytes | None = None
        if hp.source_ip:
            value = conn.peer[0].encode() if conn.peer else None
        elif hp.field == "header":
            value = req.header(hp.field_value.lower().encode())
        elif hp.field == "cookie":
            value = _cookie(req, hp.field_value)
        elif hp.field == "query_parameter":
            for k, v in parse_qsl(query, keep_blank_values=True):
                if k == hp.field_value:
                    value = v.encode()
                    break
        if value is not None:
            parts.append(value)
            if hp.terminal:
                break
    return hash_bytes(b"\x00".join(parts)) if parts else None


def _cookie(req: Request, name: str) -> bytes | None:
    wanted = name.encode() + b"="
    for n, v in req.headers:
        if n == b"cookie":
            for part in v.split(b";"):
                part = part.strip()
                if part.startswith(wanted):
                    return part[len(wanted) :]
    return None


def _grpc_status(headers: Headers, status: str) -> str:
    for n, v in headers:
        if n == b"grpc-status":
            status = v.decode("latin-1")
    return status


def _head_lines(headers: Headers, out: list[bytes], grpc_status: str) -> str:
    """Append the header lines to forward (hop-by-hop ones left out, no CRLF)
    to `out`, in one pass; returns the grpc-status seen (else `grpc_status`)."""
    start = len(out)
    named = False
    join = _COLON.join
    for h in headers:
        n = h[0]
        if n in HOP_BY_HOP:
            named = named or n == b"connection"
            continue
        if n == b"grpc-status":
            grpc_status = h[1].decode("latin-1")
        out.append(join(h))
    if named:  # a Connection header may name more hop-by-hop headers
        del out[start:]
        out += map(join, strip_hop_by_hop(headers))
    return grpc_status


def _content_length(headers: Headers) -> bytes | None:
    for n, v in headers:
        if n == b"content-length":
            return v.strip()
    return None


def _send(client: Any, att: Attempt, req: Request, target: str, headers: Headers,
          cache: dict | None = None) -> None:  # fmt: skip
    """Start the request on `client`: an HTTP/2 stream, or HTTP/1.1 bytes."""
    if isinstance(client, H2Client):
        att.conn = client.open(req.method, target, headers, req.body, att)
        return
    if cache is None:
        data = _serialize(req, target, headers)
    else:
        data = cache.get("d") or cache.setdefault("d", _serialize(req, target, headers))
    client.send(data, att, req.method == "HEAD")


def _serialize(req: Request, target: str, headers: Headers) -> list[bytes]:
    # Lines joined once with CRLF (cheaper than concatenating each line).
    lines = [b"%s %s HTTP/1.1" % (req.method.encode(), target.encode("latin-1"))]
    lines += map(_COLON.join, headers)
    if req.body or req.method in ("POST", "PUT", "PATCH"):
        lines.append(b"content-length: %d" % len(req.body))
    lines.append(b"\r\n")
    return [b"\r\n".join(lines), req.body] if req.body else [b"\r\n".join(lines)]


def _conditions(policy: RetryPolicy) -> frozenset[str]:
    c = set(policy.retry_on)
    if policy.on_connect_failure:
        c.add("connect-failure")
    if policy.on_status_codes:
        c.add("retriable-status-codes")
    return frozenset(c)


def _retriable_failure(kind: str, conditions: frozenset[str]) -> bool:
    if kind == "connect":
        return bool(conditions & {"connect-failure", "5xx", "gateway-error", "reset"})
    if kind in ("reset", "protocol"):
        return bool(conditions & {"reset", "5xx"})
    if kind == "timeout":
        return bool(conditions & {"reset", "5xx", "gateway-error"})
    return False


def _retriable_status(status: int, headers: Headers, policy: RetryPolicy, conditions) -> bool:
    if not conditions:
        return False
    if status in policy.on_status_codes:
        return True
    if status >= 500 and "5xx" in conditions:
        return True
    if status in (502, 503, 504) and "gateway-error" in conditions:
        return True
    if status == 409 and "retriable-4xx" in conditions:
        return True
    grpc = [GRPC_CODES[c] for c in conditions if c in GRPC_CODES]
    if grpc:
        for n, v in headers:
            if n == b"grpc-status" and v in grpc:
                return True
    return False


def _grpc_status_match(headers: Headers, conditions) -> bool:
    codes = {GRPC_CODES[c] for c in conditions if c in GRPC_CODES}
    return bool(codes) and any(n == b"grpc-status" and v in codes for n, v in headers)


def _try_deadline(deadline: float | None, policy: RetryPolicy) -> float | None:
    if not policy.per_try_timeout_s:
        return deadline
    per_try = time.monotonic() + policy.per_try_timeout_s
    return per_try if deadline is None else min(deadline, per_try)


async def _wait(fut: asyncio.Future, deadline: float | None) -> None:
    """Wait for `fut` until `deadline` (TimeoutError), without suspending when
    it is already done. The timer sets the timeout on `fut` itself: each
    attempt's future has this one waiter, which gives the attempt up on it."""
    if fut.done():
        fut.result()
        return
    if deadline is None:
        await fut
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    timer = fut.get_loop().call_later(remaining, _expire, fut)
    try:
        await fut
    finally:
        timer.cancel()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def _backoff(policy: RetryPolicy, n: int, deadline: float | None) -> None:
    """Exponential backoff with full jitter, never past the deadline."""
    cap = min(policy.backoff_max_s, policy.backoff_base_s * (2 ** (n - 1)))
    delay = random.uniform(0, cap)
    if deadline is not None:
        delay = min(delay, max(0.0, deadline - time.monotonic()))
    if delay > 0:
        await asyncio.sleep(delay)


def _wrong_issuer(snap, uri: str | None, transport) -> str | None:
    """With peers trusted, why the peer's leaf may not carry `uri` (None: it may).

    A peer's roots are in the TLS trust store, so the handshake alone would let
    a peer's CA vouch for any identity: each trust domain's own CA must have
    issued the leaf (`agents.proxy.tls.TrustDomains`), as on the L4 path.
    """
    if snap.domains is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    try:
        der = ssl_object.getpeercert(True) if ssl_object is not None else None
    except (ValueError, OSError):
        der = None
    return snap.domains.check(uri, der)
