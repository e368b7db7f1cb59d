"""The committed gRPC code is exactly what the .proto generates (reproducible build)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["mesh_pb2.py", "mesh_pb2.pyi", "mesh_pb2_grpc.py"]


def test_generated_code_matches_the_proto(tmp_path):
    work = tmp_path / "meshproto" / "proto"
    work.mkdir(parents=True)
    shutil.copy(ROOT / "meshproto/proto/mesh.proto", work / "mesh.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "meshproto/proto/mesh.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        assert (work / name).read_text() == (ROOT / "meshproto/proto" / name).read_text(), (
            f"{name} is stale: run scripts/gen-proto"
        )


def test_messages_round_trip():
    from meshproto.proto import mesh_pb2

    update = mesh_pb2.ProxyConfigUpdate(proxy_id="web-sidecar-proxy", version=7, config_json=b"{}")
    again = mesh_pb2.ProxyConfigUpdate.FromString(update.SerializeToString())
    assert (again.proxy_id, again.version, again.config_json, again.removed) == (
        "web-sidecar-proxy",
        7,
        b"{}",
        False,
    )
    req = mesh_pb2.StreamRequest(ack=mesh_pb2.Ack(proxy_id="p", version=7, ok=True))
    assert req.WhichOneof("kind") == "ack"
