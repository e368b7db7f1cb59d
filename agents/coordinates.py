"""The agent's network coordinate: measure round trips, move the coordinate, report it.

Every `rtt_interval` (jittered) the agent measures the round trip to the
control plane (the time a TCP connection to its gRPC port takes to open: one
SYN / SYN-ACK) and to the few peers the control plane named last time (the
same, to each peer agent's HTTP port), moves its Vivaldi coordinate
(`meshproto.vivaldi`, Consul's algorithm) with each sample whose peer
coordinate it knows, and reports coordinate and samples with `ReportRTT`.
The answer names the peers to probe next, with their coordinates; the
control plane is the peer with no address. A peer that does not answer
within `PROBE_TIMEOUT` gives no sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import grpc

from meshproto import vivaldi
from meshproto.proto import mesh_pb2

log = logging.getLogger("meshweb.agent.coordinates")

PROBE_TIMEOUT = 2.0


async def tcp_rtt(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> float | None:
    """Seconds a TCP connection to `host:port` took to open (None: it did not)."""
    start = time.perf_counter()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return None
    rtt = time.perf_counter() - start
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return rtt


def _to_proto(c: vivaldi.Coordinate) -> mesh_pb2.Coordinate:
    return mesh_pb2.Coordinate(vec=c.vec, error=c.error, adjustment=c.adjustment, height=c.height)


def from_proto(c: mesh_pb2.Coordinate) -> vivaldi.Coordinate | None:
    coord = vivaldi.Coordinate(list(c.vec), c.error, c.adjustment, c.height)
    return coord if coord.valid() else None


class CoordinateKeeper:
    """Runs beside the other control streams; its failure ends the connection like theirs."""

    def __init__(
        self, server_host: str, server_port: int, probe_port: int, interval: float
    ) -> None:
        self.server = (server_host, server_port)
        self.probe_port = probe_port
        self.interval = interval
        self.client = vivaldi.Client()
        self.peers: list[mesh_pb2.RTTPeer] = []
        self.reports = 0

    @property
    def coordinate(self) -> vivaldi.Coordinate:
        return self.client.coord

    async def _measure(self) -> list[mesh_pb2.RTTSample]:
        samples = []
        targets = [(p, (p.address, p.port) if p.address else self.server) for p in self.peers]
        if not any(not p.address for p in self.peers):
            targets.append((None, self.server))  # the control plane, before it has a coordinate
        for peer, (host, port) in targets:
            rtt = await tcp_rtt(host, port)
            if rtt is None:
                continue
            name = peer.node if peer is not None and peer.address else ""
            samples.append(mesh_pb2.RTTSample(node=name, rtt_seconds=rtt))
            coord = from_proto(peer.coordinate) if peer is not None else None
            if coord is not None:
                try:
                    self.client.update(peer.node, coord, rtt)
                except ValueError as exc:
                    log.debug("RTT sample skipped", extra={"peer": peer.node, "error": str(exc)})
        return samples

    async def run(self, stub, rpc_timeout: float) -> None:
        await asyncio.sleep(random.uniform(0.0, min(self.interval, 1.0)))
        while True:
            samples = await self._measure()
            try:
                answer = await stub.ReportRTT(
                    mesh_pb2.RTTReport(
                        coordinate=_to_proto(self.client.coord),
                        samples=samples,
                        probe_port=self.probe_port,
                    ),
                    timeout=rpc_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("the control plane does not take coordinates")
                    await asyncio.Event().wait()  # the other streams decide the connection
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                # A report refused (a coordinate gone bad): start again, keep the connection.
                log.error("coordinate report refused", extra={"error": exc.details()})
                self.client = vivaldi.Client()
            else:
                self.peers = list(answer.peers)
                self.reports += 1
            await asyncio.sleep(self.interval * random.uniform(0.75, 1.25))
