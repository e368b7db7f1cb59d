"""`/v1/config` and `/v1/discovery-chain` on a real server: the unmodified
py-consul client, raw HTTP for Consul's exact answers and bad input, blocking
reads, ACLs, and `mesh config` as a user runs it."""

from __future__ import annotations

import threading
import time

import pytest

from tests.test_cli import ok, run_mesh

pytestmark = pytest.mark.slow


def kind_bodies(u: str) -> dict[str, tuple[str, dict]]:
    """One valid body per kind (names unique to the test); kind -> (name, body)."""
    web, api = f"web-{u}", f"api-{u}"
    return {
        "service-defaults": (
            web,
            {
                "Protocol": "http",
                "UpstreamConfig": {
                    "Defaults": {
                        "ConnectTimeoutMs": 3000,
                        "Limits": {"MaxConnections": 100, "MaxConcurrentRequests": 50},
                        "PassiveHealthCheck": {"Interval": "10s", "MaxFailures": 3},
                    }
                },
                "RateLimits": {
                    "InstanceLevel": {"RequestsPerSecond": 100, "RequestsMaxBurst": 200}
                },
            },
        ),
        "service-resolver": (
            web,
            {
                "ConnectTimeout": "3s",
                "Subsets": {
                    "v1": {"Filter": "Service.Meta.version == v1"},
                    "v2": {"Filter": "Service.Meta.version == v2", "OnlyPassing": True},
                },
                "Failover": {"*": {"Datacenters": ["dc2"]}},
                "LoadBalancer": {"Policy": "least_request"},
            },
        ),
        "service-splitter": (
            web,
            {
                "Splits": [
                    {"Weight": 90, "ServiceSubset": "v1"},
                    {"Weight": 10, "ServiceSubset": "v2"},
                ]
            },
        ),
        "service-router": (
            web,
            {
                "Routes": [
                    {
                        "Match": {
                            "HTTP": {
                                "PathPrefix": "/v2",
                                "Header": [{"Name": "x-beta", "Present": True}],
                            }
                        },
                        "Destination": {
                            "ServiceSubset": "v2",
                            "NumRetries": 2,
                            "RequestTimeout": "5s",
                        },
                    }
                ]
            },
        ),
        "service-intentions": (
            api,
            {"Sources": [{"Name": web, "Action": "allow"}, {"Name": "*", "Action": "deny"}]},
        ),
        "proxy-defaults": (
            "global",
            {"MeshGateway": {"Mode": "local"}, "Config": {"local_connect_timeout_ms": 1000}},
        ),
        "mesh": ("mesh", {"TransparentProxy": {"MeshDestinationsOnly": True}}),
    }


@pytest.fixture
def u(unique) -> str:
    return unique("c").split("-", 1)[1]


def test_py_consul_writes_reads_lists_and_deletes_every_kind_with_cas(consul_client, u):
    c = consul_client.config
    bodies = kind_bodies(u)
    written: dict[str, dict] = {}
    try:
        for kind, (name, body) in bodies.items():
            assert c.set(kind, name, body, cas=0) is True, kind
            got = c.get(kind, name)
            assert (got["Kind"], got["Name"]) == (kind, name)
            assert got["CreateIndex"] == got["ModifyIndex"] > 0
            written[kind] = got
            # cas=0 again: it exists now, so nothing is written.
            assert c.set(kind, name, body, cas=0) is False, kind
        sd = written["service-defaults"]
        assert sd["Protocol"] == "http"
        assert sd["UpstreamConfig"]["Defaults"]["PassiveHealthCheck"] == {
            "Interval": "10s",
            "MaxFailures": 3,
        }
        assert written["service-resolver"]["Subsets"]["v2"] == {
            "Filter": "Service.Meta.version == v2",
            "OnlyPassing": True,
        }
        assert written["service-splitter"]["Splits"][0] == {"Weight": 90, "ServiceSubset": "v1"}
        assert written["service-router"]["Routes"][0]["Destination"]["RequestTimeout"] == "5s"
        assert [s["Name"] for s in written["service-intentions"]["Sources"]] == [f"web-{u}", "*"]
        assert written["mesh"]["TransparentProxy"] == {"MeshDestinationsOnly": True}

        # A CAS write over the index just read succeeds once; a stale index is refused.
        name, _ = bodies["service-router"]
        idx = written["service-router"]["ModifyIndex"]
        new_router = {
            "Routes": [
                {"Match": {"HTTP": {"PathExact": "/beta"}}, "Destination": {"ServiceSubset": "v2"}}
            ]
        }
        assert c.set("service-router", name, new_router, cas=idx) is True
        assert c.set("service-router", name, new_router, cas=idx) is False
        assert c.get("service-router", name)["Routes"][0]["Match"] == {
            "HTTP": {"PathExact": "/beta"}
        }

        listed = c.list("service-defaults")
        assert f"web-{u}" in [e["Name"] for e in listed]
        only = c.list("service-resolver", filter_expr=f'Name == "web-{u}"')
        assert [e["Name"] for e in only] == [f"web-{u}"]
        assert c.list("service-intentions")  # the view lists destinations too
    finally:
        for kind in (
            "service-router",
            "service-splitter",
            "service-resolver",
            "service-defaults",
            "service-intentions",
            "proxy-defaults",
            "mesh",
        ):
            name = bodies[kind][0]
            current = c.get(kind, name)
            if current is None:
                continue
            # A stale CAS delete answers false and deletes nothing; the right one true.
            assert c.delete(kind, name, cas=current["ModifyIndex"] + 1000) is False
            assert c.delete(kind, name, cas=current["ModifyIndex"]) is True
            assert c.get(kind, name) is None


def test_py_consul_reads_a_compiled_discovery_chain(consul_client, u):
    c = consul_client.config
    web, admin = f"web-{u}", f"admin-{u}"
    c.set("service-defaults", web, {"Protocol": "http"})
    c.set("service-defaults", admin, {"Protocol": "http"})
    c.set(
        "service-resolver",
        web,
        {
            "DefaultSubset": "v1",
            "Subsets": {
                "v1": {"Filter": "Service.Meta.version == v1"},
                "v2": {"Filter": "Service.Meta.version == v2"},
            },
            "Failover": {"*": {"Datacenters": ["dc2"]}},
        },
    )
    c.set(
        "service-splitter",
        web,
        {"Splits": [{"Weight": 75, "ServiceSubset": "v1"}, {"Weight": 25, "ServiceSubset": "v2"}]},
    )
    c.set(
        "service-router",
        web,
        {
            "Routes": [
                {"Match": {"HTTP": {"PathPrefix": "/admin"}}, "Destination": {"Service": admin}}
            ]
        },
    )
    chain = consul_client.discovery_chain.get(web)["Chain"]
    assert (chain["ServiceName"], chain["Protocol"], chain["StartNode"]) == (
        web,
        "http",
        f"router:{web}",
    )
    routes = chain["Nodes"][f"router:{web}"]["Routes"]
    assert [r["NextNode"] for r in routes] == [f"resolver:{admin}.default.dc1", f"splitter:{web}"]
    splits = chain["Nodes"][f"splitter:{web}"]["Splits"]
    assert [(s["Weight"], s["NextNode"]) for s in splits] == [
        (75, f"resolver:v1.{web}.default.dc1"),
        (25, f"resolver:v2.{web}.default.dc1"),
    ]
    v1 = chain["Nodes"][f"resolver:v1.{web}.default.dc1"]["Resolver"]
    assert v1["Failover"] == {"Targets": [f"v1.{web}.default.dc2"]}
    target = chain["Targets"][f"v1.{web}.default.dc1"]
    assert target["Subset"] == {"Filter": "Service.Meta.version == v1"}
    assert target["SNI"].startswith(f"v1.{web}.default.dc1.internal.") and target["SNI"].endswith(
        ".mesh"
    )
    # Overrides go in a POST body, as Consul's.
    tcp = consul_client.discovery_chain.get(
        web, override_protocol="tcp", override_connect_timeout="9s"
    )["Chain"]
    assert tcp["Protocol"] == "tcp" and tcp["CustomizationHash"]
    assert tcp["StartNode"] == f"resolver:v1.{web}.default.dc1"
    assert tcp["Nodes"][tcp["StartNode"]]["Resolver"]["ConnectTimeout"] == "9s"
    # compile-dc: the chain as seen from another datacenter.
    dc2 = consul_client.discovery_chain.get(web, compile_dc="dc2")["Chain"]
    assert dc2["Datacenter"] == "dc2" and f"v1.{web}.default.dc2" in dc2["Targets"]


def test_consul_wire_details(http, u):
    name = f"wire-{u}"
    r = http.get(f"/v1/config/service-defaults/{name}")
    assert r.status_code == 404
    assert r.text == f'Config entry not found for "service-defaults" / "{name}"'
    assert int(r.headers["X-Consul-Index"]) >= 1
    r = http.put("/v1/config", json={"Kind": "service-defaults", "Name": name, "protocol": "grpc"})
    assert (r.status_code, r.json()) == (200, True)
    r = http.get(f"/v1/config/service-defaults/{name}")
    assert (
        r.json()["Protocol"] == "grpc"
        and int(r.headers["X-Consul-Index"]) == r.json()["ModifyIndex"]
    )
    r = http.get("/v1/config/service-defaults")
    assert r.status_code == 200 and "X-Consul-Index" in r.headers
    # A plain delete answers an empty object, a CAS delete true/false (Consul's habit).
    r = http.delete(f"/v1/config/service-defaults/{name}")
    assert (r.status_code, r.json()) == (200, {})
    r = http.get(f"/v1/discovery-chain/{name}")
    assert r.status_code == 200 and r.json()["Chain"]["StartNode"] == f"resolver:{name}.default.dc1"
    assert r.json()["Chain"]["Nodes"][f"resolver:{name}.default.dc1"]["Resolver"]["Default"] is True


def bad_cases(u: str) -> list[tuple[str, dict, str]]:
    web = f"bad-{u}"
    return [
        (
            "unknown kind",
            {"Kind": "ingress-gateways", "Name": web},
            "invalid config entry kind: 'ingress-gateways'",
        ),
        (
            "unknown field",
            {"Kind": "service-defaults", "Name": web, "Protocols": "http"},
            "Protocols: unknown field",
        ),
        (
            "wrong type",
            {"Kind": "service-defaults", "Name": web, "MaxInboundConnections": "many"},
            "MaxInboundConnections: expected an integer, got string",
        ),
        (
            "splits summing to 99",
            {
                "Kind": "service-splitter",
                "Name": web,
                "Splits": [{"Weight": 90}, {"Weight": 9, "Service": f"other-{u}"}],
            },
            "the weights must add up to 100, not 99",
        ),
        (
            "protocol mismatch",
            {
                "Kind": "service-router",
                "Name": web,
                "Routes": [{"Match": {"HTTP": {"PathPrefix": "/x"}}}],
            },
            f'service-router "{web}" needs an HTTP-family protocol (http, http2 or grpc), but service "{web}" has protocol "tcp"',
        ),
        (
            "hash policy without a value",
            {
                "Kind": "service-resolver",
                "Name": web,
                "Subsets": {"v1": {}},
                "DefaultSubset": "v1",
                "LoadBalancer": {"Policy": "maglev", "HashPolicies": [{"Field": "header"}]},
            },
            'LoadBalancer.HashPolicies[0].FieldValue: is required with Field "header"',
        ),
        (
            "malformed path regex",
            {
                "Kind": "service-router",
                "Name": web,
                "Routes": [{"Match": {"HTTP": {"PathRegex": "^/(a|b"}}}],
            },
            "Routes[0].Match.HTTP.PathRegex: invalid regular expression '^/(a|b'",
        ),
        ("not an object", ["service-defaults"], "expected a config entry (an object), got list"),
    ]


def test_bad_input_is_a_400_naming_the_problem_and_nothing_is_stored(http, u):
    for label, body, message in bad_cases(u):
        r = http.put("/v1/config", json=body)
        assert r.status_code == 400, (label, r.status_code, r.text)
        assert r.headers["Content-Type"].startswith("text/plain")
        assert message in r.text, (label, r.text)
        if (
            isinstance(body, dict)
            and body.get("Kind", "").startswith("service-")
            and body["Kind"] != "ingress-gateways"
        ):
            assert http.get(f"/v1/config/{body['Kind']}/{body['Name']}").status_code == 404, label
    r = http.put("/v1/config", content=b"{not json")
    assert r.status_code == 400 and "invalid JSON" in r.text
    r = http.put("/v1/config?cas=-1", json={"Kind": "service-defaults", "Name": f"bad-{u}"})
    assert r.status_code == 400 and "?cas" in r.text
    r = http.get("/v1/config/ingress-gateways")
    assert r.status_code == 400 and "invalid config entry kind" in r.text
    r = http.post(f"/v1/discovery-chain/bad-{u}", json={"OverrideProtocol": "udp"})
    assert r.status_code == 400 and "OverrideProtocol" in r.text


def test_subsets_and_referenced_resolvers_are_guarded(http, consul_client, u):
    c = consul_client.config
    web = f"guard-{u}"
    c.set("service-defaults", web, {"Protocol": "http"})
    c.set("service-resolver", web, {"Subsets": {"v1": {}, "v2": {}}})
    r = http.put(
        "/v1/config",
        json={
            "Kind": "service-splitter",
            "Name": web,
            "Splits": [
                {"Weight": 50, "ServiceSubset": "v1"},
                {"Weight": 50, "ServiceSubset": "v3"},
            ],
        },
    )
    assert r.status_code == 400 and f'service "{web}" does not have a subset named "v3"' in r.text
    assert c.get("service-splitter", web) is None
    assert c.set(
        "service-splitter",
        web,
        {"Splits": [{"Weight": 50, "ServiceSubset": "v1"}, {"Weight": 50, "ServiceSubset": "v2"}]},
    )
    r = http.delete(f"/v1/config/service-resolver/{web}")
    assert (
        r.status_code == 400
        and f'service-resolver "{web}" is still referenced by service-splitter "{web}"' in r.text
    )
    assert c.get("service-resolver", web)["Subsets"] == {"v1": {}, "v2": {}}
    r = http.put("/v1/config", json={"Kind": "service-defaults", "Name": web, "Protocol": "tcp"})
    assert r.status_code == 400 and "needs an HTTP-family protocol" in r.text
    assert c.get("service-defaults", web)["Protocol"] == "http"


def test_the_service_intentions_entry_and_connect_intentions_show_the_same_data(consul_client, u):
    web, api, db = f"web-{u}", f"api-{u}", f"db-{u}"
    assert consul_client.config.set(
        "service-intentions",
        db,
        {
            "Sources": [
                {"Name": web, "Action": "allow", "Description": "front"},
                {"Name": "*", "Action": "deny"},
            ]
        },
    )
    ixns = sorted(
        (i["SourceName"], i["Action"], i["Precedence"], i["Description"])
        for i in consul_client.connect.intentions.list()
        if i["DestinationName"] == db
    )
    assert ixns == [("*", "deny", 8, ""), (web, "allow", 9, "front")]
    assert consul_client.connect.intentions.check(web, db) is True
    assert consul_client.connect.intentions.check(api, db) is False
    # The other way round: an intention written by the intentions API is in the entry.
    assert consul_client.connect.intentions.upsert(api, db, action="allow")
    entry = consul_client.config.get("service-intentions", db)
    assert [(s["Name"], s["Action"]) for s in entry["Sources"]] == [
        (api, "allow"),
        (web, "allow"),
        ("*", "deny"),
    ]
    assert consul_client.connect.intentions.delete(web, db)
    entry = consul_client.config.get("service-intentions", db)
    assert [s["Name"] for s in entry["Sources"]] == [api, "*"]
    assert consul_client.config.delete("service-intentions", db, cas=entry["ModifyIndex"]) is True
    assert [i for i in consul_client.connect.intentions.list() if i["DestinationName"] == db] == []


def test_a_blocking_read_returns_when_the_entry_changes(http, server, u):
    name = f"block-{u}"
    assert (
        http.put(
            "/v1/config", json={"Kind": "service-resolver", "Name": name, "ConnectTimeout": "1s"}
        ).json()
        is True
    )
    first = http.get(f"/v1/config/service-resolver/{name}")
    index = int(first.headers["X-Consul-Index"])
    chain_index = int(http.get(f"/v1/discovery-chain/{name}").headers["X-Consul-Index"])
    results: dict = {}

    def watch(key: str, url: str) -> None:
        with server.client() as c:
            t0 = time.monotonic()
            r = c.get(url, timeout=30)
            results[key] = (r, time.monotonic() - t0)

    threads = [
        threading.Thread(
            target=watch,
            args=("entry", f"/v1/config/service-resolver/{name}?index={index}&wait=20s"),
        ),
        threading.Thread(
            target=watch, args=("chain", f"/v1/discovery-chain/{name}?index={chain_index}&wait=20s")
        ),
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert (
        http.put(
            "/v1/config", json={"Kind": "service-resolver", "Name": name, "ConnectTimeout": "2s"}
        ).json()
        is True
    )
    for t in threads:
        t.join(25)
    entry, waited = results["entry"]
    assert entry.json()["ConnectTimeout"] == "2s" and int(entry.headers["X-Consul-Index"]) > index
    assert waited < 10
    chain, _ = results["chain"]
    assert (
        chain.json()["Chain"]["Nodes"][f"resolver:{name}.default.dc1"]["Resolver"]["ConnectTimeout"]
        == "2s"
    )


def _token(acl_server, unique, rules: str) -> str:
    with acl_server.client() as admin:
        policy = admin.put("/v1/acl/policy", json={"Name": unique("pol"), "Rules": rules})
        assert policy.status_code == 200, policy.text
        token = admin.put("/v1/acl/token", json={"Policies": [{"ID": policy.json()["ID"]}]})
        return token.json()["SecretID"]


def test_acls_follow_each_kinds_rule(acl_server, unique, u):
    web = f"web-{u}"
    secret = _token(acl_server, unique, f'service "{web}" {{ policy = "write" }}')
    with acl_server.client(token=secret) as c:
        r = c.put("/v1/config", json={"Kind": "service-defaults", "Name": web, "Protocol": "http"})
        assert (r.status_code, r.json()) == (200, True)
        r = c.put(
            "/v1/config", json={"Kind": "service-defaults", "Name": f"api-{u}", "Protocol": "http"}
        )
        assert r.status_code == 403 and "lacks permission 'service:write'" in r.text
        r = c.put("/v1/config", json={"Kind": "proxy-defaults", "Name": "global"})
        assert r.status_code == 403 and "operator:write" in r.text
        r = c.put("/v1/config", json={"Kind": "mesh", "AllowByDefault": True})
        assert r.status_code == 403 and "mesh:write" in r.text
        assert c.get("/v1/config/proxy-defaults/global").status_code == 403
        assert c.get(f"/v1/discovery-chain/{web}").status_code == 200
        assert c.get(f"/v1/discovery-chain/api-{u}").status_code == 403
        listed = c.get("/v1/config/service-defaults").json()
        assert [e["Name"] for e in listed] == [web]
    with acl_server.client(token="") as anonymous:
        assert anonymous.get(f"/v1/config/service-defaults/{web}").status_code == 403


def test_mesh_config_commands_as_consuls(server, tmp_path, u):
    web = f"cli-{u}"
    defaults = tmp_path / "defaults.hcl"
    defaults.write_text(f'Kind = "service-defaults"\nName = "{web}"\nprotocol = "http"\n')
    resolver = tmp_path / "resolver.hcl"
    resolver.write_text(
        f"""
kind = "service-resolver"
name = "{web}"
connect_timeout = "4s"
subsets = {{
  v1 = {{ filter = "Service.Meta.version == v1" }}
  v2 = {{ filter = "Service.Meta.version == v2" }}
}}
"""
    )
    router = tmp_path / "router.hcl"
    router.write_text(
        f"""
Kind = "service-router"
Name = "{web}"
Routes = [
  {{
    Match {{
      HTTP {{
        PathPrefix = "/beta"
        Header = [{{ Name = "x-beta", Exact = "1" }}]
      }}
    }}
    Destination {{
      ServiceSubset = "v2"
      RetryOnStatusCodes = [503]
    }}
  }},
]
"""
    )
    for f in (defaults, resolver, router):
        out = ok(run_mesh("config", "write", str(f), server=server))
        assert out.startswith("Config entry written: ")
    read = ok(run_mesh("config", "read", "-kind", "service-router", "-name", web, server=server))
    assert '"PathPrefix": "/beta"' in read and '"ServiceSubset": "v2"' in read
    assert web in ok(run_mesh("config", "list", "-kind", "service-resolver", server=server)).split()
    # -cas with a stale index: not updated, exit 1.
    r = run_mesh("config", "write", "-cas", "-modify-index=1", str(router), server=server)
    assert (r.returncode, r.stderr.strip()) == (
        1,
        f"Config entry not updated: service-router/{web}",
    )
    # JSON from stdin.
    out = ok(
        run_mesh(
            "config",
            "write",
            "-",
            server=server,
            stdin=f'{{"Kind": "service-splitter", "Name": "{web}", "Splits": [{{"Weight": 100, "ServiceSubset": "v1"}}]}}'.encode(),
        )
    )
    assert out.strip() == f"Config entry written: service-splitter/{web}"
    # Bad input: the server's reason, one line, exit 1.
    bad = tmp_path / "bad.hcl"
    bad.write_text(f'Kind = "service-splitter"\nName = "{web}"\nSplits = [{{ Weight = 99 }}]\n')
    r = run_mesh("config", "write", str(bad), server=server)
    assert r.returncode == 1 and "the weights must add up to 100, not 99" in r.stderr
    r = run_mesh("config", "delete", "-kind", "service-resolver", "-name", web, server=server)
    assert r.returncode == 1 and "still referenced" in r.stderr
    ok(run_mesh("config", "delete", "-filename", str(router), server=server))
    ok(run_mesh("config", "delete", "-kind", "service-splitter", "-name", web, server=server))
    out = ok(run_mesh("config", "delete", "-kind", "service-resolver", "-name", web, server=server))
    assert out.strip() == f"Config entry deleted: service-resolver/{web}"
    r = run_mesh("config", "read", "-kind", "service-resolver", "-name", web, server=server)
    assert r.returncode == 1 and "404" in r.stderr
    r = run_mesh("config", "write", str(tmp_path / "missing.hcl"), server=server)
    assert r.returncode == 1 and "Failed to read file" in r.stderr
