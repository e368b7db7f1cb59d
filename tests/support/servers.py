"""Start and stop real `mesh server` processes for end-to-end tests.

Each server gets free loopback ports, its own data dir and its own database:
a temporary SQLite file by default, or a fresh PostgreSQL database (created
and dropped here) when the test run's `DATABASE_URL` points at PostgreSQL.
With `REDIS_URL` set, servers use Redis for change fan-out and Celery.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[2]
MANAGEMENT_TOKEN = "e95b599e-166e-7d80-08ad-aee76e7ddf19"


def _pdeathsig() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def die_with_parent():
    """A preexec_fn: the child gets SIGTERM when the test process dies (Linux).

    A test run that is killed (a timeout, Ctrl-C twice) never runs its
    finalizers; without this its servers would live on as orphans. The signal
    follows the *thread* that started the child, so it is only asked for from
    the main thread (a helper thread that starts a server and ends would
    take the server with it).
    """
    import threading

    return _pdeathsig if threading.current_thread() is threading.main_thread() else None


# Ports handed to test servers come from below the kernel's ephemeral range
# (32768-60999 here): a port the kernel gave out as "free" could be taken as
# the source port of any outgoing connection before the server binds it.
# Above the sidecar range (21000-21255), which agents use for sidecars.
_PORTS = range(22000, 32768)


def _bindable(port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (DNS needs both)."""
    for _ in range(200):
        port = random.choice(_PORTS)
        if _bindable(port):
            return port
    raise RuntimeError("no free port")


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds the TCP listener on 127.0.0.1:`port` (Linux).

    A ready check that only connects could be answered by another run's server
    that took the port first; this tells our own process from it.
    """
    inodes = set()
    with open("/proc/net/tcp") as table:
        for row in table.readlines()[1:]:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and local == f"0100007F:{port:04X}":  # LISTEN on 127.0.0.1
                inodes.add(f"socket:[{inode}]")
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return False
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}") in inodes:
                return True
        except OSError:
            continue
    return False


def postgres_url() -> str | None:
    url = os.environ.get("DATABASE_URL", "")
    return url if url.startswith(("postgres://", "postgresql://")) else None


def redis_url() -> str | None:
    return os.environ.get("REDIS_URL") or None


def require(url: str | None, what: str) -> str:
    """`url`, or skip the test when the service is not configured.

    CI runs the suite once on PostgreSQL + Redis with `MESH_TEST_REQUIRE_SERVICES=1`:
    there a missing service is a failure, never a skip. (Its second pass, on the
    embedded default, has no PostgreSQL by design and skips these tests.)
    """
    import pytest

    if url:
        return url
    if os.environ.get("MESH_TEST_REQUIRE_SERVICES"):
        pytest.fail(f"{what} is required (MESH_TEST_REQUIRE_SERVICES is set)")
    pytest.skip(f"needs {what} (set DATABASE_URL / REDIS_URL)")


def _admin_conn(url: str):
    import psycopg

    u = urlparse(url)
    return psycopg.connect(
        host=u.hostname or "127.0.0.1",
        port=u.port or 5432,
        user=u.username or "postgres",
        password=u.password or None,
        dbname="postgres",
        autocommit=True,
    )


def create_database(base_url: str) -> str:
    name = "meshweb_e2e_" + uuid.uuid4().hex[:10]
    with _admin_conn(base_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    u = urlparse(base_url)
    return u._replace(path="/" + name).geturl()


def drop_database(url: str) -> None:
    name = urlparse(url).path.lstrip("/")
    with contextlib.suppress(Exception), _admin_conn(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class MeshServer:
    """A running `mesh server` process."""

    data_dir: Path
    http_port: int
    dns_port: int
    env: dict[str, str]
    grpc_port: int = 0  # the agent protocol (TLS), MESH_GRPC_ADDR
    token: str | None = None
    database_url: str | None = None
    owns_database: bool = False
    proc: subprocess.Popen | None = None
    log_path: Path = field(default=None)  # type: ignore[assignment]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def client(self, token: str | None = None, **kw) -> httpx.Client:
        headers = {}
        tok = token if token is not None else self.token
        if tok:
            headers["X-Consul-Token"] = tok
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 30), **kw)

    def consul(self, token: str | None = None):
        """An unmodified py-consul client pointed at this server."""
        import consul

        return consul.Consul(
            host="127.0.0.1", port=self.http_port, token=token if token is not None else self.token
        )

    def start(self) -> MeshServer:
        self.log_path = self.data_dir / "server.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child process owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshweb.cli", "server", "--quiet"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mesh server exited {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.url + "/v1/status/leader", timeout=1)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"mesh server did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        if self.owns_database and self.database_url:
            drop_database(self.database_url)


def make_server(
    data_dir: Path,
    *,
    acl: bool = False,
    redis: bool | None = None,
    database_url: str | None = None,
    extra_env: dict[str, str] | None = None,
    start: bool = True,
) -> MeshServer:
    """Configure (and start) a server. `database_url` shares an existing database."""
    data_dir.mkdir(parents=True, exist_ok=True)
    http_port, dns_port, grpc_port = free_port(), free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MESH_", "DATABASE_URL", "REDIS_URL", "CONSUL_"))
    }
    owns = False
    if database_url is None and postgres_url():
        database_url, owns = create_database(postgres_url()), True
    if database_url:
        env["DATABASE_URL"] = database_url
    use_redis = redis if redis is not None else bool(redis_url())
    if use_redis:
        env["REDIS_URL"] = redis_url() or "redis://127.0.0.1:6379/0"
        # Test servers run their own background work in-process unless a test starts workers.
        env["MESH_TASKS"] = "inprocess"
    env.update(
        {
            "MESH_DATA_DIR": str(data_dir),
            "MESH_HTTP_ADDR": f"127.0.0.1:{http_port}",
            "MESH_DNS_ADDR": f"127.0.0.1:{dns_port}",
            "MESH_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
            "MESH_ACL_ENABLED": "true" if acl else "false",
            "MESH_SECRET_KEY": "test-secret-key-not-for-production",
            "MESH_TASK_TICK_SECONDS": "0.2",
            # Tests make failed joins on purpose, all from 127.0.0.1; only the
            # throttle's own tests ask for a small burst.
            "MESH_JOIN_FAILURE_BURST": "100000",
            "PYTHONUNBUFFERED": "1",
        }
    )
    token = None
    if acl:
        env["MESH_ACL_INITIAL_MANAGEMENT_TOKEN"] = MANAGEMENT_TOKEN
        token = MANAGEMENT_TOKEN
    env.update(extra_env or {})
    server = MeshServer(
        data_dir=data_dir,
        http_port=http_port,
        dns_port=dns_port,
        env=env,
        grpc_port=grpc_port,
        token=token,
        database_url=database_url,
        owns_database=owns,
    )
    if start:
        try:
            server.start()
        except Exception:
            server.close()
            raise
    return server


@contextlib.contextmanager
def server_pair(tmp_path_factory):
    """Two servers on one fresh PostgreSQL database and Redis: one control plane.

    Skips (or, with MESH_TEST_REQUIRE_SERVICES, fails) without PostgreSQL and Redis.
    """
    base = require(postgres_url(), "PostgreSQL")
    require(redis_url(), "Redis")
    shared = create_database(base)
    first = make_server(tmp_path_factory.mktemp("a"), database_url=shared, redis=True)
    second = make_server(tmp_path_factory.mktemp("b"), database_url=shared, redis=True)
    # The first owns the database: closing it last drops it.
    first.owns_database = True
    try:
        yield first, second
    finally:
        second.close()
        first.close()
