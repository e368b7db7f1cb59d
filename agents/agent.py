"""`mesh agent`: the per-host agent, wiring its parts together.

What runs, all on one asyncio loop:

- identity: join once (pinned root, join token, node CSR), then reuse the
  node key and certificate from the data dir; renew the node certificate
  at 50-80 % of its lifetime;
- local state (`agents.state`): the config dir's services plus the local
  API's registrations, with their sidecars and checks;
- checks (`agents.checks`) run here, whatever the control plane does;
- the control loop: connect with mTLS, `SyncNode` (full state), then the
  config stream, check-result pushes (`UpdateChecks`) and anti-entropy (a
  full sync on a jittered interval and whenever the local state changed);
  any failure drops the connection and reconnects with backoff + jitter,
  starting again with a full sync (what the control plane lost, the agent
  restores);
- sidecars (`agents.sidecars`): one process and one Unix socket per
  connect-proxy, fed with the proxy's config and its leaf (`agents.leaves`);
- the local HTTP API (`agents.http_api`) and the metrics endpoint.

With the control plane away, everything local keeps going: checks run,
sidecars keep their last config and certificates, the local API answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from typing import Any

import grpc

from agents import client
from agents.checks import CheckRunner
from agents.client import Backoff, Identity, IdentityStore, JoinError
from agents.config import AgentConfig, find_sidecar_bin
from agents.coordinates import CoordinateKeeper
from agents.definitions import read_config_dirs
from agents.events import EventRunner
from agents.leaves import Leaf, LeafKeeper, make_leaf, renewal_point
from agents.metrics import agent_metrics, merge_scrapes
from agents.sidecars import Sidecars
from agents.state import LocalState, StateError, UnknownError
from agents.traffic import TrafficReporter
from meshproto import pki, scope, spiffe
from meshproto.gatewaycfg import GatewayConfig
from meshproto.proto import mesh_pb2, mesh_pb2_grpc
from meshproto.proxycfg import ProxyConfig

log = logging.getLogger("mesh.agent")

# SyncNode answers that mean "not this state", not "not now": no reconnect for them.
REJECTED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
)
EXIT_CONFIG = 2
# Bounds of a stop (seconds): the sidecars' step covers their SIGTERM grace and a SIGKILL.
SIDECAR_STOP_SECONDS = 5.0
EXIT_SECONDS = 2.0
EXIT_JOIN = 3


class Agent:
    """One per host. `await Agent(config).run()` returns the process exit code."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = agent_metrics()
        self.state = LocalState(config.data_dir)
        self.store = IdentityStore(config.data_dir)
        self.identity: Identity | None = None
        self.checks = CheckRunner(self.state, self._check_changed, record=self._record_check)
        self.checks.state_node_name = config.node
        self.sidecar_command = find_sidecar_bin(config.sidecar_bin)
        self.sidecars = Sidecars(
            config.sidecar_dir,
            self.sidecar_command,
            self._sidecar_answered,
            otlp_endpoint=config.otlp_endpoint,
            trace_sample_ratio=config.trace_sample_ratio,
            access_log_dir=config.access_log_dir,
        )
        self.traffic = TrafficReporter()
        # Mesh gateways (`kind: mesh-gateway` definitions): fed like sidecars, without keys.
        self.gateway_command = find_sidecar_bin("", "mesh-gateway")
        self.gateways = Sidecars(
            config.gateway_dir,
            self.gateway_command,
            self._sidecar_answered,
            keyless=True,
            what="mesh-gateway",
        )
        self.leaves = LeafKeeper(config.data_dir / "leaves", self._sign, self._leaf_ready)
        self.configs: dict[str, dict[str, Any]] = {}  # proxy ID -> last valid config received
        self.service_leaves: dict[str, tuple[Leaf, float]] = {}  # service -> (leaf, renew at)
        self.connected = False
        self.stub: mesh_pb2_grpc.AgentControlStub | None = None
        self.stream_queue: asyncio.Queue | None = None
        self.dirty_checks: set[str] = set()
        self.synced_version = -1
        self._stop: asyncio.Event | None = None
        self._sync_wanted: asyncio.Event | None = None
        self._checks_wanted: asyncio.Event | None = None
        self._connected_event: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._proxies_lock = asyncio.Lock()
        self._servers: list[Any] = []
        self.local_token = ""  # the local API's token (`<data-dir>/agent-token`)
        self.events = EventRunner(config.config_dirs, config.data_dir)  # `watches` of events
        self.coordinates = CoordinateKeeper(
            config.join_host, config.join_port, config.http_port, config.rtt_interval
        )

    # --- facts ------------------------------------------------------------------------

    @property
    def node(self) -> str:
        return self.config.node

    @property
    def node_id(self) -> str:
        return self.identity.node_id if self.identity else ""

    @property
    def node_meta(self) -> dict[str, str]:
        return {**dict(self.config.node_meta), "mesh-role": "agent"}

    def _out_of_scope(self, service: str) -> str:
        allowed = scope.describe(self.identity.services if self.identity else ())
        return (
            f'Permission denied: this node\'s join token does not allow service "{service}" '
            f"(it allows: {allowed})"
        )

    def scope_refusal(self, spec: dict[str, Any]) -> str:
        """Why a local registration is outside the node's scope ("" when it is not).

        The control plane enforces the scope on every sync (and would refuse the
        node's whole state); refusing here names the one registration at fault.
        """
        services = self.identity.services if self.identity else None
        if services is None:  # joined before scopes: the control plane decides
            return ""
        name = scope.refused(services, spec)
        return self._out_of_scope(name) if name else ""

    @property
    def datacenter(self) -> str:
        return self.identity.datacenter if self.identity else (self.config.datacenter or "dc1")

    # --- start and stop ---------------------------------------------------------------

    async def run(self) -> int:
        self._stop = asyncio.Event()
        self._sync_wanted = asyncio.Event()
        self._checks_wanted = asyncio.Event()
        self._connected_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

        errors = self.read_config_dirs()
        if errors:
            for e in errors:
                log.error("bad service definition file", extra={"error": e})
            print(f"mesh agent: {errors[0]}", file=sys.stderr)
            return EXIT_CONFIG
        try:
            http_sock = _listen(self.config.http_host, self.config.http_port, "-http-addr")
            metrics_sock = (
                _listen(self.config.metrics_host, self.config.metrics_port, "-metrics-addr")
                if self.config.metrics_host
                else None
            )
        except OSError as exc:
            print(f"mesh agent: {exc}", file=sys.stderr)
            return EXIT_CONFIG

        try:
            self.identity = await self._ensure_identity()
        except JoinError as exc:
            log.error("join refused", extra={"error": str(exc)})
            print(f"mesh agent: {exc}", file=sys.stderr)
            return EXIT_JOIN
        if self.identity is None:  # stopped while waiting to join
            return 0
        log.info(
            "agent identity",
            extra={
                "node": self.node,
                "datacenter": self.datacenter,
                "trust_domain": self.identity.trust_domain,
                "not_after": self.identity.not_after.isoformat(),
            },
        )
        self.checks.sync()
        await self._apply_proxies()

        from agents.http_api import TOKEN_FILE, ensure_token, make_app

        self.local_token = ensure_token(self.config.data_dir)
        await self._serve(make_app(self), http_sock)
        if metrics_sock is not None:
            await self._serve(self._metrics_app, metrics_sock)
        log.info(
            "agent running",
            extra={
                "http_addr": f"{self.config.http_host}:{http_sock.getsockname()[1]}",
                "join": self.config.join_target,
                "sidecar_command": self.sidecar_command,
                "token_file": str(self.config.data_dir / TOKEN_FILE),
                "scope": list(self.identity.services)
                if self.identity.services is not None
                else "unknown (joined before scopes)",
            },
        )
        self._tasks.append(loop.create_task(self._control_loop(), name="control"))
        self._tasks.append(loop.create_task(self._renew_node_cert(), name="node-cert"))
        if self.config.traffic_report_interval:
            self._tasks.append(loop.create_task(self._report_traffic(), name="traffic"))
        await self._stop.wait()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        """Stop everything, each step bounded: a step that overruns is abandoned, not awaited.

        A busy machine, a check stuck in a blocking call or a gRPC close that
        does not return must not keep the agent (and `mesh dev`, a systemd
        stop, a test) waiting: the whole stop takes at most the sum of the
        steps' bounds, a few seconds.
        """
        log.info("agent stopping")
        started = time.monotonic()
        for server in self._servers:
            server.should_exit = True
        for t in self._tasks:
            t.cancel()
        await _bounded("tasks", asyncio.gather(*self._tasks, return_exceptions=True), 2.0)
        await _bounded("checks", self.checks.close(), 1.0)
        await _bounded("leaves", self.leaves.close(), 1.0)
        # The sidecars get SIGTERM, their grace, then SIGKILL (agents.sidecars).
        await _bounded(
            "sidecars",
            asyncio.gather(self.sidecars.close(), self.gateways.close()),
            SIDECAR_STOP_SECONDS,
        )
        self.state.save()
        log.info("agent stopped", extra={"seconds": round(time.monotonic() - started, 2)})

    def _on_stop_signal(self) -> None:
        if self._stop.is_set():  # a second Ctrl-C: the user does not want to wait
            log.warning("stopping now (second signal)")
            _flush_logs()
            os._exit(1)
        self._stop.set()

    async def _serve(self, app, sock: socket.socket) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the agent owns its signals
                yield

        server = _Server(
            uvicorn.Config(
                app,
                log_level="warning",
                log_config=None,  # our JSON handler on the root logger
                access_log=False,
                lifespan="off",
                loop="none",
                interface="asgi3",
            )
        )
        self._servers.append(server)
        self._tasks.append(asyncio.get_running_loop().create_task(server.serve(sockets=[sock])))

    async def _metrics_app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        self._refresh_gauges()
        if scope["path"] in ("/metrics", "/"):
            body = merge_scrapes(self.metrics.render(), await self._scrape_sidecars())
            status, ctype = 200, b"text/plain; version=0.0.4"
        else:
            body, status, ctype = b"not found\n", 404, b"text/plain"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _scrape_sidecars(self) -> dict[str, str]:
        """Each running sidecar's own /metrics (loopback, short timeout; a slow one is skipped)."""

        async def scrape(port: int) -> str:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), timeout=0.5
            )
            try:
                writer.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                raw = await asyncio.wait_for(reader.read(), timeout=1.0)
            finally:
                writer.close()
            head, _, body = raw.partition(b"\r\n\r\n")
            return body.decode(errors="replace") if b" 200 " in head.split(b"\r\n", 1)[0] else ""

        procs = {**self.sidecars.procs, **self.gateways.procs}
        ports = {pid: p.metrics_port for pid, p in procs.items() if p.metrics_port}
        results = await asyncio.gather(
            *(scrape(port) for port in ports.values()), return_exceptions=True
        )
        return {
            pid: text
            for pid, text in zip(ports, results, strict=True)
            if isinstance(text, str) and text
        }

    async def _report_traffic(self) -> None:
        """Every interval: scrape the sidecars and report what changed (`agents.traffic`)."""
        interval = self.config.traffic_report_interval
        while True:
            await asyncio.sleep(interval)
            try:
                adopted = frozenset(p for p, proc in self.sidecars.procs.items() if proc.adopted)
                self.traffic.collect(await self._scrape_sidecars(), adopted=adopted)
                report = self.traffic.report()
                stub = self.stub
                if report is None:
                    self.traffic.idle()
                    continue
                if stub is None or not self.connected:
                    continue  # kept pending until the connection is back
                try:
                    ack = await stub.ReportTraffic(report, timeout=self.config.rpc_timeout)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.PERMISSION_DENIED,
                    ):
                        # Sending it again would be refused again: drop it, say why.
                        self.traffic.sent(report, 0)
                    log.warning(
                        "traffic report not stored",
                        extra={"code": exc.code().name, "error": exc.details()},
                    )
                    continue
                self.traffic.sent(report, ack.accepted)
            except asyncio.CancelledError:
                raise
            except Exception:  # reporting must never stop the agent
                log.exception("traffic report failed")

    # --- identity -------------------------------------------------------------------------

    async def _ensure_identity(self) -> Identity | None:
        """The stored identity when usable, else join (retrying while unreachable)."""
        stored = self.store.load()
        if client.usable(stored, self.node):
            return stored
        if not self.config.join_token:
            why = (
                "no node identity in the data dir"
                if stored is None
                else "the node certificate expired"
            )
            raise JoinError(f"{why}; start with -join-token and -ca-pin to join")
        backoff = Backoff(base=0.5, cap=15.0)
        while not self._stop.is_set():
            try:
                ident = await client.join(
                    host=self.config.join_host,
                    port=self.config.join_port,
                    pin=self.config.ca_pin,
                    token=self.config.join_token,
                    node=self.node,
                    address=self.config.bind,
                    datacenter=self.config.datacenter,
                    meta=self.node_meta,
                    timeout=self.config.rpc_timeout,
                    replace=self.config.replace,
                )
            except (OSError, grpc.aio.AioRpcError) as exc:
                delay = backoff.next()
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.warning(
                    "cannot reach the control plane to join; retrying",
                    extra={
                        "join": self.config.join_target,
                        "error": detail,
                        "retry_in_s": round(delay, 2),
                    },
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                continue
            self.store.save(ident)
            log.info("joined", extra={"node": ident.node, "node_id": ident.node_id})
            return ident
        return None

    async def _renew_node_cert(self) -> None:
        """Renew the node certificate at a random 50-80 % of its lifetime (SignLeaf, no service)."""
        backoff = Backoff(base=1.0, cap=60.0)
        received = 0.0  # when the current certificate came (unknown for the first one)
        while True:
            ident = self.identity
            assert ident is not None
            renew_at = renewal_point(
                ident.not_before.timestamp(), ident.not_after.timestamp(), received
            )
            while time.time() < renew_at:
                await asyncio.sleep(min(renew_at - time.time(), 60.0))
            try:
                key = pki.generate_key()
                uri = spiffe.agent_id(ident.trust_domain, ident.node, ident.datacenter).uri
                cert_pem, roots = await self._sign(pki.make_csr(key, uri), "")
                new = Identity(
                    ident.node,
                    ident.node_id,
                    ident.datacenter,
                    ident.trust_domain,
                    pki.key_pem(key),
                    cert_pem,
                    roots or ident.roots_pem,
                    ident.server_name,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                log.warning(
                    "node certificate renewal failed",
                    extra={"error": str(exc), "retry_in_s": round(delay, 1)},
                )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            received = time.time()
            self.identity = new
            self.store.save(new)
            log.info("node certificate renewed", extra={"not_after": new.not_after.isoformat()})
            # The live channel keeps its handshake; the next connection uses the new cert.

    def _update_roots(self, roots: tuple[str, ...]) -> None:
        """Follow CA roots (rotation): trusted for the next connection, handed to sidecars."""
        try:  # one spelling (PEM whitespace varies by source), so equal roots compare equal
            roots = tuple(pki.cert_pem(c) for r in roots for c in pki.load_certs(r))
        except ValueError:
            log.warning("ignoring unreadable CA roots")
            return
        if not roots or self.identity is None or roots == self.identity.roots_pem:
            return
        ident = self.identity
        active_changed = roots[0] != ident.roots_pem[0] if ident.roots_pem else True
        self.identity = Identity(
            ident.node,
            ident.node_id,
            ident.datacenter,
            ident.trust_domain,
            ident.key_pem,
            ident.cert_pem,
            tuple(roots),
            ident.server_name,
        )
        self.store.save(self.identity)
        for feed in self.sidecars.feeds.values():
            feed.set_roots(tuple(roots))
        log.info("CA roots updated", extra={"roots": len(roots), "active_changed": active_changed})
        if active_changed:
            # As Consul's agent: leaves move to the new active root soon (jittered),
            # not at their next renewal, so the old root can retire.
            self.service_leaves.clear()
            moved = self.leaves.rotate(roots[0])
            log.info("re-signing leaves for the new root", extra={"leaves": moved})

    # --- local state ----------------------------------------------------------------------

    def read_config_dirs(self) -> list[str]:
        """Re-read the config dir(s); on any bad file keep the previous state and say which."""
        declared = read_config_dirs(self.config.config_dirs)
        if declared.errors:
            return declared.errors
        try:
            self.state.rebuild(declared.services, declared.checks)
        except (StateError, UnknownError) as exc:
            return [f"config dir: {exc}"]
        return []

    def reload(self) -> list[str]:
        """SIGHUP and `PUT /v1/agent/reload`: re-read the config dir."""
        errors = self.read_config_dirs()
        if errors:
            for e in errors:
                log.error("reload failed; keeping the previous services", extra={"error": e})
            return errors
        self.events.reload()
        log.info(
            "reloaded",
            extra={"services": len(self.state.services), "checks": len(self.state.checks)},
        )
        self.local_changed()
        return []

    def _on_sighup(self) -> None:
        self.reload()

    def local_changed(self) -> None:
        """Services or checks changed here: run the right checks, sidecars, and sync now."""
        self.checks.sync()
        self.state.save()
        task = asyncio.get_running_loop().create_task(self._apply_proxies())
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)
        if self._sync_wanted is not None:
            self._sync_wanted.set()

    async def _apply_proxies(self) -> None:
        try:
            # One at a time: two quick reloads must not start a proxy's sidecar twice.
            async with self._proxies_lock:
                await self._apply_proxies_now()
        except Exception:  # logged, not lost in a fire-and-forget task
            log.exception("applying the proxies failed")

    async def _apply_proxies_now(self) -> None:
        proxies = {p.id: p for p in self.state.proxies()}
        added, removed = await self.sidecars.ensure(set(proxies))
        gw_added, gw_removed = await self.gateways.ensure({g.id for g in self.state.gateways()})
        added, removed = added | gw_added, removed | gw_removed
        for pid in removed:
            self.configs.pop(pid, None)
            with contextlib.suppress(FileNotFoundError):
                self._config_path(pid).unlink()
            for name in ("mesh_agent_proxy_config_version", "mesh_agent_proxy_cert_expiry_seconds"):
                self.metrics.remove(name, proxy_id=pid)
        for pid in added:
            feed = self._feed(pid)
            if feed is None:  # its socket could not be served (logged)
                continue
            saved = self._load_config(pid)
            if saved is not None and pid not in self.configs:
                # Static stability: a restarted agent hands out the last good config
                # even before (or without) the control plane answering.
                self.configs[pid] = saved
                feed.set_config(saved, int(saved.get("version", 0)))
            if self.identity is not None and not feed.keyless:
                feed.set_roots(self.identity.roots_pem)
            leaf = self.leaves.leaves.get(pid)
            if leaf is not None:
                feed.set_leaf(leaf.cert_pem, leaf.key_pem, leaf.not_after)
        ident = self.identity
        if ident is not None:
            wanted = {}
            for pid, p in proxies.items():
                service = (p.definition.get("Proxy") or {}).get("DestinationServiceName") or p.name
                ns = p.definition.get("Namespace") or "default"
                uri = spiffe.service_id(ident.trust_domain, service, ident.datacenter, ns).uri
                wanted[pid] = (service, uri)
            self.leaves.ensure(wanted)

    # --- checks -----------------------------------------------------------------------------

    def _check_changed(self, check_id: str) -> None:
        self.dirty_checks.add(check_id)
        if self._checks_wanted is not None:
            self._checks_wanted.set()

    def _record_check(self, check) -> None:
        self.metrics.inc(
            "mesh_agent_check_runs_total", check_id=check.check_id, status=check.status
        )

    # --- the control loop -------------------------------------------------------------------

    async def _control_loop(self) -> None:
        backoff = Backoff(base=0.5, cap=30.0)
        while True:
            assert self.identity is not None
            if self.identity.not_after.timestamp() <= time.time():
                # Renewal failed for the whole lifetime (a long outage): the control
                # plane will refuse the handshake. Say what fixes it; keep serving.
                log.error(
                    "the node certificate expired; restart the agent with -join-token "
                    "and -ca-pin to join again",
                    extra={"not_after": self.identity.not_after.isoformat()},
                )
            channel = client.mtls_channel(self.config.join_target, self.identity)
            stub = mesh_pb2_grpc.AgentControlStub(channel)
            reason = ""
            try:
                await self._sync(stub)
                backoff.reset()
                await _first_failure(
                    self._stream(stub),
                    self._anti_entropy(stub),
                    self._push_checks(stub),
                    self.events.stream(stub),
                    self.coordinates.run(stub, self.config.rpc_timeout),
                )
                reason = "connection ended"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except (OSError, ConnectionError, ValueError) as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:  # a bug must not end the control loop for good
                log.exception("control loop failed")
                reason = repr(exc)
            finally:
                was = self.connected
                self._set_connected(False, None)
                if was:
                    self.metrics.inc("mesh_agent_reconnects_total")
                with contextlib.suppress(Exception):
                    await channel.close(grace=0)
            delay = backoff.next()
            log.warning(
                "control plane unreachable; reconnecting",
                extra={
                    "join": self.config.join_target,
                    "error": reason,
                    "retry_in_s": round(delay, 2),
                },
            )
            await asyncio.sleep(delay)

    def _set_connected(self, up: bool, stub) -> None:
        self.connected, self.stub = up, stub
        self.metrics.set("mesh_agent_connected", 1 if up else 0)
        if up:
            self._connected_event.set()
            log.info("connected to the control plane", extra={"join": self.config.join_target})
        else:
            self._connected_event.clear()
            self.stream_queue = None

    def node_state(self) -> mesh_pb2.NodeState:
        return mesh_pb2.NodeState(
            address=self.config.bind,
            meta=self.node_meta,
            services_json=[json.dumps(s, sort_keys=True) for s in self.state.wire_services()],
            checks_json=[
                json.dumps(c.wire(), sort_keys=True)
                for c in sorted(self.state.checks.values(), key=lambda c: c.check_id)
            ],
        )

    async def _sync(self, stub) -> None:
        """Full sync: the catalog's view of this node becomes the local state."""
        # A check that changes while SyncNode is in flight stays dirty: only the
        # results this request carried are settled by it.
        sent_dirty = {
            cid: (c.status, c.output)
            for cid in self.dirty_checks
            if (c := self.state.checks.get(cid)) is not None
        }
        request = self.node_state()
        try:
            await stub.SyncNode(request, timeout=self.config.rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in REJECTED:
                # The control plane refused the state itself (a definition it will not
                # take): the connection is fine, so keep it (configs, checks, leaves go
                # on) and try again at the next change or interval.
                self.metrics.inc("mesh_agent_syncs_total", result="rejected")
                log.error(
                    "the control plane rejected this node's state",
                    extra={"code": exc.code().name, "error": exc.details()},
                )
                return
            self.metrics.inc("mesh_agent_syncs_total", result="error")
            raise
        self.dirty_checks -= {
            cid
            for cid, sent in sent_dirty.items()
            if (c := self.state.checks.get(cid)) is None or (c.status, c.output) == sent
        }
        if self.dirty_checks and self._checks_wanted is not None:
            self._checks_wanted.set()
        self.metrics.inc("mesh_agent_syncs_total", result="ok")
        self.metrics.set("mesh_agent_last_sync_timestamp_seconds", time.time())
        log.debug(
            "synced",
            extra={"services": len(request.services_json), "checks": len(request.checks_json)},
        )

    async def _anti_entropy(self, stub) -> None:
        while True:
            interval = self.config.sync_interval * random.uniform(0.75, 1.25)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._sync_wanted.wait(), interval)
            self._sync_wanted.clear()
            await self._sync(stub)

    async def _push_checks(self, stub) -> None:
        while True:
            await self._checks_wanted.wait()
            self._checks_wanted.clear()
            dirty, self.dirty_checks = self.dirty_checks, set()
            updates = [
                mesh_pb2.CheckStatus(check_id=c.check_id, status=c.status, output=c.output)
                for cid in sorted(dirty)
                if (c := self.state.checks.get(cid)) is not None
            ]
            if not updates:
                continue
            try:
                await stub.UpdateChecks(
                    mesh_pb2.CheckUpdates(updates=updates), timeout=self.config.rpc_timeout
                )
            except grpc.aio.AioRpcError as exc:
                self.metrics.inc("mesh_agent_check_updates_total", result="error")
                self.dirty_checks |= dirty
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    # The control plane lost a check: a full sync puts it back.
                    self._sync_wanted.set()
                    continue
                raise
            self.metrics.inc("mesh_agent_check_updates_total", result="ok")

    # --- config stream --------------------------------------------------------------------

    async def _stream(self, stub) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        self.stream_queue = queue
        # Every proxy of the node: the control plane follows the node's registrations.
        queue.put_nowait(mesh_pb2.StreamRequest(subscribe=mesh_pb2.Subscribe()))

        async def requests():
            while True:
                yield await queue.get()

        call = stub.StreamProxyConfigs(requests())
        # "Connected" means synced and the config stream open: pushes can arrive.
        await call.wait_for_connection()
        self._set_connected(True, stub)
        async for update in call:
            self._on_update(update)
        raise ConnectionError("the control plane closed the config stream")

    def _ack(self, proxy_id: str, version: int, ok: bool, error: str = "") -> None:
        if self.stream_queue is not None:
            self.stream_queue.put_nowait(
                mesh_pb2.StreamRequest(
                    ack=mesh_pb2.Ack(proxy_id=proxy_id, version=version, ok=ok, error=error[:1000])
                )
            )

    def _on_update(self, update) -> None:
        pid, version = update.proxy_id, update.version
        if update.removed:
            # The control plane no longer has this proxy: keep serving with the last
            # config (anti-entropy will register it again if it is still ours).
            log.info("proxy removed by the control plane", extra={"proxy_id": pid})
            return
        feed = self._feed(pid)
        try:
            if feed is None:
                raise ValueError(f"proxy {pid!r} is not on this agent")
            kind = GatewayConfig if feed.keyless else ProxyConfig
            cfg = kind.loads(update.config_json)
            if cfg.proxy_id != pid:
                raise ValueError(f"config for {cfg.proxy_id!r} sent as {pid!r}")
        except ValueError as exc:
            log.warning(
                "rejected proxy config",
                extra={"proxy_id": pid, "version": version, "error": str(exc)},
            )
            self.metrics.inc("mesh_agent_proxy_config_nacks_total", proxy_id=pid)
            self._ack(pid, version, False, str(exc))
            return
        data = cfg.to_json()
        self.configs[pid] = data
        self.metrics.set("mesh_agent_proxy_config_received_version", version, proxy_id=pid)
        if isinstance(cfg, ProxyConfig):
            self._update_roots(cfg.roots)
        feed.set_config(data, version)
        if not (self.gateway_command if feed.keyless else self.sidecar_command):
            # Nobody to hand it to but the socket: the agent's own validation is the ack.
            self._ack(pid, version, True)
            self._save_config(pid, data)
            self.metrics.set("mesh_agent_proxy_config_version", version, proxy_id=pid)

    def _config_path(self, proxy_id: str):
        return self.config.data_dir / "configs" / f"{proxy_id}.json"

    def _save_config(self, proxy_id: str, data: dict[str, Any]) -> None:
        path = self._config_path(proxy_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        client.write_private(path, json.dumps(data, separators=(",", ":")))

    def _load_config(self, proxy_id: str) -> dict[str, Any] | None:
        feed = self._feed(proxy_id)
        kind = GatewayConfig if feed is not None and feed.keyless else ProxyConfig
        try:
            return kind.loads(self._config_path(proxy_id).read_bytes()).to_json()
        except (OSError, ValueError):
            return None

    def _feed(self, proxy_id: str):
        """The socket feed of a sidecar or mesh gateway on this host (None if neither)."""
        return self.sidecars.feeds.get(proxy_id) or self.gateways.feeds.get(proxy_id)

    def _sidecar_answered(self, proxy_id: str, version: int, ok: bool, error: str) -> None:
        if ok:
            self.metrics.set("mesh_agent_proxy_config_version", version, proxy_id=proxy_id)
            feed = self._feed(proxy_id)
            if feed is not None and feed.good_config is not None and feed.good_version == version:
                self._save_config(proxy_id, feed.good_config)
            # It listens now: check it at once rather than an interval later, so
            # that it becomes a healthy endpoint for its callers without delay.
            for check in list(self.state.service_checks(proxy_id)):
                if check.status != "passing":
                    self.checks.kick(check.check_id)
        else:
            self.metrics.inc("mesh_agent_proxy_config_nacks_total", proxy_id=proxy_id)
        self._ack(proxy_id, version, ok, error)

    def proxy_config(self, proxy_id: str) -> dict[str, Any] | None:
        return self.configs.get(proxy_id)

    # --- leaves -------------------------------------------------------------------------

    async def _sign(self, csr_pem: str, service: str) -> tuple[str, tuple[str, ...]]:
        """SignLeaf over the current connection (waits for one)."""
        await self._connected_event.wait()
        stub = self.stub
        if stub is None:
            raise ConnectionError("not connected to the control plane")
        resp = await stub.SignLeaf(
            mesh_pb2.SignRequest(csr_pem=csr_pem, service=service), timeout=self.config.rpc_timeout
        )
        return resp.cert_pem, tuple(resp.roots_pem)

    def _leaf_ready(self, proxy_id: str, leaf: Leaf, roots: tuple[str, ...]) -> None:
        self._update_roots(roots)
        feed = self.sidecars.feeds.get(proxy_id)
        if feed is not None:
            feed.set_leaf(leaf.cert_pem, leaf.key_pem, leaf.not_after)
        self.metrics.inc("mesh_agent_leaf_renewals_total", proxy_id=proxy_id)

    async def service_leaf_json(self, service: str) -> dict[str, Any]:
        """`/v1/agent/connect/ca/leaf/:service`: a leaf whose key was made on this host."""
        ident = self.identity
        assert ident is not None
        if ident.services is not None and not scope.allows(ident.services, service):
            raise PermissionError(self._out_of_scope(service))
        cached = self.service_leaves.get(service)
        if cached is None or time.time() >= cached[1]:
            if not self.connected:
                if cached is not None and time.time() < cached[0].not_after:
                    return _leaf_json(cached[0])
                raise ConnectionError(
                    "the control plane is unreachable; no leaf cached for " + service
                )
            uri = spiffe.service_id(ident.trust_domain, service, ident.datacenter).uri
            try:
                leaf, roots = await asyncio.wait_for(
                    make_leaf(self._sign, service, uri), self.config.rpc_timeout
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    raise PermissionError(exc.details()) from None
                raise ConnectionError(f"SignLeaf failed: {exc.details()}") from None
            self._update_roots(roots)
            cached = (leaf, leaf.renew_at())
            self.service_leaves[service] = cached
        return _leaf_json(cached[0])

    def roots_json(self) -> dict[str, Any]:
        """Consul's CARootList from the roots this agent trusts (active first)."""
        ident = self.identity
        roots = []
        for i, pem in enumerate(ident.roots_pem if ident else ()):
            cert = pki.load_cert(pem)
            from cryptography.hazmat.primitives import hashes

            roots.append(
                {
                    "ID": ":".join(f"{b:02x}" for b in cert.fingerprint(hashes.SHA1())),
                    "Name": cert.subject.rfc4514_string() or "meshweb CA Root Cert",
                    "SerialNumber": cert.serial_number,
                    "SigningKeyID": pki.key_id(cert.public_key()),
                    "ExternalTrustDomain": ident.trust_domain.split(".")[0] if ident else "",
                    "NotBefore": _rfc3339(cert.not_valid_before_utc),
                    "NotAfter": _rfc3339(cert.not_valid_after_utc),
                    "RootCert": pem,
                    "IntermediateCerts": None,
                    "Active": i == 0,
                    "CreateIndex": 0,
                    "ModifyIndex": 0,
                }
            )
        return {
            "ActiveRootID": roots[0]["ID"] if roots else "",
            "TrustDomain": ident.trust_domain if ident else "",
            "Roots": roots,
        }

    # --- metrics ----------------------------------------------------------------------------

    def _refresh_gauges(self) -> None:
        m = self.metrics
        m.set("mesh_agent_services", len(self.state.services))
        now = time.time()
        for pid, leaf in self.leaves.leaves.items():
            m.set("mesh_agent_proxy_cert_expiry_seconds", leaf.not_after - now, proxy_id=pid)
        if self.identity is not None:
            m.set("mesh_agent_node_cert_expiry_seconds", self.identity.not_after.timestamp() - now)
        m.samples["mesh_agent_check_status"].clear()
        for c in self.state.checks.values():
            m.set("mesh_agent_check_status", 1, check_id=c.check_id, status=c.status)
        for pid, proc in self.sidecars.procs.items():
            m.set("mesh_agent_sidecar_restarts_total", proc.restarts, proxy_id=pid)
        for pid, feed in self.sidecars.feeds.items():
            m.set("mesh_agent_sidecar_connected", 1 if feed.connected else 0, proxy_id=pid)


def _rfc3339(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _leaf_json(leaf: Leaf) -> dict[str, Any]:
    return {
        "SerialNumber": leaf.serial,
        "CertPEM": leaf.cert_pem,
        "PrivateKeyPEM": leaf.key_pem,
        "Service": leaf.service,
        "ServiceURI": leaf.spiffe_id,
        "ValidAfter": _rfc3339(dt.datetime.fromtimestamp(leaf.not_before, dt.UTC)),
        "ValidBefore": _rfc3339(dt.datetime.fromtimestamp(leaf.not_after, dt.UTC)),
        "CreateIndex": 0,
        "ModifyIndex": 0,
    }


def _listen(host: str | None, port: int, flag: str) -> socket.socket:
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host or "127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise OSError(f"{flag}: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _first_failure(*coros) -> None:
    """Run the coroutines together; when one ends (or fails), cancel the rest and re-raise."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        exc = t.exception()
        if exc is not None:
            raise exc


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the `extra` fields."""

    _SKIP = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
        "message",
        "asctime",
    }

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in self._SKIP:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main_async(config: AgentConfig) -> int:
    setup_logging(config.log_level)
    # The default loop: grpc.aio supports it (uvloop brings nothing to a control loop).
    loop = asyncio.new_event_loop()
    try:
        code = loop.run_until_complete(Agent(config).run())
    finally:
        _close_loop(loop)
    _exit_within(code, EXIT_SECONDS)
    return code


async def _bounded(step: str, awaitable, seconds: float) -> None:
    """Await `awaitable` for at most `seconds`; past that, cancel it and move on.

    Not `asyncio.wait_for`: it waits for the cancelled work to finish, which
    is exactly what a stuck step does not do.
    """
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        log.warning("shutdown step overran; abandoned", extra={"step": step, "after_s": seconds})
    elif not task.cancelled() and task.exception() is not None:
        log.warning("shutdown step failed", extra={"step": step, "error": repr(task.exception())})


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """`asyncio.run`'s teardown, bounded: leftover tasks get a moment, executor threads none.

    `asyncio.run` would wait without limit for the default executor's threads
    (a blocking call in a check or a DNS lookup) to finish.
    """
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), 1.0))
    except Exception:  # noqa: BLE001 - teardown must end
        log.debug("loop teardown", exc_info=True)
    finally:
        executor = getattr(loop, "_default_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        loop.close()


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _exit_within(code: int, seconds: float) -> None:
    """End the process with `code` if it has not ended `seconds` from now.

    After the agent has stopped, the interpreter's exit still joins worker
    threads (a check blocked in a socket call) and runs gRPC's own exit
    handlers; neither may hold the process. A daemon timer runs through
    those and ends the process.
    """

    def force() -> None:
        log.warning("exit did not finish; ending the process", extra={"after_s": seconds})
        _flush_logs()
        os._exit(code)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()
