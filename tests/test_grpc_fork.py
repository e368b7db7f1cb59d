"""gRPC's fork support stays off in every meshweb process that runs gRPC.

With it on (grpcio's default), a process that runs gRPC and starts a child
through a real fork() (subprocess with a `preexec_fn`) sometimes sees the child
abort before exec: "Epoll1Poller ... epoll_wait error: Bad file descriptor"
(SIGABRT, exit -6). That is how `mesh server` "died at start-up" in the
agent tests: the test process, running gRPC clients, forked it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.servers import ROOT

_PROBE = r"""
import importlib.abc, json, os, sys
seen = {}
class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and "grpc" not in seen:
            seen["grpc"] = os.environ.get("GRPC_ENABLE_FORK_SUPPORT")
        return None
sys.meta_path.insert(0, Hook())
os.environ["DJANGO_SETTINGS_MODULE"] = "meshweb.settings"
if sys.argv[1].startswith("registry."):
    import django
    django.setup()
import importlib
importlib.import_module(sys.argv[1])
print(json.dumps(seen))
"""


@pytest.mark.parametrize(
    "module",
    [
        "agents.client",
        "agents.agent",
        "meshproto.probes",
        "meshproto.proto.mesh_pb2_grpc",
        "registry.grpc.server",
        "meshweb.cli",
    ],
)
def test_grpc_is_imported_with_fork_support_off(module, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    env["MESH_DATA_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # Not every module imports grpc at import time; those that do see it off.
    assert seen.get("grpc", "false") == "false", seen
