"""Checks run by the agent: probes on a timer, TTL expiry, alias checks, change reports."""

from __future__ import annotations

import asyncio
import socket

from agents.checks import CheckRunner
from agents.state import LocalState
from meshproto import probes
from meshproto.servicedefs import canonical_service


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.02)


def test_a_tcp_check_passes_while_the_port_listens_and_the_sidecar_alias_follows(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    state = LocalState(tmp_path)
    state.rebuild(
        [
            canonical_service(
                {
                    "name": "db",
                    "port": port,
                    "check": {"tcp": f"127.0.0.1:{port}", "interval": "200ms"},
                    "connect": {"sidecar_service": {}},
                }
            )
        ],
        [],
    )
    changed: list[str] = []

    async def scenario():
        runner = CheckRunner(state, changed.append)
        runner.sync()
        await until(lambda: state.checks["service:db"].status == "passing")
        await until(lambda: state.checks["service:db-sidecar-proxy:2"].status == "passing")
        assert state.checks["service:db"].output == f"TCP connect 127.0.0.1:{port}: Success"
        listener.close()
        await until(lambda: state.checks["service:db"].status == "critical")
        assert "connection refused" in state.checks["service:db"].output
        await until(lambda: state.checks["service:db-sidecar-proxy:2"].status == "critical")
        assert state.checks["service:db-sidecar-proxy:2"].output.startswith(
            "Aliased check \"Service 'db' check\" failing"
        )
        await runner.close()

    run(scenario())
    assert "service:db" in changed and "service:db-sidecar-proxy:2" in changed


def test_a_ttl_check_expires_to_critical_keeping_its_last_output(tmp_path):
    state = LocalState(tmp_path)
    state.rebuild([canonical_service({"name": "job", "check": {"ttl": "300ms"}})], [])

    async def scenario():
        runner = CheckRunner(state, lambda cid: None)
        runner.sync()
        runner.ttl_update("service:job", "passing", "alive")
        assert state.checks["service:job"].status == "passing"
        await asyncio.sleep(0.15)
        runner.ttl_update("service:job", "passing", "still alive")  # re-arms the timer
        await asyncio.sleep(0.2)
        assert state.checks["service:job"].status == "passing"
        await until(lambda: state.checks["service:job"].status == "critical", timeout=2)
        assert state.checks["service:job"].output == (
            "TTL expired (last output before timeout follows): still alive"
        )
        await runner.close()

    run(scenario())


def test_failures_before_critical_needs_that_many_failures_in_a_row(tmp_path):
    state = LocalState(tmp_path)
    state.rebuild(
        [
            canonical_service(
                {
                    "name": "flaky",
                    "check": {
                        "tcp": "127.0.0.1:1",
                        "interval": "100ms",
                        "failures_before_critical": 3,
                    },
                }
            )
        ],
        [],
    )
    state.set_result("service:flaky", "passing", "was fine")
    runner = CheckRunner(state, lambda cid: None)
    definition = state.checks["service:flaky"].definition
    runner.streaks["service:flaky"] = 1  # a success was seen
    fail = probes.Result("critical", "dial tcp 127.0.0.1:1: connect: connection refused")
    runner._apply("service:flaky", definition, fail)
    runner._apply("service:flaky", definition, fail)
    assert state.checks["service:flaky"].status == "passing"
    runner._apply("service:flaky", definition, fail)
    assert state.checks["service:flaky"].status == "critical"
    runner.pool.shutdown()


def test_a_grpc_check_follows_the_health_protocol(tmp_path):
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("billing", health_pb2.HealthCheckResponse.SERVING)
    state = LocalState(tmp_path)
    state.rebuild(
        [
            canonical_service(
                {
                    "name": "billing",
                    "check": {"grpc": f"127.0.0.1:{port}/billing", "interval": "200ms"},
                }
            )
        ],
        [],
    )

    async def scenario():
        runner = CheckRunner(state, lambda cid: None)
        runner.sync()
        await until(lambda: state.checks["service:billing"].status == "passing")
        servicer.set("billing", health_pb2.HealthCheckResponse.NOT_SERVING)
        await until(lambda: state.checks["service:billing"].status == "critical")
        assert state.checks["service:billing"].output == (
            f"gRPC 127.0.0.1:{port}/billing serving status: NOT_SERVING"
        )
        await runner.close()

    try:
        run(scenario())
    finally:
        server.stop(0)
