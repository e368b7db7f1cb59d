"""Shared fixtures: a small cast of real servers and clients.

`server` is one `mesh server` process (ACLs off) shared by the session: tests
use unique service names so they do not see each other. `acl_server` has ACLs
on with a known management token (`acl_server.token`).
"""

from __future__ import annotations

import uuid

import pytest

import meshproto  # noqa: F401 - first: turns off gRPC's fork support in this process
from tests.support.servers import MeshServer, make_server


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> MeshServer:
    srv = make_server(tmp_path_factory.mktemp("server"))
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def acl_server(tmp_path_factory) -> MeshServer:
    srv = make_server(tmp_path_factory.mktemp("acl-server"), acl=True)
    yield srv
    srv.close()


@pytest.fixture
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture
def consul_client(server):
    return server.consul()


@pytest.fixture
def unique():
    """A fresh name for each test's services and keys."""
    return lambda prefix="svc": f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def _fresh_process_caches():
    """Tests roll their database back: per-process caches of rows must not outlive a test."""
    yield
    from registry.domain import catalog, proxycfg

    catalog.forget_local_node()
    proxycfg.forget_shared_reads()
