"""Two `mesh server` processes sharing one PostgreSQL and one Redis are one control plane."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.servers import server_pair

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with server_pair(tmp_path_factory) as servers:
        yield servers


def test_a_write_on_one_server_wakes_a_blocking_query_on_the_other(pair, unique):
    first, second = pair
    name = unique("scaled")
    watcher = second.consul()
    index, entries = watcher.health.service(name)
    assert entries == []
    result: dict = {}

    def watch() -> None:
        result["answer"] = watcher.health.service(name, index=index, wait="20s")
        result["at"] = time.monotonic()

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.5)
    assert "answer" not in result
    written_at = time.monotonic()
    first.consul().agent.service.register(name, service_id=name, port=4242)
    t.join(10)
    new_index, entries = result["answer"]
    assert [e["Service"]["Port"] for e in entries] == [4242]
    assert int(new_index) > int(index)
    assert result["at"] - written_at < 1.0


def test_both_servers_hand_out_one_sequence_of_indexes(pair, unique):
    first, second = pair
    a, b = first.consul(), second.consul()
    seen = []
    for i in range(10):
        client = a if i % 2 == 0 else b
        key = unique("seq")
        assert client.kv.put(key, str(i)) is True
        _, entry = client.kv.get(key)
        seen.append(entry["ModifyIndex"])
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    # Each server sees the other's writes.
    _, services_a = a.catalog.services()
    _, services_b = b.catalog.services()
    assert services_a == services_b
