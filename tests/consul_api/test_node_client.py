"""The Node.js client suite (`tests/node`, the npm `consul` package 2.0.1 run with
`node --test`) against a real server of this test run (PostgreSQL when configured)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.support.servers import ROOT, make_server

pytestmark = pytest.mark.slow


def test_the_npm_consul_client_suite_passes(tmp_path):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the Node.js client suite")
    server = make_server(tmp_path / "srv")
    try:
        env = {**os.environ, "MESH_TEST_HTTP_ADDR": server.addr}
        done = subprocess.run(
            ["bash", str(ROOT / "tests/node/run")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.close()
    report = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert "# fail 0" in done.stdout and "# pass 15" in done.stdout, report
