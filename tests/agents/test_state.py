"""The agent's local state: Consul's sidecar defaults, stable ports, what SyncNode carries."""

from __future__ import annotations

import json

import pytest

from agents.state import LocalState, StateError, UnknownError
from meshproto.servicedefs import canonical_service


def web(**extra) -> dict:
    return canonical_service(
        {
            "name": "web",
            "port": 9090,
            "check": {"http": "http://127.0.0.1:9090/", "interval": "5s"},
            "connect": {
                "sidecar_service": {
                    "proxy": {"upstreams": [{"destination_name": "api", "local_bind_port": 9191}]}
                }
            },
            **extra,
        }
    )


def api() -> dict:
    return canonical_service({"name": "api", "port": 9091, "connect": {"sidecar_service": {}}})


def test_a_sidecar_gets_consuls_defaults(tmp_path):
    state = LocalState(tmp_path)
    state.rebuild([web()], [])
    sidecar = state.services["web-sidecar-proxy"]
    assert sidecar.definition["Name"] == "web-sidecar-proxy"
    assert sidecar.definition["Kind"] == "connect-proxy"
    assert sidecar.port == 21000
    assert sidecar.parent_id == "web"
    assert sidecar.definition["Proxy"] == {
        "DestinationServiceName": "web",
        "DestinationServiceID": "web",
        "LocalServiceAddress": "127.0.0.1",
        "LocalServicePort": 9090,
        "Upstreams": [
            {
                "DestinationType": "service",
                "LocalBindAddress": "127.0.0.1",
                "DestinationName": "api",
                "LocalBindPort": 9191,
            }
        ],
    }
    assert sorted(state.checks) == [
        "service:web",
        "service:web-sidecar-proxy:1",
        "service:web-sidecar-proxy:2",
    ]
    assert state.checks["service:web-sidecar-proxy:1"].definition["TCP"] == "127.0.0.1:21000"
    assert state.checks["service:web-sidecar-proxy:2"].definition["AliasService"] == "web"
    assert all(c.status == "critical" for c in state.checks.values())


def test_sidecar_ports_stay_with_their_sidecars_across_reloads_and_restarts(tmp_path):
    state = LocalState(tmp_path)
    state.rebuild([web(), api()], [])
    assert (state.services["web-sidecar-proxy"].port, state.services["api-sidecar-proxy"].port) == (
        21000,
        21001,
    )
    state.save()
    # web goes away and comes back after api: each keeps its port.
    state.rebuild([api()], [])
    state.rebuild([api(), web()], [])
    assert state.services["web-sidecar-proxy"].port == 21000
    restarted = LocalState(tmp_path)
    restarted.rebuild([api(), web()], [])
    assert restarted.services["api-sidecar-proxy"].port == 21001


def test_sync_carries_declared_services_with_inline_checks_and_the_expanded_sidecar(tmp_path):
    state = LocalState(tmp_path)
    state.rebuild([web()], [{"Name": "disk", "TTL": "30s"}])
    state.set_result("service:web", "passing", "HTTP GET ...: 200 OK")
    [service] = state.wire_services()
    assert service["ID"] == "web"
    assert service["Checks"] == [
        {
            "CheckID": "service:web",
            "Name": "Service 'web' check",
            "HTTP": "http://127.0.0.1:9090/",
            "Interval": "5s",
        }
    ]
    sidecar = service["Connect"]["SidecarService"]
    assert (sidecar["ID"], sidecar["Port"]) == ("web-sidecar-proxy", 21000)
    assert [c["CheckID"] for c in sidecar["Checks"]] == [
        "service:web-sidecar-proxy:1",
        "service:web-sidecar-proxy:2",
    ]
    wire = {c.check_id: c.wire() for c in state.checks.values()}
    assert wire["service:web"] == {
        "CheckID": "service:web",
        "Status": "passing",
        "Output": "HTTP GET ...: 200 OK",
    }
    assert wire["disk"]["TTL"] == "30s"
    assert wire["disk"]["Status"] == "critical"
    json.dumps(state.wire_services())  # it is JSON as it is


def test_api_registrations_persist_and_config_services_cannot_be_overwritten(tmp_path):
    state = LocalState(tmp_path)
    state.rebuild([web()], [])
    state.register_service(
        canonical_service({"name": "cache", "port": 6379, "check": {"ttl": "10s"}})
    )
    with pytest.raises(StateError):
        state.register_service(canonical_service({"name": "web", "port": 1}))
    with pytest.raises(StateError):
        state.deregister_service("web")
    with pytest.raises(UnknownError):
        state.deregister_service("nope")
    restarted = LocalState(tmp_path)
    restarted.rebuild([web()], [])
    assert "cache" in restarted.services
    assert restarted.checks["service:cache"].kind == "ttl"
    restarted.deregister_service("cache")
    assert "cache" not in LocalState(tmp_path).api_definitions


def test_maintenance_adds_a_critical_check_and_removing_it_restores(tmp_path):
    state = LocalState(tmp_path)
    state.rebuild([web()], [])
    state.set_maintenance("web", True, "deploying")
    check = state.checks["_service_maintenance:web"]
    assert (check.status, check.notes, check.service_id) == ("critical", "deploying", "web")
    state.set_maintenance("web", False, "")
    assert "_service_maintenance:web" not in state.checks


def test_a_duplicate_service_id_is_refused_and_the_previous_state_stays(tmp_path):
    state = LocalState(tmp_path)
    state.rebuild([web()], [])
    with pytest.raises(StateError, match="defined twice"):
        state.rebuild([web(), web()], [])
    assert sorted(state.services) == ["web", "web-sidecar-proxy"]


def test_replace_existing_checks_drops_the_checks_registered_apart(tmp_path):
    state = LocalState(tmp_path)
    state.rebuild([], [])
    state.register_service(canonical_service({"name": "q", "check": {"ttl": "10s"}}))
    state.register_check({"CheckID": "depth", "Name": "depth", "TTL": "10s", "ServiceID": "q"})
    state.register_service(canonical_service({"name": "q", "check": {"ttl": "20s"}}))
    assert sorted(state.checks) == ["depth", "service:q"]
    assert state.checks["service:q"].definition["TTL"] == "20s"
    state.register_service(canonical_service({"name": "q"}), replace_existing_checks=True)
    assert sorted(state.checks) == []


def test_a_check_id_used_twice_is_refused_as_the_control_plane_would(tmp_path):
    state = LocalState(tmp_path)
    state.rebuild([web()], [])
    with pytest.raises(StateError, match="defined in the config dir"):
        state.register_check({"CheckID": "service:web", "Name": "x", "TTL": "10s"})
    with pytest.raises(StateError, match="check ID 'service:web' is defined twice"):
        state.register_service(
            canonical_service({"name": "b", "check": {"id": "service:web", "ttl": "1s"}})
        )
    assert state.checks["service:web"].kind == "http"
    assert "b" not in state.services and "b" not in state.api_definitions
    state.register_check({"CheckID": "disk", "Name": "disk", "TTL": "10s"})
    with pytest.raises(StateError, match="check ID 'disk' is defined twice"):
        state.rebuild([web()], [{"CheckID": "disk", "Name": "disk", "TTL": "5s"}])
    assert state.checks["disk"].definition["TTL"] == "10s"
