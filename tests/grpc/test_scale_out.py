"""Two `mesh server` processes on one PostgreSQL + Redis serve the agent protocol
as one control plane: an agent streaming from one gets pushes for writes made
on the other."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.grpc.conftest import Agent, Stream, config_of, new_token, unique_node
from tests.support.servers import server_pair

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with server_pair(tmp_path_factory) as servers:
        yield servers


def test_an_agent_streaming_from_one_server_gets_a_change_written_on_the_other(pair, unique):
    first, second = pair
    web, api = unique("web"), unique("api")
    # Join on the first server, talk to the second: one CA, one catalog.
    agent = Agent(first, unique_node())
    asyncio.run(agent.join(new_token(first)["token"]))
    agent.server = second
    service = {
        "Name": web,
        "Port": 9090,
        "Connect": {
            "SidecarService": {
                "Proxy": {"Upstreams": [{"DestinationName": api, "LocalBindPort": 9191}]}
            }
        },
    }

    async def scenario() -> float:
        await agent.sync([service])
        async with Stream(agent) as s:
            _, initial = await s.next()
            assert config_of(initial)["intentions"] == []
            started = time.monotonic()
            await asyncio.to_thread(_put_intention, first, web)
            received, update = await s.next(timeout=5)
            assert [i["Action"] for i in config_of(update)["intentions"]] == ["allow"]
            return received - started

    latency = asyncio.run(scenario())
    print(f"\ncross-server push: {1000 * latency:.1f} ms after the write on the other server")
    assert latency < 1.0


def _put_intention(server, destination: str) -> None:
    with server.client() as http:
        r = http.put(
            "/v1/connect/intentions/exact",
            params={"source": "*", "destination": destination},
            json={"Action": "allow"},
        )
    assert r.status_code == 200, r.text
