"""The production path of cloud sync: `mesh beat` queues the due account's run and a
`mesh worker` runs it (Redis, MESH_TASKS=celery); the server runs none itself."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.registry.test_background_tasks import Proc, _drop_queue, _redis_or_skip
from tests.support.aws import KEY_ID, SECRET, MotoServer, seed_cloud_map
from tests.support.servers import make_server

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def test_beat_schedules_a_new_account_and_a_worker_syncs_it(tmp_path):
    url = _redis_or_skip()
    queue = f"meshtest-{uuid.uuid4().hex[:10]}"
    moto = MotoServer().start(tmp_path)
    server = None
    procs: list[Proc] = []
    try:
        seed_cloud_map(moto, "celery.local", {"queue-svc": 3})
        server = make_server(
            tmp_path / "cp",
            redis=True,
            extra_env={
                "REDIS_URL": url,
                "MESH_TASKS": "celery",
                "MESH_CELERY_QUEUE": queue,
                "MESH_CLOUD_TICK_SECONDS": "1",
            },
        )
        procs.append(
            Proc(["worker", "--beat", "--concurrency", "1"], server.env, tmp_path / "worker.log")
        )
        with server.client() as http:
            created = http.post(
                "/api/clouds/",
                json={
                    "name": "scheduled",
                    "datacenter": "dc1",
                    "regions": ["us-east-1"],
                    "endpoint_url": moto.url,
                    "credentials": {"access_key_id": KEY_ID, "secret_access_key": SECRET},
                    "import": {"ec2": False},
                },
            )
            assert created.status_code == 201, created.text
            deadline = time.monotonic() + 120
            runs: list = []
            while time.monotonic() < deadline:
                runs = http.get("/api/clouds/scheduled/runs/").json()["results"]
                if runs and runs[-1]["status"] not in ("queued", "running"):
                    break
                time.sleep(0.5)
        assert runs, procs[0].log()
        first = runs[-1]
        assert first["trigger"] == "schedule"
        assert first["status"] == "succeeded", json.dumps(first)
        assert first["created"] == 3
        _, instances = server.consul().health.service("queue-svc")
        assert sorted(e["Service"]["Meta"]["aws-instance-id"] for e in instances) == [
            "queue-svc-0",
            "queue-svc-1",
            "queue-svc-2",
        ]
        # Not due again for an interval: beat queues nothing more meanwhile.
        time.sleep(3)
        with server.client() as http:
            assert len(http.get("/api/clouds/scheduled/runs/").json()["results"]) == len(runs)
    finally:
        for p in procs:
            p.stop()
        if server is not None:
            server.close()
        moto.stop()
        _drop_queue(url, queue)
