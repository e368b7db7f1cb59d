"""What the agent does with what the config stream pushes (no server: the handler itself)."""

from __future__ import annotations

import asyncio

from agents import config as agent_config
from agents.agent import Agent
from meshproto.proto import mesh_pb2
from meshproto.proxycfg import Inbound, ProxyConfig


def make_agent(tmp_path) -> Agent:
    cfg = agent_config.build(
        data_dir=str(tmp_path / "data"),
        config_dirs=None,
        join="127.0.0.1:1",
        join_token=None,
        ca_pin=None,
        node="n1",
        bind="127.0.0.1",
        http_addr="127.0.0.1:0",
        metrics_addr=None,
        dc="dc1",
    )
    agent = Agent(cfg)
    agent.sidecar_command = agent.sidecars.command = None  # nobody to spawn: validation acks
    return agent


def config(version: int, proxy_id: str = "web-sidecar-proxy") -> bytes:
    return ProxyConfig(
        version=version,
        proxy_id=proxy_id,
        service="web",
        service_id="web",
        node="n1",
        datacenter="dc1",
        trust_domain="td.mesh",
        spiffe_id="spiffe://td.mesh/ns/default/dc/dc1/svc/web",
        inbound=Inbound("127.0.0.1", 21000),
    ).dumps()


def acks(queue: asyncio.Queue) -> list[tuple[str, int, bool, str]]:
    out = []
    while not queue.empty():
        req = queue.get_nowait()
        out.append((req.ack.proxy_id, req.ack.version, req.ack.ok, req.ack.error))
    return out


def test_garbage_and_invalid_configs_are_nacked_and_the_last_good_one_stays(tmp_path):
    async def scenario():
        agent = make_agent(tmp_path)
        await agent.sidecars.ensure({"web-sidecar-proxy"})
        agent.stream_queue = asyncio.Queue()
        update = mesh_pb2.ProxyConfigUpdate
        agent._on_update(update(proxy_id="web-sidecar-proxy", version=5, config_json=config(5)))
        agent._on_update(
            update(proxy_id="web-sidecar-proxy", version=6, config_json=b"\x00garbage")
        )
        agent._on_update(
            update(proxy_id="web-sidecar-proxy", version=7, config_json=b'{"version": 7}')
        )
        agent._on_update(
            update(proxy_id="web-sidecar-proxy", version=8, config_json=config(8, "other"))
        )
        agent._on_update(update(proxy_id="stranger", version=9, config_json=config(9, "stranger")))
        got = acks(agent.stream_queue)
        assert agent.proxy_config("web-sidecar-proxy")["version"] == 5
        assert (tmp_path / "data" / "configs" / "web-sidecar-proxy.json").exists()
        await agent.sidecars.close()
        return got

    got = asyncio.run(scenario())
    assert got[0] == ("web-sidecar-proxy", 5, True, "")
    assert [(p, v, ok) for p, v, ok, _ in got[1:]] == [
        ("web-sidecar-proxy", 6, False),
        ("web-sidecar-proxy", 7, False),
        ("web-sidecar-proxy", 8, False),
        ("stranger", 9, False),
    ]
    assert "not JSON" in got[1][3]
    assert "config for 'other' sent as 'web-sidecar-proxy'" in got[3][3]
    assert "not on this agent" in got[4][3]
