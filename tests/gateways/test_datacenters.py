"""Datacenters under one control plane: `?dc=` reads, DNS in another datacenter,
`/v1/catalog/datacenters` nearest first, and failovers that can never trigger
flagged where they are configured."""

from __future__ import annotations

import json

import pytest

from registry.domain import datacenters, reads
from registry.domain.failover import failover_warnings
from tests.test_cli import ok, run_mesh

# --------------------------------------------------------------------------- order (database)


def test_datacenters_are_listed_nearest_first_by_the_estimate(db, settings):
    settings.MESH_DC = "use1"
    for name, provider, region in (
        ("use1", "aws", "us-east-1"),
        ("usw2", "aws", "us-west-2"),
        ("use1-b", "aws", "us-east-1"),
        ("gcp-us", "gcp", "us-central1"),
        ("euw1", "aws", "eu-west-1"),
        ("azure-eu", "azure", "westeurope"),
        ("lab", "onprem", ""),
    ):
        datacenters.create_datacenter(name, provider=provider, region=region)
    # Itself; same region; same provider nearby; another provider nearby; same
    # provider far; then what is both far and elsewhere (ties by name).
    assert reads.datacenters() == ["use1", "use1-b", "usw2", "gcp-us", "euw1", "azure-eu", "lab"]
    # From Europe the European datacenters come first.
    assert reads.datacenters("euw1")[:3] == ["euw1", "azure-eu", "use1"]


def test_regions_are_read_as_geographies():
    assert [datacenters.geography(r) for r in ("us-east-1", "europe-west1", "westeurope")] == [
        "na",
        "eu",
        "eu",
    ]
    assert datacenters.geography("") == datacenters.geography("rack-7") == ""


# --------------------------------------------------------------------------- failover warnings (pure)


def _resolver(failover: dict) -> dict:
    return {"Kind": "service-resolver", "Name": "api", "Failover": failover}


def test_a_failover_to_an_unknown_datacenter_or_to_itself_is_flagged():
    known = {"dc1", "dc2"}
    assert failover_warnings(_resolver({"*": {"Datacenters": ["dc2"]}}), known) == []
    found = failover_warnings(_resolver({"*": {"Datacenters": ["dc2", "dc9"]}}), known)
    assert len(found) == 1 and '"dc9"' in found[0] and "never trigger" in found[0]
    found = failover_warnings(
        _resolver({"*": {"Targets": [{"Datacenter": "mars"}, {"Service": "api"}]}}), known
    )
    assert len(found) == 2
    assert "Targets[0]" in found[0] and "mars" in found[0]
    assert "Targets[1]" in found[1] and "itself" in found[1]
    assert failover_warnings(_resolver({"*": {"Service": "api"}}), known) != []
    assert failover_warnings(_resolver({"*": {"Service": "api-backup"}}), known) == []
    assert failover_warnings({"Kind": "service-defaults", "Name": "api"}, known) == []


# --------------------------------------------------------------------------- a real server


@pytest.mark.slow
def test_put_v1_config_and_mesh_config_flag_a_failover_that_can_never_trigger(server, http, unique):
    name = unique("fo")
    body = {
        "Kind": "service-resolver",
        "Name": name,
        "Failover": {"*": {"Datacenters": ["nowhere"]}},
    }
    r = http.put("/v1/config", json=body)
    assert r.status_code == 200 and r.json() is True  # accepted, as Consul accepts it
    assert '"nowhere"' in r.headers["X-Mesh-Warning"]
    r = http.get(f"/v1/config/service-resolver/{name}")
    assert '"nowhere"' in r.headers["X-Mesh-Warning"]
    fine = {"Kind": "service-resolver", "Name": name, "ConnectTimeout": "3s"}
    assert "X-Mesh-Warning" not in http.put("/v1/config", json=fine).headers

    result = run_mesh("config", "write", "-", server=server, stdin=json.dumps(body).encode())
    assert f"Config entry written: service-resolver/{name}" in ok(result)
    assert 'Warning: Failover["*"].Datacenters names "nowhere"' in result.stderr
    result = run_mesh("config", "read", "-kind", "service-resolver", "-name", name, server=server)
    assert json.loads(ok(result))["Failover"] == body["Failover"]
    assert "never trigger" in result.stderr


@pytest.mark.slow
def test_catalog_health_and_dns_read_another_datacenter(server, http, unique):
    import dns.resolver

    node, svc = unique("n2"), unique("svc")
    r = http.put(
        "/v1/catalog/register",
        json={"Node": node, "Address": "10.9.0.7", "Datacenter": "dc2",
              "Service": {"Service": svc, "Port": 8080}},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert http.get(f"/v1/catalog/service/{svc}").json() == []
    entries = http.get(f"/v1/catalog/service/{svc}", params={"dc": "dc2"}).json()
    assert [(e["Node"], e["Datacenter"]) for e in entries] == [(node, "dc2")]
    health = http.get(f"/v1/health/service/{svc}", params={"dc": "dc2"}).json()
    assert [h["Node"]["Node"] for h in health] == [node]
    assert http.get(f"/v1/health/service/{svc}", params={"dc": "mars"}).status_code == 404
    names = http.get("/v1/catalog/datacenters").json()
    assert names[0] == "dc1" and "dc2" in names
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], server.dns_port
    answer = resolver.resolve(f"{svc}.service.dc2.consul", "A")
    assert [a.to_text() for a in answer] == ["10.9.0.7"]


# --------------------------------------------------------------------------- mesh dev


def test_mesh_dev_with_two_datacenters_defines_a_gateway_in_each_and_refuses_three(tmp_path):
    from meshweb import dev

    cfg = dev.DevConfig(data_dir=tmp_path, datacenters=2, gateway_port=18443, dc2_api_port=19092)
    dc1, dc2 = dev.service_definitions(cfg), dev.dc2_definitions(cfg)
    assert "gateway.json" in dc1 and "web.json" in dc1
    assert dc1["gateway.json"]["service"]["kind"] == "mesh-gateway"
    assert dc1["gateway.json"]["service"]["port"] == 18443
    assert dc2["api.json"]["service"]["port"] == 19092
    assert dc2["gateway.json"]["service"]["port"] == cfg.dc2_gateway_port
    assert "gateway.json" not in dev.service_definitions(dev.DevConfig(data_dir=tmp_path))
    result = run_mesh("dev", "--data-dir", str(tmp_path), "--datacenters", "3")
    assert result.returncode == 2 and "--datacenters must be 1 or 2" in result.stderr
