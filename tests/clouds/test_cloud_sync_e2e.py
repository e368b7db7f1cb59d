"""Cloud sync end to end: moto's server standing in for AWS, a real `mesh server`,
the `mesh cloud` CLI, and the catalog read back through the unmodified py-consul client.

One moto and one control plane for the module; the tests run in order and
build on each other (seed, import, re-sync, delete, faults, export).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.aws import KEY_ID, SECRET, MotoServer, ThrottlingProxy, seed_cloud_map, seed_ec2
from tests.support.servers import ROOT, make_server, postgres_url, require

pytestmark = pytest.mark.slow

NODE = "cloud-aws1"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoServer().start(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(moto):
    p = ThrottlingProxy(moto.port).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    server = make_server(
        tmp_path_factory.mktemp("cp"),
        acl=True,
        # Three attempts per call: a fault that outlasts them shows within seconds.
        # A short lease: a run killed with its server gives the account back soon.
        extra_env={
            "MESH_CLOUD_MAX_ATTEMPTS": "3",
            "MESH_CLOUD_TICK_SECONDS": "3600",
            "MESH_CLOUD_SYNC_LEASE_SECONDS": "10",
            # An account without credentials must not look for an instance role off this
            # host (botocore would ask 169.254.169.254): the environment has none.
            "AWS_EC2_METADATA_DISABLED": "true",
        },
    )
    yield server
    server.close()


def cli(mesh, *args: str, check: bool = True, stdin: str | None = None):
    proc = subprocess.run(
        [sys.executable, "-m", "meshweb.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        input=stdin,
        env={"PATH": "/usr/bin:/bin", "MESH_HTTP_ADDR": mesh.addr, "MESH_HTTP_TOKEN": mesh.token},
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def sync(mesh, name: str, *, ok: bool | None = True) -> dict:
    proc = cli(mesh, "cloud", "sync", "-format", "json", name, check=False)
    run = json.loads(proc.stdout)
    if ok is not None:
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return run


def instances_on(consul, node: str) -> dict[str, dict]:
    _, data = consul.catalog.node(node)
    return dict((data or {}).get("Services") or {})


@pytest.fixture(scope="module")
def seeded(moto, mesh):
    cloud_map = seed_cloud_map(moto, "prod.local", {"web": 10, "api": 10, "db": 5})
    ec2_ids = seed_ec2(moto, {"batch": 6, "cache": 4})
    # An untagged instance: never imported.
    moto.client("ec2").run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)
    sd = moto.client("servicediscovery")
    sd.update_instance_custom_health_status(
        ServiceId=cloud_map.services["api"], InstanceId="api-7", Status="UNHEALTHY"
    )
    # A mesh service of the account's datacenter to export, healthy.
    c = mesh.consul()
    c.catalog.register(
        "orders-host",
        "192.0.2.20",
        service={"Service": "orders", "ID": "orders-1", "Port": 7070},
        check={
            "CheckID": "orders-alive",
            "ServiceID": "orders-1",
            "Name": "alive",
            "Status": "passing",
        },
    )
    cli(
        mesh,
        "cloud",
        "add",
        "-name",
        "aws1",
        "-datacenter",
        "dc1",
        "-region",
        "us-east-1",
        "-endpoint-url",
        moto.url,
        "-access-key-id",
        KEY_ID,
        "-secret-access-key",
        "-",
        "-export-namespace",
        "mesh.local",
        "-create-namespace",
        "-export-service",
        "orders",
        stdin=SECRET + "\n",
    )
    return cloud_map, ec2_ids


def test_a_sync_imports_exactly_the_cloud_map_and_tagged_ec2_instances(mesh, moto, seeded):
    cloud_map, ec2_ids = seeded
    run = sync(mesh, "aws1")
    assert run["status"] == "succeeded", run
    assert (run["created"], run["updated"], run["removed"]) == (35, 0, 0)
    assert run["errors"] == []
    assert run["exported_created"] == 1
    assert run["api_calls"] > 0 and run["retries"] == 0
    c = mesh.consul()
    services = instances_on(c, NODE)
    assert len(services) == 35
    by_name: dict[str, int] = {}
    for s in services.values():
        by_name[s["Service"]] = by_name.get(s["Service"], 0) + 1
    assert by_name == {"web": 10, "api": 10, "db": 5, "batch": 6, "cache": 4}

    _, web = c.health.service("web")
    assert len(web) == 10
    web3 = next(e for e in web if e["Service"]["Meta"]["aws-instance-id"] == "web-3")
    assert web3["Service"]["Address"] == "10.0.0.4"
    assert web3["Service"]["Port"] == 8003
    meta = web3["Service"]["Meta"]
    assert meta["version"] == "v0"
    assert meta["external-source"] == "aws"
    assert meta["mesh-cloud-account"] == "aws1"
    assert meta["aws-namespace"] == "prod.local"
    assert meta["aws-service-id"] == cloud_map.services["web"]
    assert web3["Node"]["Node"] == NODE and web3["Node"]["Datacenter"] == "dc1"
    assert [ch["Status"] for ch in web3["Checks"]] == ["passing"]

    _, api = c.health.service("api")
    status = {e["Service"]["Meta"]["aws-instance-id"]: e["Checks"][0]["Status"] for e in api}
    assert status["api-7"] == "critical"
    assert sorted(k for k, v in status.items() if v == "passing") == sorted(
        f"api-{i}" for i in range(10) if i != 7
    )
    _, passing_api = c.health.service("api", passing=True)
    assert len(passing_api) == 9

    _, batch = c.health.service("batch")
    assert sorted(e["Service"]["Meta"]["aws-ec2-instance-id"] for e in batch) == sorted(ec2_ids[:6])
    assert all(e["Service"]["Port"] == 9000 and e["Service"]["Address"] for e in batch)
    # The exported mesh service was not imported back.
    _, orders = c.health.service("orders")
    assert [e["Node"]["Node"] for e in orders] == ["orders-host"]


def test_an_export_registers_the_mesh_service_in_cloud_map_with_its_health(mesh, moto, seeded):
    sd = moto.client("servicediscovery")
    found = sd.discover_instances(NamespaceName="mesh.local", ServiceName="orders")["Instances"]
    assert len(found) == 1
    inst = found[0]
    assert inst["Attributes"]["AWS_INSTANCE_IPV4"] == "192.0.2.20"
    assert inst["Attributes"]["AWS_INSTANCE_PORT"] == "7070"
    assert inst["Attributes"]["mesh-export-account"] == "aws1"
    assert inst["HealthStatus"] == "HEALTHY"
    # The service fails its check: the next sync reports it unhealthy.
    mesh.consul().catalog.register(
        "orders-host",
        "192.0.2.20",
        check={
            "CheckID": "orders-alive",
            "ServiceID": "orders-1",
            "Name": "alive",
            "Status": "critical",
        },
    )
    run = sync(mesh, "aws1")
    assert (run["exported_created"], run["exported_updated"], run["exported_removed"]) == (0, 1, 0)
    assert (run["created"], run["updated"], run["removed"]) == (0, 0, 0)
    found = sd.discover_instances(NamespaceName="mesh.local", ServiceName="orders")["Instances"]
    assert [i["HealthStatus"] for i in found] == ["UNHEALTHY"]


def test_a_second_sync_changes_nothing_and_writes_nothing(mesh, seeded):
    c = mesh.consul()
    before, _ = c.catalog.services()
    index_before = mesh.client().get("/v1/catalog/services").headers["X-Consul-Index"]
    run = sync(mesh, "aws1")
    assert run["status"] == "succeeded"
    counts = [run[k] for k in ("created", "updated", "removed")]
    counts += [run[k] for k in ("exported_created", "exported_updated", "exported_removed")]
    assert counts == [0, 0, 0, 0, 0, 0]
    assert mesh.client().get("/v1/catalog/services").headers["X-Consul-Index"] == index_before
    assert len(instances_on(c, NODE)) == 35


def test_an_instance_deleted_in_aws_leaves_at_the_next_sync(mesh, moto, seeded):
    cloud_map, ec2_ids = seeded
    moto.client("servicediscovery").deregister_instance(
        ServiceId=cloud_map.services["web"], InstanceId="web-3"
    )
    moto.client("ec2").terminate_instances(InstanceIds=[ec2_ids[0]])
    run = sync(mesh, "aws1")
    assert (run["created"], run["updated"], run["removed"]) == (0, 0, 2)
    c = mesh.consul()
    _, web = c.health.service("web")
    assert "web-3" not in {e["Service"]["Meta"]["aws-instance-id"] for e in web}
    assert len(web) == 9
    _, batch = c.health.service("batch")
    assert ec2_ids[0] not in {e["Service"]["Meta"]["aws-ec2-instance-id"] for e in batch}
    assert len(instances_on(c, NODE)) == 33


def test_bad_items_are_recorded_and_the_rest_applied_once(mesh, moto, seeded):
    cloud_map, _ = seeded
    sd = moto.client("servicediscovery")
    web = cloud_map.services["web"]
    sd.register_instance(
        ServiceId=web, InstanceId="no-address", Attributes={"AWS_INSTANCE_PORT": "80"}
    )
    sd.register_instance(
        ServiceId=web,
        InstanceId="bad-port",
        Attributes={"AWS_INSTANCE_IPV4": "10.9.9.9", "AWS_INSTANCE_PORT": "eighty"},
    )
    sd.register_instance(
        ServiceId=web,
        InstanceId="web-new",
        Attributes={"AWS_INSTANCE_IPV4": "10.9.9.10", "AWS_INSTANCE_PORT": "8080"},
    )
    # "payments" is an agent's service: a tagged EC2 instance may not join it.
    c = mesh.consul()
    c.agent.service.register("payments", service_id="payments-1", port=6000)
    seed_ec2(moto, {"payments": 1})
    run = sync(mesh, "aws1")
    assert run["status"] == "succeeded"
    assert (run["created"], run["updated"], run["removed"]) == (1, 0, 0)
    messages = sorted(e["message"] for e in run["errors"])
    assert len(messages) == 3, messages
    assert any("no-address" in m and "no address (AWS_INSTANCE_IPV4)" in m for m in messages)
    assert any("bad-port" in m and "malformed port" in m and "'eighty'" in m for m in messages)
    assert any('service "payments" is registered by mesh agents' in m for m in messages)
    _, payments = c.health.service("payments")
    assert [e["Service"]["ID"] for e in payments] == ["payments-1"]
    # A second run records the same problems and registers nothing twice.
    again = sync(mesh, "aws1")
    assert (again["created"], again["updated"], again["removed"]) == (0, 0, 0)
    assert len(again["errors"]) == 3
    _, web_now = c.health.service("web")
    assert len(web_now) == 10


def test_throttling_is_retried_with_backoff_and_recorded(mesh, moto, proxy):
    seed_cloud_map(moto, "edge.local", {"edge": 2}, health=False)
    cli(
        mesh,
        "cloud",
        "add",
        "-name",
        "throttled",
        "-datacenter",
        "dc1",
        "-region",
        "us-east-1",
        "-endpoint-url",
        proxy.url,
        "-access-key-id",
        KEY_ID,
        "-secret-access-key",
        SECRET,
        "-namespace",
        "edge.local",
        "-no-ec2",
    )
    proxy.throttle("ListInstances", 2)
    run = sync(mesh, "throttled")
    assert run["status"] == "succeeded", run
    assert proxy.refused.get("ListInstances") == 2
    assert run["retries"] == 2
    assert any("ListInstances: retried 2 time(s)" in n for n in run["notes"]), run["notes"]
    assert run["created"] == 2
    # A fault that outlasts the retries fails the run and changes nothing.
    c = mesh.consul()
    index_before = mesh.client().get("/v1/catalog/services").headers["X-Consul-Index"]
    proxy.throttle("ListInstances", 10)
    failed = sync(mesh, "throttled", ok=False)
    assert failed["status"] == "failed"
    assert any("ThrottlingException" in e["message"] for e in failed["errors"]), failed["errors"]
    assert proxy.refused["ListInstances"] == 2 + 3, failed  # three attempts, then it gave up
    assert failed["retries"] == 2, failed
    assert any("ListInstances: retried 2 time(s)" in n and "gave up" in n for n in failed["notes"])
    assert len(instances_on(c, "cloud-throttled")) == 2
    assert mesh.client().get("/v1/catalog/services").headers["X-Consul-Index"] == index_before
    proxy.throttle("ListInstances", 0)


def test_runs_are_listed_newest_first_and_never_show_a_secret(mesh):
    with mesh.client() as http:
        runs = http.get("/api/clouds/aws1/runs/").json()["results"]
        account = http.get("/api/clouds/aws1/").json()
        audit = http.get("/api/audit/", params={"limit": 1000}).text
    assert [r["id"] for r in runs] == sorted((r["id"] for r in runs), reverse=True)
    assert len(runs) >= 5 and all(r["finished_at"] for r in runs)
    assert account["credentials"] == "stored"
    assert SECRET not in json.dumps(account) and SECRET not in json.dumps(runs)
    assert SECRET not in audit and "cloud.account.create" in audit
    assert SECRET not in mesh.log()
    shown = cli(mesh, "cloud", "show", "aws1").stdout
    assert "Credentials:  stored" in shown and SECRET not in shown


def test_bad_input_is_refused_with_a_message(mesh, moto):
    bad_region = cli(
        mesh,
        "cloud",
        "add",
        "-name",
        "x",
        "-datacenter",
        "dc1",
        "-region",
        "mars-north-1",
        check=False,
    )
    assert bad_region.returncode != 0
    assert "unknown AWS region(s): mars-north-1" in bad_region.stderr
    bad_key = cli(
        mesh,
        "cloud",
        "add",
        "-name",
        "x",
        "-datacenter",
        "dc1",
        "-region",
        "us-east-1",
        "-access-key-id",
        "not a key",
        "-secret-access-key",
        "s",
        check=False,
    )
    assert bad_key.returncode != 0 and "access_key_id" in bad_key.stderr
    dup = cli(
        mesh,
        "cloud",
        "add",
        "-name",
        "aws1",
        "-datacenter",
        "dc1",
        "-region",
        "us-east-1",
        check=False,
    )
    assert dup.returncode != 0 and 'Cloud account "aws1" already exists' in dup.stderr
    with mesh.client() as http:
        r = http.post(
            "/api/clouds/", json={"name": "y", "datacenter": "dc1", "regions": "us-east-1"}
        )
        assert r.status_code == 400 and "error" in r.json()
        assert http.post("/api/clouds/nope/sync").status_code == 404
    with mesh.client(token="") as anonymous:  # ACLs on: no operator token, no accounts
        denied = anonymous.get("/api/clouds/")
        assert denied.status_code == 403 and "operator:read" in denied.json()["error"]
        assert anonymous.post("/api/clouds/aws1/sync").status_code == 403
    with mesh.client() as http:
        assert http.get("/api/clouds/").json()["count"] == 2
    # Without credentials (the server's environment has none) a sync fails with a message.
    cli(
        mesh,
        "cloud",
        "add",
        "-name",
        "nocreds",
        "-datacenter",
        "dc1",
        "-region",
        "us-east-1",
        "-endpoint-url",
        moto.url,
    )
    run = sync(mesh, "nocreds", ok=False)
    assert run["status"] == "failed"
    assert "no AWS credentials" in run["errors"][0]["message"]
    removed = cli(mesh, "cloud", "remove", "nocreds")
    assert "Removed cloud account nocreds" in removed.stdout


def test_removing_an_account_removes_what_it_imported(mesh):
    c = mesh.consul()
    assert len(instances_on(c, "cloud-throttled")) == 2
    cli(mesh, "cloud", "remove", "throttled")
    assert instances_on(c, "cloud-throttled") == {}
    assert len(instances_on(c, NODE)) == 34  # the other account's imports stay
    listed = cli(mesh, "cloud", "list").stdout
    assert "aws1" in listed and "throttled" not in listed


# --- cloud gateway config ------------------------------------------------------------------


def register_gateway(c, node: str, dc: str, wan: str, port: int = 8443) -> None:
    c.catalog.register(
        node,
        wan,
        service={
            "Service": "mesh-gateway",
            "ID": "mesh-gateway",
            "Kind": "mesh-gateway",
            "Port": port,
            "TaggedAddresses": {"wan": {"Address": wan, "Port": port}},
        },
        dc=dc,
    )


def ingress(moto, group: str) -> list[tuple[int, str]]:
    sg = moto.client("ec2").describe_security_groups(GroupIds=[group])["SecurityGroups"][0]
    return sorted(
        (p["FromPort"], r["CidrIp"]) for p in sg["IpPermissions"] for r in p.get("IpRanges") or []
    )


def test_gateway_config_names_the_peers_and_apply_opens_the_security_group_once(mesh, moto):
    ec2 = moto.client("ec2")
    group = ec2.create_security_group(GroupName="mesh-gw", Description="mesh gateways")["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=group,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 22,
                "ToPort": 22,
                "IpRanges": [{"CidrIp": "192.0.2.0/24"}],
            }
        ],
    )
    cli(
        mesh,
        "cloud",
        "add",
        "-name",
        "edge",
        "-datacenter",
        "aws-east",
        "-region",
        "us-east-1",
        "-endpoint-url",
        moto.url,
        "-access-key-id",
        KEY_ID,
        "-secret-access-key",
        SECRET,
        "-no-cloud-map",
        "-no-ec2",
        "-security-group",
        group,
    )
    c = mesh.consul()
    register_gateway(c, "gw-east", "aws-east", "203.0.113.5")
    register_gateway(c, "gw-west", "gcp-west", "198.51.100.7")
    register_gateway(c, "gw-site", "onprem-1", "198.51.100.20")
    config = json.loads(cli(mesh, "gateway-config", "-format", "json", "aws-east").stdout)
    assert config["datacenter"] == "aws-east" and config["port"] == 8443
    assert (config["provider"], config["region"]) == ("aws", "us-east-1")
    assert config["sni_domain"].startswith("aws-east.internal.") and config["sni_domain"].endswith(
        ".mesh"
    )
    peers = {p["datacenter"]: (p["address"], p["port"], p["sni_domain"]) for p in config["peers"]}
    assert set(peers) == {"gcp-west", "onprem-1"}
    assert peers["gcp-west"][:2] == ("198.51.100.7", 8443)
    assert peers["gcp-west"][2].startswith("gcp-west.internal.")
    assert config["service_definition"]["service"]["kind"] == "mesh-gateway"
    assert config["agent_command"].startswith("mesh agent -join ")
    assert config["firewall"]["security_group"] == group
    assert sorted(r["cidr"] for r in config["firewall"]["ingress"]) == [
        "198.51.100.20/32",
        "198.51.100.7/32",
    ]

    first = cli(mesh, "gateway-config", "aws-east", "-apply").stdout
    plan, _, result = first.partition("Applied:")
    assert "+ tcp/8443 from 198.51.100.7/32" in plan and "+ tcp/8443 from 198.51.100.20/32" in plan
    assert "2 added, 0 removed" in result
    assert ingress(moto, group) == [
        (22, "192.0.2.0/24"),
        (8443, "198.51.100.20/32"),
        (8443, "198.51.100.7/32"),
    ]

    second = cli(mesh, "gateway-config", "aws-east", "-apply").stdout
    assert "no changes: the rules are in place" in second and "Applied" not in second
    assert len(ingress(moto, group)) == 3

    # A peer gateway leaves: its rule goes; the hand-made SSH rule stays.
    c.catalog.deregister("gw-site", dc="onprem-1")
    third = cli(mesh, "gateway-config", "aws-east", "-apply").stdout
    assert "- tcp/8443 from 198.51.100.20/32" in third and "0 added, 1 removed" in third
    assert ingress(moto, group) == [(22, "192.0.2.0/24"), (8443, "198.51.100.7/32")]


def test_gateway_config_refuses_an_unknown_datacenter_and_apply_without_an_account(mesh):
    unknown = cli(mesh, "gateway-config", "nowhere", check=False)
    assert unknown.returncode != 0 and 'Datacenter "nowhere" not found' in unknown.stderr
    no_account = cli(mesh, "gateway-config", "gcp-west", "-apply", check=False)
    assert no_account.returncode != 0
    assert "No cloud account with a gateway_security_group" in no_account.stderr


# --- a run killed half-way ------------------------------------------------------------------


def test_a_run_killed_half_way_leaves_the_catalog_as_it_was(mesh, moto, seeded):
    """The server dies (SIGKILL) while its sync is applying: new instances already
    inserted, one update waiting on a row the test holds locked. Nothing of it stays."""
    import psycopg

    require(postgres_url(), "PostgreSQL")
    cloud_map, _ = seeded
    web, db = cloud_map.services["web"], cloud_map.services["db"]
    sync(mesh, "aws1")  # take in what earlier tests added to "AWS" (edge.local)
    sd = moto.client("servicediscovery")
    for i in range(3):
        sd.register_instance(
            ServiceId=web,
            InstanceId=f"web-k{i}",
            Attributes={"AWS_INSTANCE_IPV4": f"10.7.0.{i + 1}", "AWS_INSTANCE_PORT": "80"},
        )
    sd.register_instance(
        ServiceId=web,
        InstanceId="web-0",
        Attributes={"AWS_INSTANCE_IPV4": "10.0.0.1", "AWS_INSTANCE_PORT": "8000", "version": "v9"},
    )
    sd.deregister_instance(ServiceId=db, InstanceId="db-0")
    c = mesh.consul()
    before = instances_on(c, NODE)
    web0 = f"aws-{web}-web-0"
    assert before[web0]["Meta"]["version"] == "v0"

    with psycopg.connect(mesh.database_url) as lock:
        lock.execute(
            "SELECT id FROM registry_serviceinstance WHERE service_id = %s FOR UPDATE", [web0]
        )
        with mesh.client() as http:
            killed = http.post("/api/clouds/aws1/sync").json()
        deadline = time.monotonic() + 120
        with psycopg.connect(mesh.database_url, autocommit=True) as watch:
            while True:
                waiting = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                ).fetchone()[0]
                if waiting:
                    break
                assert time.monotonic() < deadline, "the sync never reached the locked row"
                time.sleep(0.1)
            # Half-way: the new instances are inserted in the sync's open transaction.
            os.killpg(mesh.proc.pid, signal.SIGKILL)
            mesh.proc.wait(10)
        lock.rollback()
    mesh.start()

    assert instances_on(c, NODE) == before
    with mesh.client() as http:
        run = http.get(f"/api/clouds/aws1/runs/{killed['id']}/").json()
    assert run["status"] == "running" and run["phase"] == "applying"

    deadline = time.monotonic() + 120
    while True:  # the dead run's lease (10 s here) runs out, then a sync may start
        after = sync(mesh, "aws1", ok=None)
        if after["status"] != "skipped":
            break
        assert time.monotonic() < deadline
        time.sleep(1)
    assert after["status"] == "succeeded", after
    now = instances_on(c, NODE)
    assert sorted(set(now) - set(before)) == sorted(f"aws-{web}-web-k{i}" for i in range(3))
    assert sorted(set(before) - set(now)) == [f"aws-{db}-db-0"]
    assert (after["created"], after["updated"], after["removed"]) == (3, 1, 1)
    with mesh.client() as http:
        run = http.get(f"/api/clouds/aws1/runs/{killed['id']}/").json()
    assert run["status"] == "abandoned"
    assert "abandoned during applying" in run["errors"][-1]["message"]
    assert instances_on(c, NODE)[web0]["Meta"]["version"] == "v9"
