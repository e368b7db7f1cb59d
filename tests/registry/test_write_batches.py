"""Concurrent writes share a writer batch: one commit, one index reservation, one
store of audit rows and topic indexes, yet each write keeps its own index, its
own audit entries and its own failure."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

pytestmark = pytest.mark.slow


async def _register_all(server, bodies: list[dict]) -> list[httpx.Response]:
    """Send every registration at once (the writer batches what arrives together)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        return await asyncio.gather(
            *(client.put("/v1/agent/service/register", json=b) for b in bodies)
        )


def _audit(client: httpx.Client, resource_id: str) -> list[dict]:
    r = client.get("/api/audit/", params={"resource_id": resource_id})  # a prefix filter
    assert r.status_code == 200, r.text
    return [e for e in r.json()["results"] if e["resource_id"] == resource_id]


def test_concurrent_registrations_each_get_their_own_index_and_audit_entries(server, unique):
    name = unique("batched")
    bodies = [
        {"ID": f"{name}-{i}", "Name": name, "Port": 9000 + i, "Check": {"TTL": "30m"}}
        for i in range(24)
    ]
    answers = asyncio.run(_register_all(server, bodies))
    assert [r.status_code for r in answers] == [200] * 24
    with server.client() as c:
        r = c.get(f"/v1/health/service/{name}")
        assert r.status_code == 200
        rows = r.json()
        assert sorted(row["Service"]["ID"] for row in rows) == sorted(b["ID"] for b in bodies)
        indexes = [row["Service"]["ModifyIndex"] for row in rows]
        assert len(set(indexes)) == 24  # one global index per write, even in one batch
        assert int(r.headers["X-Consul-Index"]) == max(indexes)
        for row in rows:
            (check,) = [c for c in row["Checks"] if c["ServiceID"] == row["Service"]["ID"]]
            assert check["ModifyIndex"] == row["Service"]["ModifyIndex"]
        for b in bodies[:5]:
            entries = _audit(c, f"mesh-server/{b['ID']}")
            assert [e["action"] for e in entries] == ["service.register"]
            assert entries[0]["after"]["Port"] == b["Port"]
            assert entries[0]["index"] in indexes


def test_a_refused_write_in_a_batch_fails_alone_and_leaves_no_trace(server, unique):
    name = unique("batched-bad")
    good = [{"ID": f"{name}-{i}", "Name": name, "Port": 9100 + i} for i in range(10)]
    # Refused after its service was saved: its check's status is invalid.
    bad = {"ID": f"{name}-bad", "Name": name, "Port": 9200, "Check": {"TTL": "1m", "Status": "x"}}
    answers = asyncio.run(_register_all(server, good[:5] + [bad] + good[5:]))
    assert [r.status_code for r in answers] == [200] * 5 + [400] + [200] * 5
    with server.client() as c:
        ids = sorted(row["Service"]["ID"] for row in c.get(f"/v1/health/service/{name}").json())
        assert ids == sorted(b["ID"] for b in good)
        assert _audit(c, f"mesh-server/{name}-bad") == []
        assert len(_audit(c, f"mesh-server/{good[0]['ID']}")) == 1


def test_a_batch_wakes_a_blocking_query_on_a_service_it_changed(server, unique):
    name = unique("batched-watch")
    with server.client() as c:
        assert c.put("/v1/agent/service/register", json={"Name": name}).status_code == 200
        index = int(c.get(f"/v1/health/service/{name}").headers["X-Consul-Index"])

    async def watch_and_write() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            watcher = asyncio.create_task(
                client.get(f"/v1/health/service/{name}", params={"index": index, "wait": "30s"})
            )
            await asyncio.sleep(0.5)
            others = [{"Name": unique("other")} for _ in range(8)]
            await _register_all(server, [*others, {"ID": f"{name}-2", "Name": name}])
            return await watcher

    r = asyncio.run(watch_and_write())
    assert r.status_code == 200
    assert int(r.headers["X-Consul-Index"]) > index
    assert sorted(row["Service"]["ID"] for row in json.loads(r.content)) == [name, f"{name}-2"]


def test_a_batch_re_registering_one_service_leaves_its_check_in_step_with_it(server, unique):
    """Writes of one batch see each other's rows: the instance and its check are
    stored together, and the last registration wins for both."""
    name = unique("rereg")
    bodies = [
        {"ID": name, "Name": name, "Port": 9100 + i, "Tags": [f"t{i}"], "Check": {"TTL": "30m"}}
        for i in range(12)
    ]
    answers = asyncio.run(_register_all(server, bodies))
    assert [r.status_code for r in answers] == [200] * 12
    with server.client() as c:
        r = c.get(f"/v1/health/service/{name}")
        assert r.status_code == 200
        [entry] = r.json()
        service = entry["Service"]
        [check] = [ch for ch in entry["Checks"] if ch["ServiceID"] == name]
        assert check["CheckID"] == f"service:{name}"
        assert check["ServiceTags"] == service["Tags"]
        assert service["Port"] == 9100 + int(service["Tags"][0][1:])
        assert check["ModifyIndex"] == service["ModifyIndex"]
        assert check["CreateIndex"] == service["CreateIndex"]
        assert check["Status"] == "critical"
        registered = _audit(c, f"{r.json()[0]['Node']['Node']}/{name}")
        assert len([e for e in registered if e["action"] == "service.register"]) == 12
