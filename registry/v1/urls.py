"""Consul's `/v1` paths. Names after `:` may contain slashes where Consul's do."""

from django.urls import path

from registry.v1 import (
    acl,
    agent,
    catalog,
    connect_ca,
    coordinate,
    event,
    kv,
    operator,
    query,
    session,
    snapshot,
    status,
    telemetry,
    txn,
)
from registry.v1 import config as config_v1
from registry.v1 import intentions as intentions_v1
from registry.v1 import peering as peering_v1

urlpatterns = [
    # The most frequent reads first: every request tries the patterns in order.
    path("health/service/<path:name>", catalog.health_service),
    path("health/connect/<path:name>", catalog.health_connect),
    # agent
    path("agent/self", agent.self_),
    path("agent/metrics", telemetry.metrics),
    path("agent/health", telemetry.health),
    path("agent/members", agent.members),
    path("agent/services", agent.services),
    path("agent/service/register", agent.service_register),
    path("agent/service/deregister/<path:service_id>", agent.service_deregister),
    path("agent/service/maintenance/<path:service_id>", agent.service_maintenance),
    path("agent/service/<path:service_id>", agent.service),
    path("agent/maintenance", agent.node_maintenance),
    path("agent/checks", agent.checks),
    path("agent/check/register", agent.check_register),
    path("agent/check/deregister/<path:check_id>", agent.check_deregister),
    path("agent/check/pass/<path:check_id>", agent.check_pass),
    path("agent/check/warn/<path:check_id>", agent.check_warn),
    path("agent/check/fail/<path:check_id>", agent.check_fail),
    path("agent/check/update/<path:check_id>", agent.check_update),
    path("agent/health/service/id/<path:service_id>", agent.health_service_by_id),
    # catalog
    path("catalog/register", catalog.register),
    path("catalog/deregister", catalog.deregister),
    path("catalog/datacenters", catalog.datacenters),
    path("catalog/nodes", catalog.nodes),
    path("catalog/services", catalog.services),
    path("catalog/service/<path:name>", catalog.service),
    path("catalog/connect/<path:name>", catalog.connect),
    path("catalog/node/<path:name>", catalog.node),
    path("catalog/node-services/<path:name>", catalog.node_services),
    # health
    path("health/node/<path:name>", catalog.health_node),
    path("health/checks/<path:name>", catalog.health_checks),
    path("health/state/<str:state>", catalog.health_state),
    # status
    path("status/leader", status.leader),
    path("status/peers", operator.status_peers),
    *kv.urlpatterns,
    *txn.urlpatterns,
    *event.urlpatterns,
    *snapshot.urlpatterns,
    *query.urlpatterns,
    *coordinate.urlpatterns,
    *operator.urlpatterns,
    *session.urlpatterns,
    *acl.urlpatterns,
    *connect_ca.urlpatterns,
    *intentions_v1.urlpatterns,
    *config_v1.urlpatterns,
    *peering_v1.urlpatterns,
]
