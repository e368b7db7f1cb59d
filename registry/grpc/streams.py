"""The proxy-config stream: one per connected agent (`StreamProxyConfigs`).

The agent sends `Subscribe` (proxy IDs, or none for every proxy on its node).
The stream then follows the node (topic `node:<name>`): a watcher starts for
each `connect-proxy` and `mesh-gateway` instance on it (a gateway's config is
a `GatewayConfig`, its routing table) and stops (sending `removed=True`) when
the instance goes. A watcher compiles its proxy's config
(`compile_proxy(node, proxy_id) -> (ProxyConfig, topics)`, on the DB pool),
sends it, and waits on the change hub for the topics the compile depended
on; on a wake it compiles again and sends only if the config differs (its
`version`, the index at compile time, aside).

Cost per woken proxy, since one write can wake 1,000 of them: the compiles
the watchers ask for in one turn of the event loop go to the DB pool
together, in a few chunks (`CompileBatcher`), not one thread hop each; a
watcher whose topics did not change keeps its hub registration and only
gets a fresh future (`hub.rearm`); a config is compared with the one sent
field by field (the Upstream objects a fan-out shares compare by identity)
and dumped only when it changed, with each shared upstream's JSON encoded
once (`ProxyConfig.dumps`).

Latest-only delivery: a watcher does not compile again until its previous
send has been written (gRPC flow control holds a slow agent's writes), and
the hub waiter it registered before compiling stays resolved meanwhile, so a
slow agent gets the newest config once, never a backlog of stale ones.

Acks and nacks are recorded per proxy; a nack is logged with the agent's
error. Garbage (an ack for a proxy never sent, an empty message) is logged
and ignored; a second `Subscribe` replaces the selection. With several
`mesh server` processes, a write on another server reaches this one's hub
over Redis and wakes the watchers the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from django.conf import settings

from meshproto.gatewaycfg import GatewayConfig
from meshproto.proto import mesh_pb2
from meshproto.proxycfg import ProxyConfig
from registry import db
from registry import topics as topic
from registry.changes import hub
from registry.domain import node_sync
from registry.domain.proxycfg import compile_proxies, compile_proxy
from registry.errors import NotFound
from registry.grpc.auth import Caller

log = logging.getLogger("meshweb.grpc.stream")

# A watcher recompiles at least this often even without a wake (a missed
# Redis message costs at most this much staleness).
RECHECK_SECONDS = 60.0
RETRY_SECONDS = 2.0
# Recompile at once when the topics a compile depends on changed (the new
# ones were not watched during it), but not forever.
MAX_TOPIC_CHASES = 3

Compile = Callable[[str, str], tuple[ProxyConfig, set[str]]]


@dataclass
class ProxyState:
    """What the stream sent for one proxy and what the agent said about it."""

    sent_version: int = 0
    sent: ProxyConfig | GatewayConfig | None = (
        None  # the config last sent (what "changed" compares)
    )
    acked_version: int = 0
    nacked_version: int = 0
    last_error: str = ""
    compiles: int = 0  # compilations on this stream (a wake that changed nothing counts too)


_COMPARED = tuple(f.name for f in dataclasses.fields(ProxyConfig) if f.name != "version")


def _same(a: ProxyConfig | GatewayConfig | None, b: ProxyConfig | GatewayConfig) -> bool:
    """Equal but for the version: two compiles of unchanged data compare equal
    (field by field, no JSON needed; the Upstream objects a fan-out shares
    compare by identity first). A mesh gateway's config compares the same way."""
    if a is None or type(a) is not type(b):
        return False
    if isinstance(b, GatewayConfig):
        return dataclasses.replace(a, version=b.version) == b
    return all(getattr(a, n) == getattr(b, n) for n in _COMPARED)


def _spawn(coro, name: str) -> asyncio.Task:
    """A stream's background task; a failure is logged (the stream's end cancels it)."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_log_failure)
    return task


def _log_failure(task: asyncio.Task) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        # Typically a write to a stream the agent just closed.
        log.info("%s ended: %s: %s", task.get_name(), type(exc).__name__, exc)


async def _wait(waiter, timeout: float) -> None:
    """Until the waiter is woken or `timeout` passes (the waiter stays usable)."""
    future = waiter.future
    if future.done():
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake(_=None) -> None:
        if not done.done():
            done.set_result(None)

    timer = loop.call_later(timeout, wake)
    future.add_done_callback(wake)
    try:
        await done
    finally:
        timer.cancel()
        future.remove_done_callback(wake)


# Most compiles a batch runs on one DB thread: a wake of 1,000 proxies runs
# in chunks (spread over the pool) whose results come back as each ends.
BATCH_MAX = 32


class CompileBatcher:
    """Compiles requested in one turn of the event loop run together.

    One write wakes every proxy that depends on it at once; sending each
    compile to the DB pool on its own costs a thread hop per proxy (and the
    pool's threads then fight over the GIL). The batcher gathers the
    compiles the woken watchers ask for and runs them in a few chunks, one
    DB-pool call each.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Compile, str, str, asyncio.Future]] = []
        self._scheduled = False

    def compile(self, compile: Compile, node: str, proxy_id: str) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((compile, node, proxy_id, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        items, self._pending = self._pending, []
        items = [item for item in items if not item[3].cancelled()]
        if not items:
            return
        threads = settings.MESH_DB_THREADS
        size = max(1, min(BATCH_MAX, -(-len(items) // threads)))
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            task = asyncio.ensure_future(db.run(_compile_chunk, [i[:3] for i in chunk]))
            task.add_done_callback(lambda t, chunk=chunk: _deliver(t, chunk))


def _compile_chunk(items: list[tuple[Compile, str, str]]) -> list[tuple[bool, object]]:
    """Each item's (ok, result or exception), on one DB thread; the real
    compiler's shared reads (indexes) are made once for the chunk."""
    if all(c is compile_proxy for c, _, _ in items):
        results = compile_proxies([(node, proxy_id) for _, node, proxy_id in items])
        return [(not isinstance(r, Exception), r) for r in results]
    out: list[tuple[bool, object]] = []
    for compile, node, proxy_id in items:
        try:
            out.append((True, compile(node, proxy_id)))
        except Exception as exc:
            out.append((False, exc))
    return out


def _deliver(task: asyncio.Future, chunk: list) -> None:
    if task.cancelled():
        for *_, future in chunk:
            future.cancel()
        return
    exc = task.exception()
    for i, (*_, future) in enumerate(chunk):
        if future.done():
            continue
        if exc is not None:
            future.set_exception(exc)
            continue
        ok, value = task.result()[i]
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


batcher = CompileBatcher()


class ProxyConfigStream:
    """One agent's `StreamProxyConfigs` call."""

    def __init__(
        self, caller: Caller, context: grpc.aio.ServicerContext, compile: Compile = compile_proxy
    ) -> None:
        self.node = caller.node
        self.context = context
        self.compile = compile
        self.selection: frozenset[str] | None = None  # None: every proxy on the node
        self.proxies: dict[str, ProxyState] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._node_task: asyncio.Task | None = None
        self._reselect = asyncio.Event()
        self._write_lock = asyncio.Lock()

    async def run(self) -> None:
        """Serve until the agent closes the stream (or the server stops)."""
        try:
            while True:
                request = await self.context.read()
                if request is grpc.aio.EOF:
                    return
                self._handle(request)
        finally:
            await self._stop_all()

    # --- requests ---------------------------------------------------------------------

    def _handle(self, request: mesh_pb2.StreamRequest) -> None:
        kind = request.WhichOneof("kind")
        if kind == "subscribe":
            ids = frozenset(p for p in request.subscribe.proxy_ids if p)
            self.selection = ids or None
            if self._node_task is None:
                self._node_task = _spawn(self._follow_node(), f"proxycfg:{self.node}")
            else:
                log.info("node %s subscribed again; selection now %s", self.node, sorted(ids))
                self._reselect.set()
        elif kind == "ack":
            self._ack(request.ack)
        else:
            log.warning("node %s sent an empty stream message; ignored", self.node)

    def _ack(self, ack: mesh_pb2.Ack) -> None:
        state = self.proxies.get(ack.proxy_id)
        if state is None or not state.sent_version:
            log.warning(
                "node %s acked proxy %r (version %s) that this stream never sent; ignored",
                self.node,
                ack.proxy_id,
                ack.version,
            )
            return
        if ack.version > state.sent_version:
            log.warning(
                "node %s acked version %s of proxy %s; the newest sent is %s; ignored",
                self.node,
                ack.version,
                ack.proxy_id,
                state.sent_version,
            )
            return
        if ack.ok:
            state.acked_version = max(state.acked_version, ack.version)
        else:
            state.nacked_version = max(state.nacked_version, ack.version)
            state.last_error = ack.error[:2000]
            log.warning(
                "node %s rejected config %s of proxy %s: %s",
                self.node,
                ack.version,
                ack.proxy_id,
                state.last_error or "(no reason given)",
            )

    # --- following the node -------------------------------------------------------------

    async def _follow_node(self) -> None:
        """Keep one watcher per selected proxy on the node."""
        while True:
            waiter = hub.watch([topic.node(self.node)])
            try:
                self._reselect.clear()
                try:
                    present = await db.run(node_sync.node_proxies, self.node)
                except Exception:
                    log.exception("listing the proxies of node %s failed; retrying", self.node)
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                await self._reconcile(present)
                reselect = asyncio.create_task(self._reselect.wait())
                try:
                    await asyncio.wait(
                        [asyncio.shield(waiter.future), reselect],
                        timeout=RECHECK_SECONDS,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    reselect.cancel()
            finally:
                hub.unwatch(waiter)

    async def _reconcile(self, present: list[str]) -> None:
        wanted = set(present) if self.selection is None else set(present) & self.selection
        for proxy_id in sorted(set(self._watchers) - wanted):
            task = self._watchers.pop(proxy_id)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            state = self.proxies.pop(proxy_id, None)
            if state is not None and state.sent_version:
                await self._send(mesh_pb2.ProxyConfigUpdate(proxy_id=proxy_id, removed=True))
                log.info("proxy %s left node %s", proxy_id, self.node)
        for proxy_id in sorted(wanted - set(self._watchers)):
            self.proxies.setdefault(proxy_id, ProxyState())
            self._watchers[proxy_id] = _spawn(
                self._follow_proxy(proxy_id), f"proxycfg:{self.node}/{proxy_id}"
            )

    # --- following one proxy --------------------------------------------------------------

    async def _follow_proxy(self, proxy_id: str) -> None:
        topics: frozenset[str] = frozenset()
        waiter = hub.watch(())
        chases = 0
        try:
            while True:
                state = self.proxies.get(proxy_id)
                if state is not None:
                    state.compiles += 1
                try:
                    config, deps = await batcher.compile(self.compile, self.node, proxy_id)
                except NotFound:
                    # Deregistered between the node's listing and this compile:
                    # the node watcher is about to stop this one.
                    await _wait(waiter, RETRY_SECONDS)
                    waiter = self._rewatch(waiter, topics)
                    continue
                except Exception:
                    log.exception("compiling proxy %s of node %s failed", proxy_id, self.node)
                    await _wait(waiter, RETRY_SECONDS)
                    waiter = self._rewatch(waiter, topics)
                    continue
                deps = frozenset(deps)
                if deps != topics:
                    topics = deps
                    waiter = self._rewatch(waiter, topics)
                    chases += 1
                    if chases <= MAX_TOPIC_CHASES:
                        continue  # the new topics were not watched during that compile
                chases = 0
                await self._offer(proxy_id, config)
                await _wait(waiter, RECHECK_SECONDS)
                # Watch again before compiling, so a change during the compile wakes us.
                waiter = self._rewatch(waiter, topics)
        finally:
            hub.unwatch(waiter)

    @staticmethod
    def _rewatch(waiter, topics: frozenset[str]):
        if frozenset(waiter.topics) == topics:
            hub.rearm(waiter)  # the same topics: keep the registration, new future
            return waiter
        hub.unwatch(waiter)
        return hub.watch(topics)

    async def _offer(self, proxy_id: str, config: ProxyConfig) -> None:
        """Send the config if it differs from what the agent has."""
        state = self.proxies.get(proxy_id)
        if state is None:
            return
        if _same(state.sent, config):
            return
        await self._send(
            mesh_pb2.ProxyConfigUpdate(
                proxy_id=proxy_id, version=config.version, config_json=config.dumps()
            )
        )
        state.sent_version, state.sent = config.version, config

    async def _send(self, update: mesh_pb2.ProxyConfigUpdate) -> None:
        # One writer at a time on a stream; flow control makes a slow agent wait here.
        async with self._write_lock:
            await self.context.write(update)

    async def _stop_all(self) -> None:
        tasks = list(self._watchers.values())
        if self._node_task is not None:
            tasks.append(self._node_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watchers.clear()
