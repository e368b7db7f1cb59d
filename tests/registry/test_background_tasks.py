"""Background work: the in-process loop, several tickers on one database, and
the production path (real `mesh worker` / `mesh beat` processes on Redis)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.registry.test_health_checks import HttpEndpoint, wait_for
from tests.support.servers import ROOT, MeshServer, die_with_parent, make_server, redis_url

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def _redis_or_skip() -> str:
    """The Redis these tests use; skipped locally when down, a failure in CI."""
    import redis

    url = redis_url() or DEFAULT_REDIS
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:
        if os.environ.get("MESH_TEST_REQUIRE_SERVICES"):
            pytest.fail(f"Redis at {url} is required (MESH_TEST_REQUIRE_SERVICES is set): {exc}")
        pytest.skip(f"needs a reachable Redis ({url}): {exc}")
    return url


class Proc:
    """A `mesh worker` / `mesh beat` process with its log, stopped by its own process group."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        log = open(log_path, "ab")  # noqa: SIM115 - the child process owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshweb.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def _celery_server(tmp: Path, url: str, queue: str) -> MeshServer:
    """A server that leaves all background work to Celery workers on `queue`."""
    return make_server(
        tmp,
        redis=True,
        extra_env={"REDIS_URL": url, "MESH_TASKS": "celery", "MESH_CELERY_QUEUE": queue},
    )


def _check(server: MeshServer, check_id: str) -> dict | None:
    return server.consul().agent.checks().get(check_id)


def _status_is(server: MeshServer, check_id: str, status: str):
    return lambda: (c := _check(server, check_id)) and c["Status"] == status and c


# --- the CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["worker"], ["worker", "--beat"], ["beat"]])
def test_worker_and_beat_refuse_to_start_without_redis(tmp_path, command):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDIS_URL_FILE")}
    env["MESH_DATA_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "meshweb.cli", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"mesh {command[0]}: REDIS_URL is not set" in done.stderr
    assert "REDIS_URL=redis://127.0.0.1:6379/0" in done.stderr


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_worker_and_beat_have_help(command):
    done = subprocess.run(
        [sys.executable, "-m", "meshweb.cli", command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert f"usage: mesh {command}" in done.stdout
    assert "REDIS_URL" in done.stdout or "MESH_TASK_TICK_SECONDS" in done.stdout


# --- several tickers on one database ----------------------------------------------------------


@pytest.mark.slow
def test_two_servers_ticking_on_one_database_run_each_check_once_per_interval(tmp_path, unique):
    first = make_server(tmp_path / "a")
    second = make_server(
        tmp_path / "b",
        database_url=first.database_url,
        extra_env={} if first.database_url else {"MESH_DATA_DIR": str(tmp_path / "a")},
    )
    endpoint = HttpEndpoint()
    try:
        name = unique("shared")
        with first.client() as http:
            r = http.put(
                "/v1/agent/service/register",
                json={"Name": name, "Check": {"HTTP": endpoint.url(), "Interval": "1s"}},
            )
            assert r.status_code == 200, r.text
        wait_for(_status_is(second, f"service:{name}", "passing"), timeout=5)
        start = len(endpoint.requests)
        time.sleep(4.0)
        runs = len(endpoint.requests) - start
        # One run per second between them, not one each (allow scheduling slack).
        assert 2 <= runs <= 6, runs
    finally:
        endpoint.close()
        second.close()
        first.close()


# --- the Celery path (real worker and beat processes on Redis) ------------------------------


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory):
    """A server with MESH_TASKS=celery, one `mesh worker` and one `mesh beat` sharing its
    database, on a queue of this test run's own (so parallel runs never share work)."""
    url = _redis_or_skip()
    queue = f"meshtest-{uuid.uuid4().hex[:10]}"
    tmp = tmp_path_factory.mktemp("celery")
    server = _celery_server(tmp, url, queue)
    procs: list[Proc] = []
    try:
        procs.append(
            Proc(["worker", "--concurrency", "2"], server.env, tmp / "worker.log"),
        )
        procs.append(Proc(["beat", "--loglevel", "warning"], server.env, tmp / "beat.log"))
        yield server, procs
    finally:
        for p in procs:
            p.stop()
        server.close()
        _drop_queue(url, queue)


def _drop_queue(url: str, queue: str) -> None:
    """Remove what this run's queue left in the shared Redis (ticks restored at shutdown)."""
    import redis

    client = redis.Redis.from_url(url)
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


def _delay_tick(env: dict[str, str]) -> dict:
    """`registry.tasks.tick.delay()` from another process (as a web process would) and its result."""
    code = (
        "import json, django; django.setup()\n"
        "from registry.tasks import tick\n"
        "print(json.dumps(tick.delay().get(timeout=30)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "meshweb.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.redis
def test_tick_delay_returns_the_workers_counts(celery_stack):
    server, procs = celery_stack
    result = _delay_tick(server.env)
    assert set(result) == {
        "checks_run",
        "ttl_expired",
        "aliases_updated",
        "services_deregistered",
        "sessions_expired",
        "nodes_down",
    }
    assert all(isinstance(v, int) for v in result.values())


@pytest.mark.slow
@pytest.mark.redis
def test_a_worker_runs_http_checks_that_the_server_leaves_alone(celery_stack, unique, tmp_path):
    server, procs = celery_stack
    endpoint = HttpEndpoint()
    try:
        name = unique("celery-http")
        with server.client() as http:
            r = http.put(
                "/v1/agent/service/register",
                json={"Name": name, "Check": {"HTTP": endpoint.url(), "Interval": "1s"}},
            )
            assert r.status_code == 200, r.text
        passing = wait_for(_status_is(server, f"service:{name}", "passing"), timeout=15)
        assert passing["Output"] == f"HTTP GET {endpoint.url()}: 200 OK Output: ok"
        endpoint.status = 500
        wait_for(_status_is(server, f"service:{name}", "critical"), timeout=5)
        server.consul().agent.service.deregister(name)
    finally:
        endpoint.close()
    for p in procs:
        assert p.proc.poll() is None, p.log()


@pytest.mark.slow
@pytest.mark.redis
def test_a_ttl_check_lapses_through_the_worker(celery_stack, unique):
    server, _ = celery_stack
    c = server.consul()
    name = unique("celery-ttl")
    c.agent.service.register(name, service_id=name, check={"TTL": "1s"})
    c.agent.check.ttl_pass(f"service:{name}", "up")
    lapsed = wait_for(_status_is(server, f"service:{name}", "critical"), timeout=15)
    assert lapsed["Output"] == "TTL expired (last output before timeout follows): up"
    c.agent.service.deregister(name)


@pytest.mark.slow
@pytest.mark.redis
def test_without_a_worker_a_celery_server_runs_no_checks(tmp_path, unique):
    url = _redis_or_skip()
    queue = f"meshtest-{uuid.uuid4().hex[:10]}"
    server = _celery_server(tmp_path, url, queue)
    endpoint = HttpEndpoint()
    try:
        name = unique("idle")
        with server.client() as http:
            r = http.put(
                "/v1/agent/service/register",
                json={"Name": name, "Check": {"HTTP": endpoint.url(), "Interval": "1s"}},
            )
            assert r.status_code == 200, r.text
        time.sleep(1.5)
        assert endpoint.requests == []
        assert _check(server, f"service:{name}")["Status"] == "critical"
        # A `mesh worker --beat` alone is a complete background runner.
        worker = Proc(
            ["worker", "--beat", "--concurrency", "1"], server.env, tmp_path / "worker.log"
        )
        try:
            # The bound covers the worker's start-up (Django and Celery imports, the
            # broker connection), which takes tens of seconds on a loaded machine.
            wait_for(_status_is(server, f"service:{name}", "passing"), timeout=60)
        finally:
            worker.stop()
        assert worker.proc.returncode == 0, worker.log()
    finally:
        endpoint.close()
        server.close()
        _drop_queue(url, queue)
