"""A real `mesh server` keeps writing whatever its clients and its database do:
clients that hang up mid-write, clients that time out, a database that drops
every connection or is locked for a while. Afterwards writes succeed and the
metrics and health endpoints tell what happened."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.agents.conftest import eventually
from tests.support.servers import _admin_conn, make_server, postgres_url

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = make_server(tmp_path_factory.mktemp("writer"))
    yield server
    server.close()


def _body(name: str) -> bytes:
    return json.dumps({"Name": name, "ID": name, "Port": 8080, "Tags": ["hangup"]}).encode()


def _hang_up_after_sending(port: int, name: str) -> None:
    body = _body(name)
    request = (
        f"PUT /v1/agent/service/register HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)  # and close at once, without reading the answer


def _services(srv) -> dict:
    with srv.client() as c:
        r = c.get("/v1/agent/services")
        assert r.status_code == 200, r.text
        return r.json()


def _register(srv, name: str, timeout: float = 30) -> httpx.Response:
    with srv.client(timeout=timeout) as c:
        return c.put("/v1/agent/service/register", content=_body(name))


def _metrics(srv) -> dict[str, float]:
    with srv.client() as c:
        data = c.get("/v1/agent/metrics").json()
    out = {g["Name"]: g["Value"] for g in data["Gauges"]}
    out.update({c["Name"]: c["Count"] for c in data["Counters"]})
    return out


def _healthy(srv) -> bool:
    with srv.client(timeout=10) as c:
        r = c.get("/v1/agent/health")
    return r.status_code == 200 and r.json()["Status"] == "passing"


def test_fifty_clients_hanging_up_mid_registration_are_all_committed_and_writes_go_on(srv, unique):
    names = [unique("hangup") for _ in range(50)]
    with ThreadPoolExecutor(50) as pool:
        list(pool.map(lambda n: _hang_up_after_sending(srv.http_port, n), names))
    # A normal registration afterwards answers.
    after = unique("after")
    assert _register(srv, after, timeout=15).status_code == 200
    # A write whose client left is carried out all the same (a complete request
    # is a request): every one of the fifty is there.
    eventually(lambda: set(names) <= set(_services(srv)), timeout=30)
    assert after in _services(srv)
    m = _metrics(srv)
    assert m["mesh.writer.alive"] == 1 and m["mesh.writer.restarts"] == 0
    assert m["mesh.writer.writes_committed"] >= 51
    assert _healthy(srv)


def test_clients_that_time_out_mid_write_leave_the_writer_working(srv, unique):
    names = [unique("timeout") for _ in range(40)]

    def impatient(name: str) -> int | None:
        try:
            return _register(srv, name, timeout=0.01).status_code
        except httpx.TimeoutException:
            return None

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(impatient, names))
    # Whatever answered, answered 200; every acknowledged write is stored.
    assert set(codes) <= {200, None}
    acknowledged = {n for n, c in zip(names, codes, strict=True) if c == 200}
    later = [unique("later") for _ in range(5)]
    for name in later:
        assert _register(srv, name, timeout=15).status_code == 200
    stored = set(_services(srv))
    assert acknowledged | set(later) <= stored
    assert _metrics(srv)["mesh.writer.restarts"] == 0
    assert _healthy(srv)


def _register_many(srv, names: list[str]) -> dict[str, int]:
    codes: dict[str, int] = {}

    def one(name: str) -> None:
        try:
            codes[name] = _register(srv, name, timeout=60).status_code
        except httpx.HTTPError:
            codes[name] = 0

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, names))
    return codes


def test_a_database_that_drops_every_connection_mid_batch_is_followed_by_writes_that_succeed(
    tmp_path, unique
):
    if not postgres_url():
        pytest.skip("PostgreSQL only: the SQLite pass locks the file instead (next test)")
    srv = make_server(tmp_path / "pg")
    try:
        dbname = srv.database_url.rsplit("/", 1)[-1]
        names = [unique("restart") for _ in range(120)]
        stop = threading.Event()
        terminated: list[int] = []

        def terminate_backends() -> None:
            # A database restart as the server sees it: every connection it
            # holds to its own database is cut (the shared cluster stays up).
            with _admin_conn(postgres_url()) as conn:
                while not stop.is_set() and len(terminated) < 5:
                    rows = conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()",
                        [dbname],
                    ).fetchall()
                    terminated.append(len(rows))
                    time.sleep(0.3)

        killer = threading.Thread(target=terminate_backends)
        killer.start()
        try:
            codes = _register_many(srv, names)
        finally:
            stop.set()
            killer.join(30)
        assert sum(terminated) > 0
        # Some writes may have failed with the connection (the batch is retried
        # once); each answered 200 or 500, none hung, and every 200 is stored.
        assert set(codes.values()) <= {200, 500}, codes
        after = [unique("after") for _ in range(5)]
        for name in after:
            assert _register(srv, name, timeout=30).status_code == 200
        stored = set(_services(srv))
        assert {n for n, c in codes.items() if c == 200} | set(after) <= stored
        assert eventually(lambda: _healthy(srv), timeout=30)
        m = _metrics(srv)
        assert m["mesh.writer.alive"] == 1 and m["mesh.writer.restarts"] == 0
    finally:
        srv.close()


def test_a_database_locked_for_a_while_mid_batch_is_followed_by_writes_that_succeed(
    tmp_path, unique
):
    if postgres_url():
        pytest.skip("SQLite only: a PostgreSQL database is cut instead (previous test)")
    srv = make_server(tmp_path / "lite")
    try:
        path = srv.data_dir / "mesh.sqlite3"
        assert path.exists()
        locker = sqlite3.connect(path, timeout=30, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # every other writer (and reader) waits
        names = [unique("locked") for _ in range(40)]
        result: dict[str, int] = {}
        writes = threading.Thread(target=lambda: result.update(_register_many(srv, names)))
        writes.start()
        time.sleep(2.0)
        locker.execute("ROLLBACK")
        locker.close()
        writes.join(120)
        assert not writes.is_alive()
        assert set(result.values()) == {200}, result
        assert set(names) <= set(_services(srv))
        assert _register(srv, unique("after"), timeout=15).status_code == 200
        assert _healthy(srv)
    finally:
        srv.close()


def test_the_health_endpoint_says_unhealthy_while_the_database_refuses_connections(tmp_path):
    if not postgres_url():
        pytest.skip("PostgreSQL only: the database is made unreachable by refusing connections")
    srv = make_server(tmp_path / "down")
    dbname = srv.database_url.rsplit("/", 1)[-1]
    try:
        assert _healthy(srv)
        with _admin_conn(postgres_url()) as conn:
            conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                [dbname],
            )
        try:
            with srv.client(timeout=20) as c:
                r = c.get("/v1/agent/health")
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["Status"] == "critical"
            assert body["Database"]["Reachable"] is False and body["Database"]["Error"]
        finally:
            with _admin_conn(postgres_url()) as conn:
                conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        assert eventually(lambda: _healthy(srv), timeout=30)
    finally:
        srv.close()


def test_metrics_come_as_consul_json_and_as_prometheus_text(srv):
    with srv.client() as c:
        data = c.get("/v1/agent/metrics").json()
        text = c.get("/v1/agent/metrics", params={"format": "prometheus"})
    assert set(data) == {"Timestamp", "Gauges", "Points", "Counters", "Samples"}
    names = {g["Name"] for g in data["Gauges"]} | {c["Name"] for c in data["Counters"]}
    assert {
        "mesh.writer.alive",
        "mesh.writer.queue_depth",
        "mesh.writer.restarts",
        "mesh.writer.batches_committed",
        "mesh.writer.writes_committed",
        "mesh.writer.writes_failed",
        "mesh.blocking_queries.waiting",
    } <= names
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert "# TYPE mesh_writer_restarts_total counter" in text.text
    assert "\nmesh_writer_alive 1\n" in text.text


def test_a_blocking_query_shows_in_the_metrics_while_it_waits(srv, unique):
    name = unique("blocked")
    with srv.client() as c:
        index = c.get(f"/v1/health/service/{name}").headers["X-Consul-Index"]

    def block() -> None:
        with srv.client(timeout=30) as c:
            c.get(f"/v1/health/service/{name}", params={"index": index, "wait": "20s"})

    waiter = threading.Thread(target=block)
    waiter.start()
    try:
        eventually(lambda: _metrics(srv)["mesh.blocking_queries.waiting"] >= 1, timeout=15)
    finally:
        assert _register(srv, name).status_code == 200
        waiter.join(30)


def test_metrics_need_agent_read_when_acls_are_on_and_health_needs_no_token(acl_server):
    with acl_server.client(token="") as anonymous:
        assert anonymous.get("/v1/agent/metrics").status_code == 403
        assert anonymous.get("/v1/agent/health").status_code == 200
    with acl_server.client() as manager:
        assert manager.get("/v1/agent/metrics").status_code == 200
