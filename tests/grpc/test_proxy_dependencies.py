"""A write recompiles only the proxies that read what it changed.

Four agents joined with join tokens, one service with a sidecar each (web
calls api, cache calls db), each on its own `StreamProxyConfigs` stream to a
real `mesh server`. The server counts compilations per proxy and shows them
in `/api/connect/status/` (`config.compiles`); the test reads them around
each write. This module has its own server: the wildcard intention it writes
would reach every proxy of a shared one.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.grpc.conftest import Stream, config_of, join_now

pytestmark = pytest.mark.slow


def run(coro):
    return asyncio.run(coro)


def _service(name: str, port: int, upstream: str = "") -> dict:
    proxy = (
        {"Upstreams": [{"DestinationName": upstream, "LocalBindPort": 9191}]} if upstream else {}
    )
    return {"Name": name, "Port": port, "Connect": {"SidecarService": {"Proxy": proxy}}}


def _compiles(server) -> dict[str, int]:
    """service -> compilations of its sidecar, as the server reports them."""
    with server.client() as http:
        r = http.get("/api/connect/status/")
    assert r.status_code == 200, r.text
    return {
        s["service"]: p["config"]["compiles"] for s in r.json()["services"] for p in s["proxies"]
    }


async def _settled(server, services: set[str], timeout: float = 30.0) -> dict[str, int]:
    """The compile counts once every proxy was compiled and nothing moved for a second."""
    deadline = time.monotonic() + timeout
    last: dict[str, int] = {}
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        now = await asyncio.to_thread(_compiles, server)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif (
            services <= set(now)
            and all(now[s] for s in services)
            and time.monotonic() - stable_since >= 1.0
        ):
            return now
        await asyncio.sleep(0.2)
    raise AssertionError(f"compile counts did not settle: {last}")


def _put(server, path: str, body: dict, **params) -> None:
    with server.client() as http:
        r = http.put(path, json=body, params=params)
    assert r.status_code == 200, r.text


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {s: after[s] - before[s] for s in before}


def test_an_intention_or_entry_write_recompiles_only_the_proxies_that_read_it(cp, unique):
    web, api, cache, db = (unique(n) for n in ("web", "api", "cache", "db"))
    specs = {web: (8080, api), api: (9091, ""), cache: (8081, db), db: (5432, "")}
    agents = {name: join_now(cp) for name in specs}
    for name, (port, upstream) in specs.items():
        run(agents[name].sync([_service(name, port, upstream)]))
    names = set(specs)

    async def scenario():
        streams = {name: Stream(agents[name]) for name in specs}
        for s in streams.values():
            await s.__aenter__()
        try:
            for s in streams.values():
                _, first = await s.next(timeout=30)
                await s.ack(first)
            c0 = await _settled(cp, names)

            # An intention to api: api's sidecar enforces it; nobody else reads it.
            await asyncio.to_thread(
                _put, cp, "/v1/connect/intentions/exact", {"Action": "allow"},
                source=web, destination=api,
            )  # fmt: skip
            _, update = await streams[api].next(timeout=15)
            assert [i["SourceName"] for i in config_of(update)["intentions"]] == [web]
            c1 = await _settled(cp, names)
            moved = _delta(c1, c0)
            assert moved[api] >= 1 and moved[web] == moved[cache] == moved[db] == 0, moved

            # api's service-defaults: api's inbound and web's upstream chain read it.
            await asyncio.to_thread(
                _put,
                cp,
                "/v1/config",
                {"Kind": "service-defaults", "Name": api, "Protocol": "http"},
            )
            for name in (api, web):
                _, update = await streams[name].next(timeout=15)
            c2 = await _settled(cp, names)
            moved = _delta(c2, c1)
            assert moved[api] >= 1 and moved[web] >= 1, moved
            assert moved[cache] == moved[db] == 0, moved

            # A wildcard-destination intention reaches every sidecar.
            await asyncio.to_thread(
                _put, cp, "/v1/connect/intentions/exact", {"Action": "deny"},
                source="*", destination="*",
            )  # fmt: skip
            for name, s in streams.items():
                _, update = await s.next(timeout=15)
                assert ("*", "deny") in {
                    (i["SourceName"], i["Action"]) for i in config_of(update)["intentions"]
                }, name
            c3 = await _settled(cp, names)
            assert all(n >= 1 for n in _delta(c3, c2).values()), _delta(c3, c2)
        finally:
            for s in streams.values():
                await s.__aexit__(None, None, None)

    run(scenario())
