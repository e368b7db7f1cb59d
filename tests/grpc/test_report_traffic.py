"""`ReportTraffic` through a real control plane: an agent's report becomes the
golden metrics `/api/metrics/...` serves, every server process answers the
same windows, refusals are gRPC status codes, and reads are ACL-filtered."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import grpc
import pytest

from meshproto.golden import DURATION_BOUNDS_MS, bucket_index
from meshproto.proto import mesh_pb2
from tests.grpc.conftest import Agent, acl_token, join_now, new_token, unique_node
from tests.support.servers import server_pair

pytestmark = pytest.mark.slow
WIDTH = len(DURATION_BOUNDS_MS) + 1


def counts(reporter, source, destination, requests, failures=0, ms=3.0):
    row = [0] * WIDTH
    row[bucket_index(ms)] = requests
    return mesh_pb2.TrafficCounts(
        reporter=reporter,
        source=source,
        destination=destination,
        requests=requests,
        failures=failures,
        latency_buckets=row,
    )


def traffic(*entries, length: float = 10.0) -> mesh_pb2.TrafficReport:
    end = time.time()
    return mesh_pb2.TrafficReport(start_unix=end - length, end_unix=end, counts=list(entries))


def test_a_report_becomes_the_services_and_edges_golden_metrics(cp, unique):
    api, web = unique("api"), unique("web")
    host_a, host_b = join_now(cp), join_now(cp)
    asyncio.run(host_a.sync([{"Name": api, "Port": 9000}]))
    asyncio.run(host_b.sync([{"Name": web, "Port": 9001}]))
    ack = asyncio.run(
        host_a.call(
            "ReportTraffic",
            traffic(
                counts("destination", web, api, 90, 0, ms=4.0),
                counts("destination", web, api, 10, 10, ms=40.0),
            ),
        )
    )
    assert ack.accepted == 2
    asyncio.run(host_b.call("ReportTraffic", traffic(counts("source", web, api, 101, 11))))
    with cp.client() as http:
        got = http.get(f"/api/metrics/services/{api}").json()
        listed = http.get("/api/metrics/services/").json()["services"]
        edges = http.get("/api/metrics/edges", params={"source": web}).json()["edges"]
    one = got["windows"]["1m"]
    assert (one["requests"], one["failures"], one["success_rate"]) == (100, 10, 0.9)
    assert 3.0 < one["latency_ms"]["p50"] <= 4.0
    assert 30.0 < one["latency_ms"]["p99"] <= 40.0
    assert 5.0 < one["rps"] <= 10.0  # 100 requests over a little more than 10 s
    assert [s["source"] for s in got["sources"]] == [web]
    assert any(s["service"] == api and s["windows"]["1h"]["requests"] == 100 for s in listed)
    assert [(e["source"], e["destination"], e["windows"]["5m"]["requests"]) for e in edges] == [
        (web, api, 101)
    ]


def test_a_node_cannot_report_for_another_nodes_service(cp, unique):
    api = unique("api")
    owner, other = join_now(cp), join_now(cp)
    asyncio.run(owner.sync([{"Name": api, "Port": 9000}]))
    asyncio.run(other.sync([]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(other.call("ReportTraffic", traffic(counts("destination", "x", api, 5))))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert api in err.value.details()
    with cp.client() as http:
        assert http.get(f"/api/metrics/services/{api}").json()["windows"]["1h"]["requests"] == 0


def test_a_malformed_report_is_invalid_and_stores_nothing(cp, unique):
    api = unique("api")
    agent = join_now(cp)
    asyncio.run(agent.sync([{"Name": api, "Port": 9000}]))
    bad = counts("destination", "web", api, 5)
    del bad.latency_buckets[3:]
    for report in (traffic(bad), traffic(counts("destination", "web", api, 5), length=-1)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            asyncio.run(agent.call("ReportTraffic", report))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with cp.client() as http:
        assert http.get(f"/api/metrics/services/{api}").json()["windows"]["1h"]["requests"] == 0


def test_an_unjoined_caller_cannot_report(cp):
    stranger = Agent(cp, unique_node())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(stranger.call("ReportTraffic", traffic()))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_metrics_reads_follow_acls(cp, unique):
    api, web = unique("api"), unique("web")
    host = join_now(cp)
    asyncio.run(host.sync([{"Name": web, "Port": 9001}]))
    asyncio.run(host.call("ReportTraffic", traffic(counts("source", web, api, 3))))
    only_web = acl_token(cp, f'service "{web}" {{ policy = "read" }}')
    with cp.client(token=only_web) as http:
        assert http.get(f"/api/metrics/services/{api}").status_code == 403
        assert http.get(f"/api/metrics/services/{api}").json()["error"]
        assert http.get("/api/metrics/edges", params={"source": web}).json()["edges"] == []
    with cp.client() as http:
        assert len(http.get("/api/metrics/edges", params={"source": web}).json()["edges"]) == 1
        assert http.get("/api/metrics/services/no-such-service").status_code == 404
        refused = http.post("/api/metrics/edges", json={})
        assert refused.status_code == 405 and refused.json()["error"]


@pytest.mark.postgres
@pytest.mark.redis
def test_every_server_process_answers_the_same_windows(tmp_path_factory, unique):
    api = unique("api")
    with server_pair(tmp_path_factory) as (first, second):
        agent = Agent(first, unique_node())
        asyncio.run(agent.join(new_token(first)["token"]))
        asyncio.run(agent.sync([{"Name": api, "Port": 9000}]))
        asyncio.run(agent.call("ReportTraffic", traffic(counts("destination", "web", api, 42, 2))))
        agent.server = second  # the same agent, reporting to the other process
        asyncio.run(agent.call("ReportTraffic", traffic(counts("destination", "web", api, 8))))
        answers = []
        for server in (first, second):
            with server.client() as http:
                answers.append(http.get(f"/api/metrics/services/{api}").json()["windows"]["5m"])
    assert answers[0]["requests"] == answers[1]["requests"] == 50
    assert answers[0]["failures"] == answers[1]["failures"] == 2


def _mesh(server, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MESH_HTTP_ADDR": server.addr, "MESH_HTTP_TOKEN": server.token or ""}
    return subprocess.run(
        [sys.executable, "-m", "meshweb.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_mesh_top_shows_the_reported_services_and_edges(cp, unique):
    api, web = unique("api"), unique("web")
    host = join_now(cp)
    asyncio.run(host.sync([{"Name": api, "Port": 9000}, {"Name": web, "Port": 9001}]))
    asyncio.run(
        host.call(
            "ReportTraffic",
            traffic(
                counts("destination", web, api, 200, 4, ms=8.0), counts("source", web, api, 200, 4)
            ),
        )
    )
    mesh = _mesh(cp, "top", "-once")
    assert mesh.returncode == 0, mesh.stderr
    row = next(line.split() for line in mesh.stdout.splitlines() if line.startswith(api))
    assert row[2] == "98.00%" and row[-1] == "200"
    assert any(line.split()[:2] == [web, api] for line in mesh.stdout.splitlines())
    one = _mesh(cp, "top", "-service", api, "-window", "5m", "-count", "2", "-interval", "0.5s")
    assert one.returncode == 0, one.stderr
    assert one.stdout.count(f"{api} (as its sidecars answered)") == 2
    windows = [
        line.split()[0]
        for line in one.stdout.splitlines()
        if line[:3] in ("1m ", "5m ", "15m", "1h ")
    ]
    assert windows[:4] == ["1m", "5m", "15m", "1h"]
    as_json = json.loads(_mesh(cp, "top", "-service", api, "-format", "json").stdout)
    assert as_json["service"]["windows"]["1m"]["requests"] == 200
    missing = _mesh(cp, "top", "-service", "no-such-service")
    assert missing.returncode == 1 and "no-such-service" in missing.stderr


def test_mesh_top_on_a_terminal_redraws_until_stopped(cp, unique):
    import pty

    api = unique("api")
    host = join_now(cp)
    asyncio.run(host.sync([{"Name": api, "Port": 9000}]))
    asyncio.run(host.call("ReportTraffic", traffic(counts("destination", "web", api, 10))))
    env = {**os.environ, "MESH_HTTP_ADDR": cp.addr, "MESH_HTTP_TOKEN": cp.token or ""}
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshweb.cli", "top", "-count", "3", "-interval", "0.5s"],
        stdout=follower,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(follower)
    output = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the command is done
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    text = output.decode(errors="replace")
    assert text.count("\x1b[H\x1b[2J") == 3  # each table redrawn over the last
    assert text.count("Services (as their sidecars answered)") == 3


def test_a_day_of_reports_is_rolled_up_and_served_over_24h(cp, unique):
    api, web = unique("api"), unique("web")
    host = join_now(cp)
    asyncio.run(host.sync([{"Name": api, "Port": 9000}, {"Name": web, "Port": 9001}]))
    now = time.time()

    def at(ago: float, *entries) -> mesh_pb2.TrafficReport:
        return mesh_pb2.TrafficReport(
            start_unix=now - ago - 10, end_unix=now - ago, counts=list(entries)
        )

    # Reports of earlier hours (older than the fine windows: rolled up at once),
    # then one from the last minute.
    for ago, n, failed in ((20 * 3600, 70, 7), (6 * 3600, 20, 0), (5000, 9, 1), (5, 100, 2)):
        ack = asyncio.run(
            host.call(
                "ReportTraffic",
                at(ago, counts("destination", web, api, n, failed), counts("source", web, api, n)),
            )
        )
        assert ack.accepted == 2
    with cp.client() as http:
        day = http.get(f"/api/metrics/services/{api}", params={"window": "24h"}).json()
        hour = http.get(f"/api/metrics/services/{api}", params={"window": "1h"}).json()
        every = http.get(f"/api/metrics/services/{api}").json()
        edges = http.get("/api/metrics/edges", params={"source": web, "window": "24h"}).json()
        series = http.get(f"/api/metrics/services/{api}/series", params={"window": "24h"}).json()
        quarter = http.get(f"/api/metrics/services/{api}/series", params={"window": "15m"})
        bad = http.get(f"/api/metrics/services/{api}", params={"window": "2d"})
        bad_series = http.get(f"/api/metrics/services/{api}/series", params={"window": "1m"})
    assert list(day["windows"]) == ["24h"]
    assert (day["windows"]["24h"]["requests"], day["windows"]["24h"]["failures"]) == (199, 10)
    assert (hour["windows"]["1h"]["requests"], hour["windows"]["1h"]["failures"]) == (100, 2)
    assert list(every["windows"]) == ["1m", "5m", "15m", "1h", "24h"]
    assert every["windows"]["24h"]["requests"] == 199
    assert [e["windows"]["24h"]["requests"] for e in edges["edges"]] == [199]
    assert series["step_s"] == 300 and [p["requests"] for p in series["points"]] == [70, 20, 9, 100]
    assert quarter.status_code == 200 and quarter.json()["step_s"] == 30
    assert [p["requests"] for p in quarter.json()["points"]] == [100]
    assert bad.status_code == 400 and "window must be one of" in bad.json()["error"]
    assert bad_series.status_code == 400
    top = _mesh(cp, "top", "-once", "-window", "24h")
    assert top.returncode == 0, top.stderr
    assert "last 24h" in top.stdout
    row = next(line.split() for line in top.stdout.splitlines() if line.startswith(api))
    assert row[-1] == "199"
    one = _mesh(cp, "top", "-service", api, "-once")
    assert any(
        line.split()[:1] == ["24h"] and line.split()[-1] == "199"
        for line in one.stdout.splitlines()
    )
