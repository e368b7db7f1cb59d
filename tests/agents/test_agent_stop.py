"""An agent stops within a bound after SIGTERM / SIGINT, even with both cores busy and a
check stuck in a blocking call (an app that accepts connections and never answers)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.agents.conftest import eventually
from tests.support.servers import free_port

pytestmark = pytest.mark.slow

STOP_BOUND_SECONDS = 10.0


@pytest.fixture
def silent_app():
    """Accepts connections, never answers: an HTTP check to it blocks until its timeout."""
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def busy_cores():
    """Two busy loops (one per core), each ending by itself after 90 s at the latest."""
    spin = "import time\nend = time.monotonic() + 90\nwhile time.monotonic() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    yield
    for p in procs:
        p.kill()  # the loop itself (no wrapper whose death would leave it running)
        p.wait(10)


def _definitions(app_port: int) -> dict[str, str]:
    service = {
        "service": {
            "name": "stuck",
            "port": app_port,
            "check": {
                "http": f"http://127.0.0.1:{app_port}/",
                "interval": "1s",
                "timeout": "60s",
            },
            "connect": {"sidecar_service": {"port": free_port()}},
        }
    }
    return {"stuck.json": json.dumps(service)}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_agent_stops_within_bounds_with_busy_cores_and_a_stuck_check(
    make_agent, silent_app, busy_cores, sig
):
    agent = make_agent(files=_definitions(silent_app))
    # The sidecar runs and the check is in its blocking call.
    eventually(lambda: "mesh-sidecar" in _children(agent.proc.pid), timeout=60)
    time.sleep(2.0)
    started = time.monotonic()
    agent.signal(sig)
    code = agent.proc.wait(STOP_BOUND_SECONDS + 20)  # generous; the bound is asserted below
    took = time.monotonic() - started
    assert took < STOP_BOUND_SECONDS, f"stop took {took:.1f}s:\n{agent.log()}"
    assert code == 0, agent.log()
    stopped = [r for r in agent.log_lines() if r.get("msg") == "agent stopped"]
    assert stopped, agent.log()


def _children(pid: int) -> str:
    out = subprocess.run(["ps", "-o", "args=", "--ppid", str(pid)], capture_output=True, text=True)
    return out.stdout
