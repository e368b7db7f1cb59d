"""The sidecar process stays lean: its entry module pulls in no heavy package."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("cryptography", "grpc", "django", "registry", "google.protobuf")


def test_the_entry_module_imports_neither_cryptography_grpc_django_nor_registry():
    code = (
        "import json, sys; import agents.proxy.main; "
        "print(json.dumps(sorted(m for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    loaded = json.loads(out.stdout)
    offending = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert offending == []
    assert "agents.proxy.sidecar" in loaded


def test_the_mesh_gateway_imports_nothing_heavy_and_no_sidecar_code():
    code = (
        "import json, sys; import gateways.main; print(json.dumps(sorted(m for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    loaded = json.loads(out.stdout)
    offending = [
        m for m in loaded if any(m == h or m.startswith(h + ".") for h in (*HEAVY, "agents"))
    ]
    assert offending == []
    assert "gateways.gateway" in loaded
