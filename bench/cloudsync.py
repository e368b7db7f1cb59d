#!/usr/bin/env python
"""Cloud sync benchmark: prints figures, asserts nothing.

Starts moto's server (`moto_server -H 127.0.0.1 -p <port>`) standing in for
AWS, seeds one Cloud Map namespace with `--instances` (10,000) instances over
`--services` (20) services (custom health checks on), then runs the sync
engine in this process (`clouds.domain.sync.sync_cloud_account`, exactly what
a Celery worker runs) on a database of its own:

1. the first sync, which imports every instance;
2. `--resyncs` (3) no-change re-syncs: each must create, update and remove
   nothing; the global index before and after shows whether it wrote anything.

For each: wall time, the AWS API calls the run recorded (each paged call once)
and the catalog counts. Run from the repository root:

    .venv/bin/python bench/cloudsync.py                       # SQLite (embedded default)
    .venv/bin/python bench/cloudsync.py --database postgres   # a fresh PostgreSQL database

Progress goes to stderr, the figures to stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/cloudsync.py`, the script's folder comes first on sys.path and
# bench/registry.py would shadow the `registry` package: put the repo root there instead.
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "bench":
    sys.path.pop(0)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.aws import KEY_ID, SECRET, MotoServer  # noqa: E402
from tests.support.servers import create_database, drop_database  # noqa: E402


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seed(moto: MotoServer, instances: int, services: int, threads: int) -> None:
    sd = moto.client("servicediscovery")
    op = sd.create_http_namespace(Name="bench.local")
    ns = sd.get_operation(OperationId=op["OperationId"])["Operation"]["Targets"]["NAMESPACE"]
    ids = [
        sd.create_service(
            Name=f"svc-{s}", NamespaceId=ns, HealthCheckCustomConfig={"FailureThreshold": 1}
        )["Service"]["Id"]
        for s in range(services)
    ]

    def register(i: int) -> None:
        client = clients[i % threads]
        client.register_instance(
            ServiceId=ids[i % services],
            InstanceId=f"i-{i}",
            Attributes={
                "AWS_INSTANCE_IPV4": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                "AWS_INSTANCE_PORT": str(8000 + i % 1000),
                "version": f"v{i % 3}",
            },
        )

    clients = [moto.client("servicediscovery") for _ in range(threads)]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for n, _ in enumerate(pool.map(register, range(instances)), 1):
            if n % 2000 == 0:
                progress(f"  seeded {n:,} instances ({time.perf_counter() - start:.0f} s)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--services", type=int, default=20)
    p.add_argument("--resyncs", type=int, default=3)
    p.add_argument("--seed-threads", type=int, default=4)
    p.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
    )
    args = p.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="bench-cloudsync-"))
    database_url = create_database(args.postgres_url) if args.database == "postgres" else None
    moto = None
    try:
        progress("starting moto_server ...")
        moto = MotoServer().start(data_dir)
        progress(f"seeding {args.instances:,} Cloud Map instances in {args.services} services ...")
        seed(moto, args.instances, args.services, args.seed_threads)

        os.environ.update(
            {
                "DJANGO_SETTINGS_MODULE": "meshweb.settings",
                "MESH_DATA_DIR": str(data_dir),
                "MESH_ACL_ENABLED": "false",
                "MESH_SECRET_KEY": "bench-secret-key",
                "MESH_LOG_LEVEL": "WARNING",
            }
        )
        os.environ.pop("REDIS_URL", None)
        if database_url:
            os.environ["DATABASE_URL"] = database_url
        else:
            os.environ.pop("DATABASE_URL", None)
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        from clouds.domain import accounts, sync
        from registry.models import ServiceInstance
        from registry.txn import current_index

        accounts.create_account(
            name="bench",
            provider="aws",
            datacenter="dc1",
            regions=["us-east-1"],
            endpoint_url=moto.url,
            credentials={"access_key_id": KEY_ID, "secret_access_key": SECRET},
            import_config={"ec2": {"enabled": False}},
        )

        print(
            f"== cloud sync: {args.instances:,} Cloud Map instances, moto server, {args.database} =="
        )
        print(
            f"{'run':<18} {'time':>8} {'API calls':>10} {'created':>8} {'updated':>8} "
            f"{'removed':>8} {'index +':>8} {'status':>10}"
        )
        runs = [("first sync", 1), *[(f"no-change #{i}", 0) for i in range(1, args.resyncs + 1)]]
        for label, _ in runs:
            progress(f"{label} ...")
            before = current_index()
            start = time.perf_counter()
            run = sync.sync_cloud_account(sync.request_sync("bench").pk)
            seconds = time.perf_counter() - start
            wrote = current_index() - before
            print(
                f"{label:<18} {seconds:>7.2f}s {run.api_calls:>10,} {run.created:>8,} "
                f"{run.updated:>8,} {run.removed:>8,} {wrote:>8,} {run.status:>10}",
                flush=True,
            )
            if run.errors:
                progress(f"  errors: {run.errors[:3]}")
        count = ServiceInstance.objects.filter(node__name="cloud-bench").count()
        print(f"catalog instances on cloud-bench: {count:,}")
        print(
            "('index +' is how far the global index moved: 0 means the run wrote nothing; "
            "a sync's own run record is not a catalog write)"
        )
    finally:
        if moto is not None:
            moto.stop()
        try:
            from django.db import connections

            connections.close_all()
        except Exception:
            pass
        if database_url:
            drop_database(database_url)
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
