"""The overview's reads (`registry.domain.dashboard`) on real rows."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from registry import decode
from registry.acl_rules import Authorizer
from registry.domain import catalog, dashboard

ALL = Authorizer.management()


@dataclass
class Stream:
    sent_version: int = 3
    acked_version: int = 2
    nacked_version: int = 0
    last_error: str = ""
    compiles: int = 3


def register(node: str, name: str, status: str = "passing", sidecar: bool = False) -> None:
    service = {"ID": name, "Service": name, "Port": 80}
    if sidecar:
        service = {
            "ID": f"{name}-sidecar-proxy",
            "Service": f"{name}-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {"DestinationServiceName": name},
        }
    body = {
        "Node": node,
        "Address": "127.0.0.1",
        "Service": service,
        "Check": {
            "CheckID": f"c-{service['ID']}",
            "Name": "c",
            "Status": status,
            "ServiceID": service["ID"],
            "Output": f"{status} output",
        },
    }
    catalog.catalog_register(decode.CATALOG_REGISTER(body))


@pytest.fixture
def mesh(db):
    register("n1", "web")
    register("n1", "web", sidecar=True)
    register("n2", "api", status="critical")
    register("n2", "api", sidecar=True)


def test_services_are_grouped_by_their_worst_instance(mesh):
    groups = dashboard.services_by_health(ALL)
    assert "api" in groups["critical"] and "web" in groups["passing"]
    assert not any("sidecar" in n for names in groups.values() for n in names)


def test_failing_checks_come_with_their_output(mesh):
    rows, total = dashboard.failing_checks(ALL)
    assert total == 1 and rows[0].output == "critical output"


def test_a_sidecar_that_refused_its_config_is_listed_with_the_error(mesh):
    streams = {
        ("n1", "web-sidecar-proxy"): Stream(),
        ("n2", "api-sidecar-proxy"): Stream(nacked_version=3, last_error="bad route regex"),
    }
    refused = dashboard.refused_configs(ALL, streams, {"n1", "n2"})
    assert [(r["service"], r["proxy_id"], r["config"]["error"]) for r in refused] == [
        ("api", "api-sidecar-proxy", "bad route regex")
    ]
    assert dashboard.refused_configs(ALL, {("n1", "web-sidecar-proxy"): Stream()}, set()) == []
