"""Every write made in an audit scope is recorded with who, what, before and after."""

from __future__ import annotations

import pytest

from registry import audit
from registry.domain import catalog
from registry.errors import BadRequest
from registry.models import AuditEntry

pytestmark = pytest.mark.django_db

OPERATOR = audit.Actor("9d4a8c2e-0000-4000-8000-000000000001", "operator token", "v1")


def test_a_registration_records_the_actor_and_the_state_after():
    node = catalog.ensure_local_node()
    with audit.scope(OPERATOR, "agent.service_register", "PUT", "/v1/agent/service/register"):
        catalog.register_agent_service(node, {"Name": "web", "ID": "web-1", "Port": 80})
    entry = AuditEntry.objects.get(action="service.register")
    assert (entry.actor, entry.actor_name, entry.via) == (OPERATOR.id, "operator token", "v1")
    assert (entry.resource_type, entry.resource_id) == ("service", "mesh-server/web-1")
    assert entry.before is None
    assert entry.after["Port"] == 80
    assert (entry.method, entry.path) == ("PUT", "/v1/agent/service/register")


def test_an_update_records_the_state_before_and_after():
    node = catalog.ensure_local_node()
    catalog.register_agent_service(node, {"Name": "web", "ID": "web-1", "Port": 80})
    with audit.scope(OPERATOR, "agent.service_register"):
        catalog.register_agent_service(node, {"Name": "web", "ID": "web-1", "Port": 81})
    entry = AuditEntry.objects.get(action="service.register")
    assert (entry.before["Port"], entry.after["Port"]) == (80, 81)


def test_writes_outside_a_scope_are_background_work_and_not_audited():
    node = catalog.ensure_local_node()
    catalog.register_agent_service(node, {"Name": "web", "Port": 80})
    assert AuditEntry.objects.count() == 0


def test_a_refused_write_leaves_no_audit_entry():
    node = catalog.ensure_local_node()
    with audit.scope(OPERATOR, "agent.service_register"), pytest.raises(BadRequest):
        catalog.register_agent_service(
            node, {"Name": "web", "Port": 80, "Check": {"TTL": 10.0, "Status": "bogus"}}
        )
    assert AuditEntry.objects.count() == 0


def test_entries_are_append_only():
    node = catalog.ensure_local_node()
    with audit.scope(OPERATOR, "agent.service_register"):
        catalog.register_agent_service(node, {"Name": "web", "Port": 80})
    entry = AuditEntry.objects.get()
    entry.action = "tampered"
    with pytest.raises(ValueError):
        entry.save()
    with pytest.raises(ValueError):
        entry.delete()


def test_binary_state_is_recorded_as_its_size():
    assert audit.jsonable({"Value": b"\x00\x01\x02"}) == {"Value": "<3 bytes>"}
