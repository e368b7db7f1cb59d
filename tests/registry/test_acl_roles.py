"""ACL roles: a role bundles policies and service/node identities; a token linking it
holds them all. Domain rules on the database, then `/v1/acl/role...` driven by the
unmodified py-consul client and `/api/acl/roles` against a real `mesh server`."""

from __future__ import annotations

import uuid

import consul
import pytest

from registry.domain import acl
from registry.errors import BadRequest, NotFound
from registry.models import ACLRole

# --- the domain ---------------------------------------------------------------------------


@pytest.fixture
def acl_on(settings, db):
    settings.MESH_ACL_ENABLED = True
    settings.MESH_ACL_DEFAULT_POLICY = "deny"
    settings.MESH_DC = "dc1"
    acl._cache.clear()
    acl.bootstrap()
    yield
    acl._cache.clear()


def test_a_tokens_rights_are_its_policies_plus_its_roles_policies_and_identities(acl_on):
    kv = acl.create_policy(name="kv-app", rules='key_prefix "app/" { policy = "write" }')
    role = acl.create_role(
        name="web-role",
        policies=[{"Name": "kv-app"}],
        service_identities=[{"ServiceName": "web"}],
        node_identities=[{"NodeName": "host-1", "Datacenter": "dc1"}],
    )
    _, secret = acl.create_token(roles=[{"ID": role.id}])
    authz = acl.resolve_token(secret).authorizer
    assert authz.key_write("app/x") and not authz.key_write("other")
    assert authz.service_write("web") and authz.service_write("web-sidecar-proxy")
    assert not authz.service_write("api") and authz.service_read("api")
    assert authz.node_read("any") and authz.node_write("host-1") and not authz.node_write("h2")
    assert not authz.acl_read()
    # A policy change reaches the token through its role (the cache is invalidated).
    acl.update_policy(kv.id, name="kv-app", rules='key_prefix "cfg/" { policy = "write" }')
    authz = acl.resolve_token(secret).authorizer
    assert authz.key_write("cfg/x") and not authz.key_write("app/x")
    # So does a role change, and a role's deletion.
    acl.update_role(role.id, name="web-role", service_identities=[{"ServiceName": "api"}])
    authz = acl.resolve_token(secret).authorizer
    assert authz.service_write("api") and not authz.service_write("web")
    assert not authz.key_write("cfg/x") and not authz.node_write("host-1")
    acl.delete_role(role.id)
    authz = acl.resolve_token(secret).authorizer
    assert not authz.service_write("api") and not authz.service_read("api")


def test_identities_scoped_to_other_datacenters_grant_nothing_here(acl_on):
    role = acl.create_role(
        name="elsewhere",
        service_identities=[{"ServiceName": "web", "Datacenters": ["dc2"]}],
        node_identities=[{"NodeName": "host-1", "Datacenter": "dc2"}],
    )
    _, secret = acl.create_token(roles=[{"Name": role.name}])
    authz = acl.resolve_token(secret).authorizer
    assert not authz.service_write("web") and not authz.node_write("host-1")


def test_a_role_linking_global_management_makes_its_tokens_management(acl_on):
    role = acl.create_role(name="admins", policies=[{"Name": acl.GLOBAL_MANAGEMENT_NAME}])
    _, secret = acl.create_token(roles=[{"ID": role.id}])
    assert acl.resolve_token(secret).authorizer.is_management()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "no Name is set"),
        ({"name": "bad name!"}, "invalid Name"),
        ({"name": "r", "policies": [{"Name": "ghost"}]}, 'No such ACL policy with name "ghost"'),
        ({"name": "r", "service_identities": [{"ServiceName": ""}]}, "missing the service name"),
        ({"name": "r", "service_identities": [{"ServiceName": "Web!"}]}, "invalid name"),
        ({"name": "r", "node_identities": [{"NodeName": "n1"}]}, "missing the datacenter"),
    ],
)
def test_bad_roles_are_refused_and_nothing_is_stored(acl_on, fields, message):
    with pytest.raises(BadRequest, match=message):
        acl.create_role(**fields)
    assert not ACLRole.objects.exists()


def test_role_names_are_unique_and_tokens_link_only_existing_roles(acl_on):
    first = acl.create_role(name="one")
    acl.create_role(name="two")
    with pytest.raises(BadRequest, match="already exists"):
        acl.create_role(name="one")
    with pytest.raises(BadRequest, match="already exists"):
        acl.update_role(first.id, name="two")
    with pytest.raises(BadRequest, match='No such ACL role with name "ghost"'):
        acl.create_token(roles=[{"Name": "ghost"}])
    with pytest.raises(NotFound):
        acl.update_role(str(uuid.uuid4()), name="three")
    assert acl.get_role(first.id).name == "one"


# --- /v1 with py-consul ---------------------------------------------------------------------


@pytest.mark.slow
def test_py_consul_creates_reads_updates_lists_and_deletes_roles(acl_server, unique):
    c = acl_server.consul()
    policy = c.acl.policy.create(unique("kv"), rules={"key_prefix": {"x/": {"policy": "read"}}})
    name = unique("role")
    role = c.acl.role.create(
        name,
        description="web deployers",
        policies_name=[policy["Name"]],
        service_identities=[{"ServiceName": "web", "Datacenters": ["dc1"]}],
    )
    assert role["Name"] == name and role["Description"] == "web deployers"
    assert role["Policies"] == [{"ID": policy["ID"], "Name": policy["Name"]}]
    assert role["ServiceIdentities"] == [{"ServiceName": "web", "Datacenters": ["dc1"]}]
    assert role["CreateIndex"] == role["ModifyIndex"] > 0
    assert c.acl.role.read(role["ID"])["Hash"] == role["Hash"]
    assert c.acl.role.read_by_name(name)["ID"] == role["ID"]
    assert role["ID"] in {r["ID"] for r in c.acl.role.list()}
    assert [r["ID"] for r in c.acl.role.list(policy=policy["ID"])] == [role["ID"]]

    updated = c.acl.role.update(
        role["ID"], name, node_identities=[{"NodeName": "host-1", "Datacenter": "dc1"}]
    )
    assert "Policies" not in updated and "ServiceIdentities" not in updated
    assert updated["NodeIdentities"] == [{"NodeName": "host-1", "Datacenter": "dc1"}]
    assert updated["ModifyIndex"] > role["ModifyIndex"]

    token = c.acl.token.create(roles_name=[name], description="via role")
    assert token["Roles"] == [{"ID": role["ID"], "Name": name}]
    assert [t["AccessorID"] for t in c.acl.token.list(role=role["ID"])] == [token["AccessorID"]]
    assert c.acl.role.delete(role["ID"]) is True
    assert c.acl.role.read(role["ID"]) is None  # py-consul's answer to a 404
    assert "Roles" not in c.acl.token.read(token["AccessorID"])


@pytest.mark.slow
def test_a_token_holding_only_a_service_identity_role_registers_that_service_only(
    acl_server, unique
):
    web, api = unique("web"), unique("api")
    admin = acl_server.consul()
    role = admin.acl.role.create(unique("deploy"), service_identities=[{"ServiceName": web}])
    secret = admin.acl.token.create(roles_id=[role["ID"]])["SecretID"]
    c = acl_server.consul(token=secret)
    assert c.agent.service.register(web, port=80) is True
    assert c.agent.service.register(f"{web}-sidecar-proxy", port=21000) is True
    with pytest.raises(consul.ACLPermissionDenied):
        c.agent.service.register(api, port=80)
    with pytest.raises(consul.ACLPermissionDenied):
        c.acl.role.list()
    _, services = admin.catalog.services()
    assert web in services and api not in services
    # The identity reads every service (what discovery needs).
    assert web in c.catalog.services()[1]
    # Moving the role to another service takes effect on the next request.
    admin.acl.role.update(role["ID"], role["Name"], service_identities=[{"ServiceName": api}])
    assert c.agent.service.register(api, port=80) is True
    with pytest.raises(consul.ACLPermissionDenied):
        c.agent.service.register(web, port=81)


@pytest.mark.slow
def test_bad_role_writes_are_refused_with_400_and_nothing_is_written(acl_server, unique):
    name = unique("bad")
    with acl_server.client() as h:
        before = h.get("/v1/acl/roles").json()
        for body in [
            {"Name": ""},
            {"Name": name, "Policies": [{"Name": "ghost"}]},
            {"Name": name, "ServiceIdentities": [{"ServiceName": "UPPER"}]},
            {"Name": name, "ServiceIdentities": "web"},
            {"Name": name, "ID": str(uuid.uuid4())},
            {"Name": name, "TemplatedPolicies": [{"TemplateName": "builtin/service"}]},
        ]:
            r = h.put("/v1/acl/role", json=body)
            assert r.status_code == 400, (body, r.text)
        r = h.put("/v1/acl/token", json={"Roles": [{"Name": "ghost"}]})
        assert r.status_code == 400 and "No such ACL role" in r.text
        assert h.get("/v1/acl/roles").json() == before
        assert h.get(f"/v1/acl/role/name/{name}").status_code == 404


@pytest.mark.slow
def test_the_rest_api_lists_creates_updates_and_deletes_roles(acl_server, unique):
    name = unique("rest")
    with acl_server.client() as h:
        r = h.post(
            "/api/acl/roles/",
            json={"name": name, "service_identities": [{"service_name": "web"}]},
        )
        assert r.status_code == 201, r.text
        role = r.json()
        assert role["service_identities"] == [{"service_name": "web", "datacenters": []}]
        r = h.patch(f"/api/acl/roles/{role['id']}/", json={"description": "changed"})
        assert r.status_code == 200 and r.json()["service_identities"] == role["service_identities"]
        names = [x["name"] for x in h.get("/api/acl/roles/", params={"q": name}).json()["results"]]
        assert names == [name]
        r = h.post("/api/acl/tokens/", json={"roles": [{"name": name}]})
        assert r.status_code == 201 and r.json()["roles"] == [{"id": role["id"], "name": name}]
        r = h.post("/api/acl/roles/", json={"name": unique("x"), "policies": [{"name": "ghost"}]})
        assert r.status_code == 400
        assert h.delete(f"/api/acl/roles/{role['id']}/").status_code == 204
        assert h.get(f"/api/acl/roles/{role['id']}/").status_code == 404
