"""The unmodified py-consul client against a real `mesh server`: the issue's
acceptance list for the Consul-compatible registry."""

from __future__ import annotations

import threading
import time

import consul
import pytest

pytestmark = pytest.mark.slow


def _passing_ids(c, name: str) -> list[str]:
    _, entries = c.health.service(name, passing=True)
    return [e["Service"]["ID"] for e in entries]


def test_a_service_with_a_ttl_check_appears_in_catalog_and_health(consul_client, unique):
    name = unique("web")
    consul_client.agent.service.register(
        name, service_id=name, port=8080, tags=["v1"], check=consul.Check.ttl("10s")
    )
    _, catalog_nodes = consul_client.catalog.service(name)
    assert [(n["ServiceName"], n["ServicePort"], n["ServiceTags"]) for n in catalog_nodes] == [
        (name, 8080, ["v1"])
    ]
    _, entries = consul_client.health.service(name)
    assert len(entries) == 1
    checks = {c["CheckID"]: c["Status"] for c in entries[0]["Checks"]}
    # New checks are critical until they pass; the node's serfHealth is passing.
    assert checks == {f"service:{name}": "critical", "serfHealth": "passing"}


def test_passing_filter_follows_a_ttl_check_through_pass_fail_pass(consul_client, unique):
    name = unique("api")
    consul_client.agent.service.register(
        name, service_id=name, port=9000, check=consul.Check.ttl("30s")
    )
    check_id = f"service:{name}"
    assert _passing_ids(consul_client, name) == []
    consul_client.agent.check.ttl_pass(check_id, notes="ok")
    assert _passing_ids(consul_client, name) == [name]
    consul_client.agent.check.ttl_fail(check_id, notes="down")
    assert _passing_ids(consul_client, name) == []
    _, entries = consul_client.health.service(name)
    service_check = next(c for c in entries[0]["Checks"] if c["CheckID"] == check_id)
    assert (service_check["Status"], service_check["Output"]) == ("critical", "down")
    consul_client.agent.check.ttl_pass(check_id)
    assert _passing_ids(consul_client, name) == [name]


def test_a_blocking_health_query_returns_within_a_second_of_a_registration(server, unique):
    name = unique("blocking")
    watcher, writer = server.consul(), server.consul()
    index, entries = watcher.health.service(name)
    assert entries == []
    result: dict = {}

    def watch() -> None:
        start = time.monotonic()
        result["answer"] = watcher.health.service(name, index=index, wait="30s")
        result["returned_at"] = time.monotonic()
        result["started_at"] = start

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.5)
    assert "answer" not in result, "the blocking query returned before anything changed"
    registered_at = time.monotonic()
    writer.agent.service.register(name, service_id=name, port=1234)
    t.join(10)
    new_index, entries = result["answer"]
    assert [e["Service"]["Port"] for e in entries] == [1234]
    assert int(new_index) > int(index)
    assert result["returned_at"] - registered_at < 1.0


def test_a_blocking_query_times_out_with_the_same_index(consul_client, unique):
    name = unique("idle")
    index, _ = consul_client.health.service(name)
    start = time.monotonic()
    again, entries = consul_client.health.service(name, index=index, wait="1s")
    elapsed = time.monotonic() - start
    assert entries == [] and again == index
    assert 1.0 <= elapsed < 2.5


def test_health_results_filter_by_service_meta(consul_client, unique):
    name = unique("meta")
    consul_client.agent.service.register(
        name, service_id=f"{name}-1", port=1, meta={"version": "1"}
    )
    consul_client.agent.service.register(
        name, service_id=f"{name}-2", port=2, meta={"version": "2"}
    )
    _, entries = consul_client.health.service(name, filter_expr='Service.Meta.version == "2"')
    assert [e["Service"]["ID"] for e in entries] == [f"{name}-2"]
    _, entries = consul_client.catalog.service(name, filter_expr='ServiceMeta.version != "2"')
    assert [e["ServiceID"] for e in entries] == [f"{name}-1"]


def test_a_sidecar_is_found_through_catalog_connect(consul_client, unique):
    name = unique("pay")
    consul_client.agent.service.register(
        name,
        service_id=name,
        port=7000,
        extra_checks=[],
        connect={
            "SidecarService": {
                "Proxy": {"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}]}
            }
        },
    )
    _, proxies = consul_client.catalog.connect(name)
    assert len(proxies) == 1
    proxy = proxies[0]
    assert proxy["ServiceKind"] == "connect-proxy"
    assert proxy["ServiceID"] == f"{name}-sidecar-proxy"
    assert proxy["ServiceProxy"]["DestinationServiceName"] == name
    assert proxy["ServiceProxy"]["LocalServicePort"] == 7000
    assert proxy["ServiceProxy"]["Upstreams"][0]["LocalBindPort"] == 9191
    assert 21000 <= proxy["ServicePort"] <= 21255
    # Deregistering the parent removes its sidecar.
    consul_client.agent.service.deregister(name)
    _, proxies = consul_client.catalog.connect(name)
    assert proxies == []
    assert f"{name}-sidecar-proxy" not in consul_client.agent.services()


def test_maintenance_mode_is_a_critical_check(consul_client, unique):
    name = unique("maint")
    consul_client.agent.service.register(name, service_id=name, port=1)
    consul_client.agent.service.maintenance(name, "true", reason="upgrading")
    _, entries = consul_client.health.service(name)
    maint = next(c for c in entries[0]["Checks"] if c["CheckID"] == f"_service_maintenance:{name}")
    assert (maint["Status"], maint["Notes"]) == ("critical", "upgrading")
    consul_client.agent.service.maintenance(name, "false")
    _, entries = consul_client.health.service(name)
    assert all(not c["CheckID"].startswith("_service_maintenance") for c in entries[0]["Checks"])


def test_catalog_register_and_deregister_an_external_node(consul_client, unique):
    node = unique("ext-node")
    service = {"Service": unique("ext"), "Port": 5432, "Tags": ["primary"]}
    assert (
        consul_client.catalog.register(node, "10.0.0.9", service=service, node_meta={"rack": "r1"})
        is True
    )
    _, nodes = consul_client.catalog.nodes(node_meta={"rack": "r1"})
    assert node in [n["Node"] for n in nodes]
    _, data = consul_client.catalog.node(node)
    assert data["Node"]["Address"] == "10.0.0.9"
    assert list(data["Services"]) == [service["Service"]]
    _, services = consul_client.catalog.services()
    assert services[service["Service"]] == ["primary"]
    assert consul_client.catalog.deregister(node) is True
    _, data = consul_client.catalog.node(node)
    assert data is None


def test_status_and_datacenters(consul_client, server):
    assert consul_client.status.leader() == server.addr
    assert consul_client.status.peers() == [server.addr]
    # Other tests on the shared server may add datacenters; ours is always there.
    assert "dc1" in consul_client.catalog.datacenters()
    assert consul_client.agent.self()["Config"]["Datacenter"] == "dc1"


def test_kv_put_get_recurse_binary_cas_and_delete(consul_client, unique):
    prefix = unique("app") + "/"
    assert consul_client.kv.put(prefix + "a", "1") is True
    assert consul_client.kv.put(prefix + "b", b"\x00\xffbinary") is True
    _, entry = consul_client.kv.get(prefix + "b")
    assert entry["Value"] == b"\x00\xffbinary"
    _, entries = consul_client.kv.get(prefix, recurse=True)
    assert [(e["Key"], e["Value"]) for e in entries] == [
        (prefix + "a", b"1"),
        (prefix + "b", b"\x00\xffbinary"),
    ]
    _, entry = consul_client.kv.get(prefix + "a")
    assert consul_client.kv.put(prefix + "a", "2", cas=entry["ModifyIndex"] + 1000) is False
    assert consul_client.kv.put(prefix + "a", "2", cas=entry["ModifyIndex"]) is True
    assert consul_client.kv.get(prefix + "a")[1]["Value"] == b"2"
    assert consul_client.kv.delete(prefix, recurse=True) is True
    assert consul_client.kv.get(prefix, recurse=True)[1] is None


def test_a_session_lock_is_taken_and_released(consul_client, unique):
    key = unique("locks") + "/leader"
    first = consul_client.session.create(name="a", ttl=30)
    second = consul_client.session.create(name="b", ttl=30)
    assert consul_client.kv.put(key, "a", acquire=first) is True
    assert consul_client.kv.put(key, "b", acquire=second) is False
    _, entry = consul_client.kv.get(key)
    assert entry["Session"] == first
    assert consul_client.kv.put(key, "a", release=first) is True
    assert consul_client.kv.put(key, "b", acquire=second) is True
    assert consul_client.kv.get(key)[1]["Session"] == second
    consul_client.session.destroy(first)
    consul_client.session.destroy(second)


def test_acl_refuses_an_anonymous_write_and_accepts_the_management_token(acl_server, unique):
    anonymous = acl_server.consul(token="")
    with pytest.raises(consul.ACLPermissionDenied):
        anonymous.agent.service.register(unique("denied"), port=1)
    name = unique("allowed")
    assert acl_server.consul().agent.service.register(name, port=1) is True
    # Reads return only what a token may see: anonymous sees nothing under default deny.
    _, services = anonymous.catalog.services()
    assert name not in services
    _, services = acl_server.consul().catalog.services()
    assert name in services
