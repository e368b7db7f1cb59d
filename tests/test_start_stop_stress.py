"""Start and stop `mesh server` many times while agents connect over gRPC.

The test process itself keeps gRPC busy (an agent that keeps calling the
agent protocol from a background thread) and starts every server through a
real fork() (`preexec_fn`), the pattern under which a server "died at
start-up" with SIGABRT: with gRPC's fork support on, the forked child
restarted gRPC's poller and closed its epoll fd before exec. Every start must
come up, take an agent's Join, and stop cleanly and promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time

import grpc
import pytest

from meshproto.proto import mesh_pb2, mesh_pb2_grpc
from tests.grpc.conftest import Agent, new_token, roots_pem, unique_node
from tests.support.servers import die_with_parent, make_server

pytestmark = pytest.mark.slow

BUDGET_SECONDS = 60.0
MAX_STARTS = 100
MIN_STARTS = 3
FORKS_PER_START = 25


def _fork_burst(count: int) -> int:
    """Start `count` children through fork() + `preexec_fn`, as tests start servers."""
    for _ in range(count):
        child = subprocess.run(
            ["/bin/true"], preexec_fn=die_with_parent() or (lambda: None), capture_output=True
        )
        assert child.returncode == 0, f"a forked child died ({child.returncode}): {child.stderr!r}"
    return count


class BusyAgent(threading.Thread):
    """An agent that holds one channel to the server's agent protocol and keeps calling
    it (a Join with a bad token) until stopped; the channel reconnects across restarts."""

    def __init__(self, server) -> None:
        super().__init__(daemon=True)
        self.agent = Agent(server, unique_node("busy"), roots=roots_pem(server))
        self.request = mesh_pb2.JoinRequest(
            join_token="x.y", node_name=self.agent.node, csr_pem=self.agent.csr()
        )
        self.halt = threading.Event()
        self.calls = 0

    def run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        async with self.agent.channel(with_cert=False) as channel:
            stub = mesh_pb2_grpc.AgentControlStub(channel)
            while not self.halt.is_set():
                # Refused (bad token) or unreachable (between two starts): either is fine.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Join(self.request, timeout=2)
                self.calls += 1
                await asyncio.sleep(0.02)


def test_repeated_starts_and_stops_with_agents_connecting_never_abort(tmp_path):
    srv = make_server(tmp_path / "cp", acl=True)
    busy = BusyAgent(srv)  # the CA survives restarts (same database)
    busy.start()
    started = time.monotonic()
    starts, forks, stop_times = 1, 0, []
    try:
        # At least MIN_STARTS whatever the machine's load (no timing assertion),
        # then as many as fit in the budget.
        while starts < MIN_STARTS or (
            starts < MAX_STARTS and time.monotonic() - started < BUDGET_SECONDS
        ):
            # A real agent joins this incarnation of the server.
            agent = Agent(srv, unique_node("host"))
            response = asyncio.run(agent.join(new_token(srv)["token"]))
            assert response.cert_pem.startswith("-----BEGIN CERTIFICATE-----")
            # Children started the way the server was (a real fork from this
            # gRPC-running process): each must reach exec.
            forks += _fork_burst(FORKS_PER_START)
            t0 = time.monotonic()
            srv.stop()
            stop_times.append(time.monotonic() - t0)
            # uvicorn ends by re-raising the SIGTERM it handled: -15 is a clean stop.
            assert srv.proc.returncode in (0, -15), f"exit {srv.proc.returncode}:\n{srv.log()}"
            srv.start()  # raises with the log if the process died (e.g. SIGABRT, -6)
            starts += 1
    finally:
        busy.halt.set()
        busy.join(30)
        srv.close()
    log = srv.log_path.read_text(errors="replace")
    assert "epoll" not in log and "Traceback" not in log, log[-5000:]
    print(
        f"{starts} starts, {forks} forks, {busy.calls} agent calls, slowest stop {max(stop_times):.1f}s"
    )
    assert busy.calls > starts
    assert max(stop_times) < 10, stop_times


def test_a_server_with_blocking_queries_open_stops_within_seconds(tmp_path):
    srv = make_server(tmp_path / "blocking")
    try:
        with srv.client() as c:
            index = c.get("/v1/catalog/services").headers["X-Consul-Index"]

        def block() -> None:
            with contextlib.suppress(Exception), srv.client(timeout=120) as c:
                c.get("/v1/catalog/services", params={"index": index, "wait": "5m"})

        waiters = [threading.Thread(target=block, daemon=True) for _ in range(3)]
        for w in waiters:
            w.start()
        time.sleep(1.0)  # the queries are waiting
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(30)
        took = time.monotonic() - started
        assert took < 10, f"stop took {took:.1f}s:\n{srv.log()}"
    finally:
        srv.close()
