"""The sidecar: its current state, its listeners, and each connection's set-up.

State is a `Snapshot` — config, TLS contexts, authoriser and upstream plans —
built whole from what the agent sent and swapped in one assignment. A
connection takes the snapshot current when it is accepted and keeps it to the
end, so a push only changes new connections; open ones are never cut.

Listeners are keyed by what they bind: on a swap, a listener whose address is
unchanged keeps its socket (and just sees the new snapshot), new ones are
bound before the swap commits (a bind failure rejects the push and leaves
everything as it was), and removed ones stop accepting while their
connections drain.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from dataclasses import dataclass
from typing import Any

from agents.proxy.authz import Authorizer, Verdict
from agents.proxy.balancing import EndpointKey, UpstreamPlan, key_of
from agents.proxy.http.engine import HTTP_PROTOCOLS, HttpProxy, HttpUpstream
from agents.proxy.http.h2wire import PREFACE as H2_PREFACE
from agents.proxy.http.h2wire import H2Server
from agents.proxy.http.routes import RouteError, RouteLimit
from agents.proxy.http.wire import ServerConn
from agents.proxy.listen import listen_socket
from agents.proxy.logs import log
from agents.proxy.metrics import Metrics
from agents.proxy.observe import NULL_OBSERVER, Observer
from agents.proxy.splice import Conn, Plain, Tls, link, start_pumping
from agents.proxy.tls import (
    Contexts,
    KeyDir,
    Material,
    MaterialError,
    TrustDomains,
    build_contexts,
    peer_spiffe_id,
)
from meshproto.proxycfg import Cluster, ProxyConfig

ListenerKey = tuple[str, str, int]  # ("inbound" | "outbound", host, port)
MAX_ATTEMPTS = 3  # endpoints tried per outbound connection before giving up
APP_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Snapshot:
    """Everything a new connection needs, at one version."""

    config: ProxyConfig
    material: Material
    contexts: Contexts
    authz: Authorizer
    plans: dict[ListenerKey, UpstreamPlan]
    # HTTP listeners: outbound routing per upstream listener, inbound route limits.
    http: dict[ListenerKey, HttpUpstream]
    route_limits: tuple[RouteLimit, ...]
    # With peered clusters trusted: which roots vouch for which trust domain.
    domains: TrustDomains | None = None

    @property
    def version(self) -> int:
        return self.config.version


@dataclass(frozen=True)
class Staged:
    """What the agent has sent so far (valid pieces), complete or not."""

    config: ProxyConfig | None = None
    cert: str | None = None
    key: str | None = None
    # The trust roots last given: a `roots` message, or a config's non-empty roots.
    roots: tuple[str, ...] = ()
    not_after: float | None = None


class Refused(ValueError):
    """A message from the agent that is not applied (answered with a nack)."""


class Sidecar:
    """One proxy's data plane (see the module docstring)."""

    def __init__(
        self,
        proxy_id: str,
        metrics: Metrics,
        keydir: KeyDir,
        *,
        handshake_timeout: float = 10.0,
        observer: Observer = NULL_OBSERVER,
        http_read_timeout: float = 10.0,
    ) -> None:
        self.proxy_id = proxy_id
        self.metrics = metrics
        self.observer = observer  # what the HTTP path reports each request to
        self.keydir = keydir
        self.handshake_timeout = handshake_timeout
        self.snapshot: Snapshot | None = None
        self.staged = Staged()
        self.listeners: dict[ListenerKey, asyncio.AbstractServer] = {}
        self.listener_kinds: dict[ListenerKey, str] = {}  # "tcp" | "http"
        self.http = HttpProxy(self, observer)
        self.http.read_timeout = http_read_timeout
        self.http_conns: set[Any] = set()  # ServerConn | H2Server
        self.conns: set[Conn] = set()
        self.open_counts: dict[EndpointKey, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()
        self._refusal_budget = _LogBudget(per_second=20)

    # ------------------------------------------------------------------ messages

    async def handle_line(self, line: bytes) -> dict[str, Any]:
        """Apply one JSON line from the agent; the reply to send back (ack or nack)."""
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._nack(None, f"message is not JSON: {exc}")
        if not isinstance(msg, dict):
            return self._nack(None, "message must be a JSON object")
        version = _version_of(msg)
        try:
            async with self._lock:
                await self._apply(msg)
        except (Refused, MaterialError, RouteError, ValueError, OSError) as exc:
            return self._nack(version, str(exc))
        self.metrics.config_applied += 1
        current = self.snapshot.version if self.snapshot else version
        return {"ack": current}

    def _nack(self, version: int | None, error: str) -> dict[str, Any]:
        self.metrics.config_rejected += 1
        log.warning(
            "rejected a message from the agent; the last good state stays",
            version=version,
            error=error,
            serving=self.snapshot.version if self.snapshot else None,
        )
        return {"nack": version, "error": error}

    async def _apply(self, msg: dict[str, Any]) -> None:
        staged = self._merge(msg)
        old = self.snapshot
        if staged.config is None or staged.cert is None or staged.key is None:
            self.staged = staged  # incomplete: keep the pieces, serve nothing new yet
            log.info("waiting for the rest of the proxy's state", has=sorted(msg))
            return
        config = staged.config
        peer_roots = tuple(r for t in config.peer_trust for r in t.roots)
        material = Material(staged.cert, staged.key, staged.roots + peer_roots)
        if old is not None and old.material == material:
            contexts = old.contexts
        else:
            contexts = build_contexts(material, self.keydir)
        if contexts.leaf_uri is not None and contexts.leaf_uri != config.spiffe_id:
            raise Refused(
                f"the leaf certificate is for {contexts.leaf_uri}, the config for {config.spiffe_id}"
            )
        if old is not None and old.config == config:
            authz, plans, http, limits = old.authz, old.plans, old.http, old.route_limits
        else:
            authz = Authorizer(config)  # a fresh decision cache for every new config
            plans = self._plans(config)
            # Routes and limits compile here: a regex that does not compile
            # refuses the whole config (RouteError) before anything is swapped.
            http = {
                key: self.http.plan(plan.upstream)
                for key, plan in plans.items()
                if plan.upstream.protocol in HTTP_PROTOCOLS
            }
            limits = tuple(RouteLimit(r) for r in config.inbound.route_rate_limits)
        domains = None
        if config.peer_trust:
            if old is not None and old.domains is not None and old.material == material:
                domains = old.domains
            else:
                domains = TrustDomains(
                    {
                        config.trust_domain: staged.roots,
                        **{t.trust_domain: t.roots for t in config.peer_trust},
                    }
                )
        snapshot = Snapshot(config, material, contexts, authz, plans, http, limits, domains)
        await self._install(snapshot)
        self.staged = staged
        self.metrics.config_version = config.version
        not_after = staged.not_after if staged.not_after is not None else contexts.not_after
        self.metrics.leaf_not_after = not_after
        if old is None or old.config != config or old.material != material:
            log.info(
                "applied",
                version=config.version,
                upstreams=len(config.upstreams),
                intentions=len(config.intentions),
                new_certificate=old is None or old.material != material,
            )

    def _merge(self, msg: dict[str, Any]) -> Staged:
        known = {"config", "cert", "key", "roots", "cert_not_after"}
        if not known & set(msg):
            raise Refused(f"message carries none of {', '.join(sorted(known))}")
        staged = self.staged
        changes: dict[str, Any] = {}
        if "config" in msg:
            config = ProxyConfig.from_json(msg["config"])
            if config.proxy_id != self.proxy_id:
                raise Refused(f"config is for proxy {config.proxy_id!r}, not {self.proxy_id!r}")
            changes["config"] = config
        for name in ("cert", "key"):
            if name in msg:
                if not isinstance(msg[name], str) or "-----BEGIN" not in msg[name]:
                    raise Refused(f"{name} must be a PEM string")
                changes[name] = msg[name]
        if "roots" in msg:
            roots = msg["roots"]
            if (
                not isinstance(roots, list)
                or not roots
                or not all(isinstance(r, str) and "-----BEGIN" in r for r in roots)
            ):
                raise Refused("roots must be a non-empty list of PEM strings")
            changes["roots"] = tuple(roots)
        elif "config" in msg and changes["config"].roots:
            changes["roots"] = changes["config"].roots  # the last roots given win
        if "cert_not_after" in msg:
            value = msg["cert_not_after"]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Refused("cert_not_after must be unix seconds")
            changes["not_after"] = float(value)
        elif "cert" in msg:
            changes["not_after"] = None  # a new leaf: its own notAfter, unless given
        return Staged(**{**staged.__dict__, **changes})

    def _plans(self, config: ProxyConfig) -> dict[ListenerKey, UpstreamPlan]:
        plans: dict[ListenerKey, UpstreamPlan] = {}
        inbound_key = ("inbound", config.inbound.bind_address, config.inbound.port)
        for up in config.upstreams:
            key = ("outbound", up.local_bind_address, up.local_bind_port)
            if key in plans:
                raise Refused(
                    f"upstreams {plans[key].upstream.destination!r} and {up.destination!r} "
                    f"both bind {up.local_bind_address}:{up.local_bind_port}"
                )
            if (up.local_bind_address, up.local_bind_port) == inbound_key[1:]:
                raise Refused(f"upstream {up.destination!r} binds the inbound listener's address")
            plans[key] = UpstreamPlan(up, self.open_counts)
        return plans

    # ------------------------------------------------------------------ listeners

    async def _install(self, snapshot: Snapshot) -> None:
        config = snapshot.config
        inbound_key = ("inbound", config.inbound.bind_address, config.inbound.port)
        kinds: dict[ListenerKey, str] = {
            inbound_key: "http" if config.inbound.protocol in HTTP_PROTOCOLS else "tcp"
        }
        for key in snapshot.plans:
            kinds[key] = "http" if key in snapshot.http else "tcp"
        wanted: set[ListenerKey] = set(kinds)
        # A listener whose protocol changes is rebound: the old one goes first.
        for key in [k for k in wanted & set(self.listeners) if self.listener_kinds[k] != kinds[k]]:
            self.listeners.pop(key).close()
            log.info("listener rebound for a protocol change", direction=key[0],
                     address=f"{key[1]}:{key[2]}", protocol=kinds[key])  # fmt: skip
        fresh: dict[ListenerKey, asyncio.AbstractServer] = {}
        try:
            for key in wanted - set(self.listeners):
                fresh[key] = await self._bind(key, kinds[key], snapshot)
        except OSError as exc:
            for server in fresh.values():
                server.close()
            raise Refused(f"cannot listen on {key[1]}:{key[2]} ({key[0]}): {exc}") from None
        # Commit: one assignment makes every listener see the new snapshot.
        self.snapshot = snapshot
        self.listeners.update(fresh)
        self.listener_kinds.update(kinds)
        for key in set(self.listeners) - wanted:
            self.listeners.pop(key).close()  # stops accepting; its connections drain
            self.listener_kinds.pop(key, None)
            log.info("listener removed", direction=key[0], address=f"{key[1]}:{key[2]}")
        for key in fresh:
            log.info("listening", direction=key[0], address=f"{key[1]}:{key[2]}")

    async def _bind(self, key: ListenerKey, kind: str, snap: Snapshot) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        direction, host, port = key
        if kind == "http":
            return await self._bind_http(key, snap)
        if direction == "inbound":
            factory = self._accept_inbound
        else:

            def factory() -> Plain:
                return self._accept_outbound(key)

        return await loop.create_server(factory, sock=listen_socket(host, port))

    async def _bind_http(self, key: ListenerKey, snap: Snapshot) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        direction, host, port = key

        def factory() -> _Sniff:
            return _Sniff(self, direction, key)

        if direction == "outbound":
            return await loop.create_server(factory, sock=listen_socket(host, port))
        ctx = snap.contexts.server
        # Certificates rotate under a listening socket: each handshake switches
        # to the current snapshot's context (SNI callback, before the
        # certificate is chosen and before the client's chain is verified).
        ctx.sni_callback = self._current_server_context
        return await loop.create_server(
            factory,
            sock=listen_socket(host, port),
            ssl=ctx,
            ssl_handshake_timeout=self.handshake_timeout,
        )

    def _current_server_context(self, sslobj: Any, name: str | None, ctx: Any) -> None:
        snap = self.snapshot
        if snap is not None and ctx is not snap.contexts.server:
            snap.contexts.server.sni_callback = self._current_server_context
            sslobj.context = snap.contexts.server

    def _idle_timeout(self) -> float:
        snap = self.snapshot
        return snap.config.inbound.idle_timeout_s if snap is not None else 300.0

    def _opened(self, conn: Conn) -> None:
        self.conns.add(conn)
        self.metrics.opened[conn.direction] += 1
        self.metrics.active[conn.direction] += 1

    def conn_done(self, conn: Conn) -> None:
        """Called by a `Conn` once both its halves are gone."""
        self.conns.discard(conn)
        m = self.metrics
        m.active[conn.direction] -= 1
        m.rx[conn.direction] += conn.rx
        m.tx[conn.direction] += conn.tx
        if conn.endpoint is not None:
            self._release_endpoint(conn.endpoint)
        if conn.istio is not None:
            self.observer.tcp_closed(conn.istio, conn.rx, conn.tx)
        conn.tag = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refused(self, msg: str, **fields: Any) -> None:
        """Log a refusal, at most ~20 lines a second (a port scan must not flood stderr)."""
        suppressed = self._refusal_budget.take()
        if suppressed is not None:
            if suppressed:
                fields["suppressed_since_last"] = suppressed
            log.warning(msg, **fields)

    # ------------------------------------------------------------------ inbound

    def _accept_inbound(self) -> Tls:
        snap = self.snapshot
        conn = Conn(self, "inbound")
        conn.tag = snap
        self._opened(conn)
        return Tls(
            conn,
            snap.contexts.server,  # type: ignore[union-attr]
            server_side=True,
            hostname=None,
            timeout=self.handshake_timeout,
            on_secure=self._inbound_secure,
            on_fail=self._inbound_failed,
        )

    def _inbound_failed(self, tls: Tls, kind: str, reason: str) -> None:
        self.metrics.handshake_failed("inbound", reason)
        self._refused(
            "inbound connection refused: TLS handshake failed",
            reason=reason,
            peer=_peer(tls),
        )

    def _inbound_secure(self, tls: Tls) -> None:
        conn = tls.conn
        snap: Snapshot = conn.tag
        uri = peer_spiffe_id(tls.peer_certificate())
        verdict = snap.authz.check(uri)
        wrong = snap.domains.check(uri, _leaf_der(tls)) if snap.domains else None
        if wrong is not None and verdict.identity_ok:
            verdict = Verdict(False, verdict.source, f"{uri}: {wrong}", False, wrong)
        if not verdict.allowed:
            if verdict.identity_ok:
                self.metrics.authz_denials[verdict.source] += 1
                msg = "inbound connection denied by intentions"
            else:
                self.metrics.handshake_failed("inbound", verdict.code)
                msg = "inbound connection refused: bad client identity"
            self._refused(
                msg,
                source=uri,
                destination=snap.config.service,
                reason=verdict.reason,
                peer=_peer(tls),
                version=snap.version,
            )
            tls.close()
            return
        self.metrics.authz_allowed += 1
        conn.istio = self.observer.tcp_opened("destination", verdict.source, snap.config.service)
        tls.transport.pause_reading()  # type: ignore[union-attr]
        self._spawn(self._connect_app(conn, snap))

    async def _connect_app(self, conn: Conn, snap: Snapshot) -> None:
        inbound = snap.config.inbound
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: Plain(conn), inbound.local_app_address, inbound.local_app_port
                ),
                APP_CONNECT_TIMEOUT,
            )
        except (TimeoutError, OSError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else _errno_name(exc)
            self.metrics.connect_failures[("local_app", reason)] += 1
            self._refused(
                "cannot reach the local app",
                address=f"{inbound.local_app_address}:{inbound.local_app_port}",
                reason=reason,
            )
            if conn.tls is not None:
                conn.tls.close()
            return
        tls = conn.tls
        if tls is None or tls.lost:
            if conn.plain is not None:
                conn.plain.close()
            return
        start_pumping(tls)

    # ------------------------------------------------------------------ outbound

    def _accept_outbound(self, key: ListenerKey) -> Plain:
        snap = self.snapshot
        conn = Conn(self, "outbound")
        # A removed listener may still accept what was in its backlog: it then
        # uses the plan it was bound for, if any, via the old snapshot.
        plan = snap.plans.get(key) if snap is not None else None  # type: ignore[union-attr]
        conn.tag = (snap, plan)
        self._opened(conn)
        if plan is not None:
            conn.istio = self.observer.tcp_opened(
                "source",
                snap.config.service,  # type: ignore[union-attr]
                plan.upstream.destination,
            )
        return Plain(conn, on_made=self._outbound_accepted)

    def _outbound_accepted(self, plain: Plain) -> None:
        plain.transport.pause_reading()  # type: ignore[union-attr]
        self._spawn(self._connect_upstream(plain.conn))

    async def _connect_upstream(self, conn: Conn) -> None:
        if conn.done:  # the caller left before this task ran
            return
        snap, plan = conn.tag
        plain = conn.plain
        if plan is None:
            plain.close()  # type: ignore[union-attr]
            return
        name = plan.upstream.destination
        chosen = plan.choose_cluster()
        if chosen is None:
            self.metrics.connect_failures[(name, "no_endpoints")] += 1
            self._refused("no healthy endpoint for upstream", upstream=name)
            plain.close()  # type: ignore[union-attr]
            return
        tried: set[EndpointKey] = set()
        # A cluster none of whose endpoints answers hands over to its failover
        # clusters at once (a stopped instance, before health checks say so).
        for cluster in (chosen, *plan.fallbacks(chosen)):
            for _ in range(MAX_ATTEMPTS):
                if cluster.gateway is not None:
                    target: EndpointKey = (cluster.gateway.address, cluster.gateway.port)
                else:
                    endpoint = plan.balancer(cluster).pick(tried)
                    if endpoint is None:
                        break
                    target = key_of(endpoint)
                tried.add(target)
                tls = await self._attempt(conn, snap, name, cluster, target)
                if plain.lost:  # type: ignore[union-attr]
                    if tls is not None:
                        self._release_endpoint(target)
                        tls.close()
                    return
                if tls is not None:
                    # Adopt the verified TLS half; from here the Conn owns it.
                    conn.endpoint = target
                    tls.conn = conn
                    conn.tls = tls
                    link(plain, tls)  # type: ignore[arg-type]
                    plain.transport.resume_reading()  # type: ignore[union-attr]
                    start_pumping(tls)
                    return
                if cluster.gateway is not None:
                    break
        self._refused("upstream unreachable", upstream=name, tried=len(tried))
        plain.close()  # type: ignore[union-attr]

    async def _attempt(
        self, conn: Conn, snap: Snapshot, name: str, cluster: Cluster, target: EndpointKey
    ) -> Tls | None:
        """Connect, handshake and check the peer's SPIFFE ID; the TLS half, or None."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str | None] = loop.create_future()
        probe = Conn(_NO_OWNER, "outbound")  # owns the TLS half until it is verified

        def secure(_tls: Tls) -> None:
            if not done.done():
                done.set_result(None)

        def failed(_tls: Tls, kind: str, reason: str) -> None:
            if not done.done():
                done.set_result(reason)

        def factory() -> Tls:
            return Tls(
                probe,
                snap.contexts.client,
                server_side=False,
                hostname=cluster.sni or None,
                timeout=self.handshake_timeout,
                on_secure=secure,
                on_fail=failed,
            )

        self.open_counts[target] = self.open_counts.get(target, 0) + 1
        try:
            _, tls = await asyncio.wait_for(
                loop.create_connection(factory, target[0], target[1]), cluster.connect_timeout_s
            )
        except (TimeoutError, OSError) as exc:
            self._release_endpoint(target)
            reason = "timeout" if isinstance(exc, TimeoutError) else _errno_name(exc)
            self.metrics.connect_failures[(name, reason)] += 1
            self._refused(
                "upstream connect failed", upstream=name, endpoint=_addr(target), reason=reason
            )
            return None
        reason = await done
        if reason is None:
            uri = peer_spiffe_id(tls.peer_certificate())
            wrong = snap.domains.check(uri, _leaf_der(tls)) if snap.domains else None
            if uri == cluster.spiffe_id and wrong is not None:
                reason = wrong
                self._refused(
                    "upstream refused: server certificate not issued by its trust domain's CA",
                    upstream=name,
                    endpoint=_addr(target),
                    presented=uri,
                )
                tls.close()
            elif uri != cluster.spiffe_id:
                reason = "spiffe_id_mismatch"
                self._refused(
                    "upstream refused: unexpected server identity",
                    upstream=name,
                    endpoint=_addr(target),
                    expected=cluster.spiffe_id,
                    presented=uri,
                )
                tls.close()
        else:
            self._refused(
                "upstream TLS handshake failed",
                upstream=name,
                endpoint=_addr(target),
                reason=reason,
            )
        if reason is not None:
            self._release_endpoint(target)
            self.metrics.handshake_failed("outbound", reason)
            return None
        return tls

    def _release_endpoint(self, target: EndpointKey) -> None:
        n = self.open_counts.get(target, 0) - 1
        if n > 0:
            self.open_counts[target] = n
        else:
            self.open_counts.pop(target, None)

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let open connections finish for up to `grace` seconds, then cut."""
        for server in self.listeners.values():
            server.close()
        self.listeners.clear()
        deadline = time.monotonic() + grace
        if self.conns or self.http_conns:
            log.info("draining", connections=len(self.conns) + len(self.http_conns), grace_s=grace)
        for hconn in list(self.http_conns):
            hconn.drain()
        while (self.conns or self.http_conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.conns)
        for conn in left:
            conn.abort()
        for hconn in list(self.http_conns):
            hconn.abort()
        self.http.close_idle()
        for task in list(self._tasks):
            task.cancel()
        if left:
            log.warning("grace period over; connections cut", connections=len(left))
            await asyncio.sleep(0)  # let the aborts run their connection_lost


class _Sniff(asyncio.Protocol):
    """A new HTTP listener connection, before its HTTP version is known: by
    ALPN (inbound, once the TLS handshake is done) or by the HTTP/2 preface
    (outbound: an app speaking h2c with prior knowledge, as gRPC clients do).
    It then hands the transport to the real protocol."""

    def __init__(self, sidecar: Sidecar, direction: str, key: ListenerKey) -> None:
        self.sidecar = sidecar
        self.direction = direction
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.real: asyncio.Protocol | None = None
        self.early = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.direction == "inbound":
            sslobj = transport.get_extra_info("ssl_object")
            alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
            self._switch(alpn == "h2")

    def data_received(self, data: bytes) -> None:
        if self.real is not None:  # pragma: no cover - the transport moved on
            self.real.data_received(data)
            return
        data = self.early + data
        if len(data) < 4 and H2_PREFACE.startswith(data):
            self.early = data  # too short to tell yet
            return
        self._switch(data.startswith(b"PRI "))
        if self.real is not None and not getattr(self.real, "lost", False):
            self.real.data_received(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.real is not None:
            self.real.connection_lost(exc)

    def _switch(self, use_h2: bool) -> None:
        sc = self.sidecar
        real: asyncio.Protocol
        if use_h2:
            real = _H2ServerConn(sc, self.direction, self.key)
        else:
            real = _HttpServerConn(sc, self.direction, read_timeout=sc.http.read_timeout,
                                   idle_timeout=sc._idle_timeout())  # fmt: skip
            real.tag = self.key
        self.real = real
        self.transport.set_protocol(real)  # type: ignore[union-attr]
        real.connection_made(self.transport)  # type: ignore[arg-type]


class _H2ServerConn(H2Server):
    """An HTTP listener's HTTP/2 connection, counted like the others."""

    def __init__(self, sidecar: Sidecar, direction: str, key: ListenerKey) -> None:
        super().__init__(sidecar.http, direction, key)
        self.sidecar = sidecar

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sc = self.sidecar
        sc.http_conns.add(self)
        sc.metrics.opened[self.direction] += 1
        sc.metrics.active[self.direction] += 1
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        sc = self.sidecar
        if self in sc.http_conns:
            sc.http_conns.discard(self)
            sc.metrics.active[self.direction] -= 1
        super().connection_lost(exc)


class _HttpServerConn(ServerConn):
    """An HTTP listener's connection, counted like the L4 ones."""

    def __init__(self, sidecar: Sidecar, direction: str, **kw: Any) -> None:
        super().__init__(sidecar.http, direction, **kw)
        self.sidecar = sidecar

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sc = self.sidecar
        sc.http_conns.add(self)
        sc.metrics.opened[self.direction] += 1
        sc.metrics.active[self.direction] += 1
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        sc = self.sidecar
        if self in sc.http_conns:
            sc.http_conns.discard(self)
            sc.metrics.active[self.direction] -= 1
        super().connection_lost(exc)


class _NoOwner:
    def conn_done(self, conn: Conn) -> None:
        pass


_NO_OWNER = _NoOwner()


class _LogBudget:
    """A token bucket for log lines: `take()` → suppressed count so far, or None (drop)."""

    def __init__(self, per_second: float) -> None:
        self.rate = per_second
        self.tokens = per_second
        self.stamp = time.monotonic()
        self.suppressed = 0

    def take(self) -> int | None:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            self.suppressed += 1
            return None
        self.tokens -= 1
        n, self.suppressed = self.suppressed, 0
        return n


def _version_of(msg: dict[str, Any]) -> int | None:
    config = msg.get("config")
    if isinstance(config, dict):
        v = config.get("version")
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _peer(tls: Tls) -> str | None:
    if tls.transport is None:
        return None
    peer = tls.transport.get_extra_info("peername")
    return _addr(peer) if peer else None


def _addr(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}"


def _errno_name(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__).lower()


def _leaf_der(tls: Tls) -> bytes | None:
    """The peer's leaf certificate, DER (None when it cannot be read)."""
    try:
        return tls.sslobj.getpeercert(True)
    except (ValueError, AttributeError, OSError):
        return None
