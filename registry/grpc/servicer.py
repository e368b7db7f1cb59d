"""`AgentControl`: adapters from the agent protocol onto the enrollment, join-token and node-sync domain modules.

Each RPC authenticates (`registry.grpc.auth`), runs one domain function on
the DB pool inside an audit scope (actor `agent:<node>`, or the join token
for `Join`, via `grpc`) and shapes the answer. Domain errors become gRPC
status codes: 400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 403
PERMISSION_DENIED, 404 NOT_FOUND, 409 ALREADY_EXISTS, 429
RESOURCE_EXHAUSTED (the CA's signing rate limit: retry with backoff).

Every RPC but `Join` first checks, in the same database call, that the
caller's certificate is still its node's (`enrollment.authenticate`), which
also records that the node was heard from. Failed joins are throttled per
source address (`registry.grpc.throttle`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from django.conf import settings

from meshproto import vivaldi
from meshproto.proto import mesh_pb2, mesh_pb2_grpc
from registry import audit, db
from registry.domain import coordinates, enrollment, golden, join_tokens, node_sync
from registry.errors import MeshError
from registry.grpc import status
from registry.grpc.auth import AuthError, Caller, PeerTable, caller_of, peer_of
from registry.grpc.events import event_stream
from registry.grpc.streams import ProxyConfigStream
from registry.grpc.throttle import JoinThrottle

log = logging.getLogger("meshweb.grpc")

T = TypeVar("T")

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_PATH = "/meshweb.v1.AgentControl/"


class AgentControlServicer(mesh_pb2_grpc.AgentControlServicer):
    def __init__(self, peers: PeerTable, trust_domain: str) -> None:
        self.peers = peers
        self.trust_domain = trust_domain
        self.streams: set[ProxyConfigStream] = set()
        self.join_throttle = JoinThrottle(
            settings.MESH_JOIN_FAILURE_BURST, settings.MESH_JOIN_FAILURE_REFILL_SECONDS
        )
        status.track(self)  # `/api/connect/status/` reads what the streams sent and heard

    def close(self) -> None:
        """Server shutdown: nothing to do beyond grpc's own cancellation of the calls."""

    # --- helpers ----------------------------------------------------------------------

    async def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        try:
            return caller_of(context, self.peers, self.trust_domain)
        except AuthError as exc:
            await context.abort(exc.code, exc.message)
            raise  # abort raises; this is for type checkers

    async def _run(
        self,
        context: grpc.aio.ServicerContext,
        actor: audit.Actor,
        method: str,
        fn: Callable[..., T],
        *args: Any,
        write: bool = False,
        caller: Caller | None = None,
        **kwargs: Any,
    ) -> T:
        """Run `fn` in an audit scope on the DB pool, or with `write` on the batching
        writer (several agents' syncs then share one commit and one index reservation)."""

        def work() -> T:
            with audit.scope(actor, f"agent.{method}", "GRPC", _PATH + method):
                if caller is not None:
                    enrollment.authenticate(caller.node, caller.serial)
                return fn(*args, **kwargs)

        try:
            return await (db.run_write(work) if write else db.run(work))
        except MeshError as exc:
            code = _CODES.get(exc.status, grpc.StatusCode.INTERNAL)
            await context.abort(code, exc.message)
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
            raise

    @staticmethod
    def _agent(caller: Caller) -> audit.Actor:
        return audit.Actor(f"agent:{caller.node}", caller.spiffe_id, "grpc")

    # --- RPCs -------------------------------------------------------------------------

    async def Join(self, request: mesh_pb2.JoinRequest, context) -> mesh_pb2.JoinResponse:
        try:
            peer = peer_of(context, self.peers)
        except AuthError as exc:
            await context.abort(exc.code, exc.message)
            raise
        wait = self.join_throttle.retry_after(peer.host)
        if wait > 0:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many failed joins from {peer.host}; retry in {wait:.0f}s",
            )
        token_id = request.join_token.partition(".")[0][:32]
        actor = audit.Actor(f"join-token:{token_id}", request.node_name[:128], "grpc")

        def join() -> enrollment.Joined:
            try:
                return enrollment.join(
                    request.join_token,
                    request.node_name,
                    request.csr_pem,
                    address=request.address,
                    meta=dict(request.meta),
                    datacenter=request.datacenter,
                    peer_host=peer.host,
                    replace=request.replace,
                )
            except join_tokens.Unauthenticated:
                self.join_throttle.failed(peer.host)
                raise

        joined = await self._run(context, actor, "Join", join)
        return mesh_pb2.JoinResponse(
            node_id=joined.node_id,
            cert_pem=joined.cert_pem,
            roots_pem=list(joined.roots_pem),
            trust_domain=joined.trust_domain,
            datacenter=joined.datacenter,
            services=list(joined.services),
        )

    async def SignLeaf(self, request: mesh_pb2.SignRequest, context) -> mesh_pb2.SignResponse:
        caller = await self._caller(context)

        def sign() -> tuple[Any, list[str]]:
            leaf = enrollment.sign_leaf(
                caller.node, caller.datacenter, request.csr_pem, request.service
            )
            return leaf, enrollment.roots_pem()

        leaf, roots = await self._run(context, self._agent(caller), "SignLeaf", sign, caller=caller)
        return mesh_pb2.SignResponse(
            cert_pem=leaf.chain_pem,
            roots_pem=roots,
            serial=leaf.serial,
            not_after_unix=int(leaf.not_after.timestamp()),
        )

    async def SyncNode(self, request: mesh_pb2.NodeState, context) -> mesh_pb2.SyncResponse:
        caller = await self._caller(context)

        def sync() -> int:
            state = node_sync.parse_node_state(
                request.address,
                dict(request.meta),
                list(request.services_json),
                list(request.checks_json),
            )
            return node_sync.sync_node(caller.node, caller.datacenter, state)

        index = await self._run(
            context, self._agent(caller), "SyncNode", sync, write=True, caller=caller
        )
        return mesh_pb2.SyncResponse(index=index)

    async def UpdateChecks(self, request: mesh_pb2.CheckUpdates, context) -> mesh_pb2.SyncResponse:
        caller = await self._caller(context)
        updates = [(u.check_id, u.status, u.output) for u in request.updates]
        index = await self._run(
            context,
            self._agent(caller),
            "UpdateChecks",
            node_sync.update_checks,
            caller.node,
            updates,
            write=True,
            caller=caller,
        )
        return mesh_pb2.SyncResponse(index=index)

    async def StreamProxyConfigs(self, request_iterator, context) -> None:
        caller = await self._caller(context)
        await self._run(
            context, self._agent(caller), "StreamProxyConfigs", lambda: None, caller=caller
        )
        stream = ProxyConfigStream(caller, context)
        self.streams.add(stream)
        log.info("node %s opened its config stream", caller.node)
        try:
            await stream.run()
        finally:
            self.streams.discard(stream)
            log.info("node %s closed its config stream", caller.node)

    async def ReportTraffic(self, request: mesh_pb2.TrafficReport, context) -> mesh_pb2.TrafficAck:
        caller = await self._caller(context)
        entries = [
            golden.Reported(
                c.reporter,
                c.source,
                c.destination,
                c.requests,
                c.failures,
                tuple(c.latency_buckets),
            )
            for c in request.counts
        ]
        accepted = await self._run(
            context,
            self._agent(caller),
            "ReportTraffic",
            golden.record_report,
            caller.node,
            request.start_unix,
            request.end_unix,
            entries,
            write=True,
            caller=caller,
        )
        return mesh_pb2.TrafficAck(accepted=accepted)

    async def StreamEvents(self, request: mesh_pb2.EventSubscribe, context):
        caller = await self._caller(context)
        await self._run(context, self._agent(caller), "StreamEvents", lambda: None, caller=caller)
        log.info("node %s opened its event stream", caller.node)
        try:
            async for event in event_stream(caller, request.after_ltime):
                yield event
        finally:
            log.info("node %s closed its event stream", caller.node)

    async def ReportRTT(self, request: mesh_pb2.RTTReport, context) -> mesh_pb2.RTTPeers:
        caller = await self._caller(context)
        c = request.coordinate
        coord = vivaldi.Coordinate(list(c.vec), c.error, c.adjustment, c.height)
        samples = [(s.node, s.rtt_seconds) for s in request.samples]

        def report() -> list[dict]:
            # Outside an audit scope on purpose: every agent reports every few
            # seconds, and a coordinate is measurement, not configuration.
            enrollment.authenticate(caller.node, caller.serial)
            return coordinates.report(caller.node, coord, samples, request.probe_port)

        try:
            peers = await db.run_write(report)
        except MeshError as exc:
            await context.abort(_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
            raise
        return mesh_pb2.RTTPeers(
            peers=[
                mesh_pb2.RTTPeer(
                    node=p["Node"],
                    address=p["Address"],
                    port=p["Port"],
                    coordinate=mesh_pb2.Coordinate(
                        vec=p["Coord"]["Vec"],
                        error=p["Coord"]["Error"],
                        adjustment=p["Coord"]["Adjustment"],
                        height=p["Coord"]["Height"],
                    ),
                )
                for p in peers
            ]
        )
