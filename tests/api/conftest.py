"""Fixtures for /api tests: a DRF client on the test database (fast cases) and
helpers that register through the domain, as /v1 would."""

from __future__ import annotations

import uuid

import pytest
from rest_framework.test import APIClient

from registry.domain import acl, catalog


@pytest.fixture
def api(db, settings) -> APIClient:
    """A client with ACLs off (everything allowed)."""
    settings.MESH_ACL_ENABLED = False
    return APIClient()


@pytest.fixture
def acl_api(db, settings) -> APIClient:
    """A client with ACLs on, default deny, and a management token created."""
    settings.MESH_ACL_ENABLED = True
    settings.MESH_ACL_DEFAULT_POLICY = "deny"
    # Each test's database restarts its index: drop identities cached by earlier tests.
    acl._cache.clear()
    acl.ensure_initial_management(MANAGEMENT)
    yield APIClient()
    acl._cache.clear()


MANAGEMENT = "6f1e1f1c-3f0a-4d5e-9c1b-2a7d3e4f5a6b"


def token_with(rules: str) -> str:
    """A new token whose one policy has `rules`; returns its secret."""
    policy = acl.create_policy(name=f"p-{uuid.uuid4().hex[:8]}", rules=rules)
    _token, secret = acl.create_token(policies=[{"ID": policy.id}])
    return secret


def register(
    node: str,
    name: str,
    *,
    service_id: str | None = None,
    dc: str = "dc1",
    address: str = "10.0.0.1",
    port: int = 80,
    tags: list[str] | None = None,
    kind: str = "",
    status: str | None = "passing",
    node_meta: dict[str, str] | None = None,
) -> None:
    """Register `name` on `node` through the catalog (as PUT /v1/catalog/register)."""
    sid = service_id or name
    spec: dict = {
        "Node": node,
        "Address": address,
        "Datacenter": dc,
        "Service": {"Name": name, "ID": sid, "Port": port, "Tags": tags or []},
    }
    if kind:
        spec["Service"]["Kind"] = kind
        spec["Service"]["Proxy"] = {"DestinationServiceName": name.removesuffix("-proxy")}
    if node_meta is not None:
        spec["NodeMeta"] = node_meta
    if status:
        spec["Checks"] = [
            {"CheckID": f"{sid}-check", "Name": f"{sid} check", "ServiceID": sid, "Status": status}
        ]
    catalog.catalog_register(spec)


def results(response) -> list[dict]:
    assert response.status_code == 200, response.content
    return response.json()["results"]
