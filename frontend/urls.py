"""The web UI's routes, under `/ui/` (`/ui/events` is served by `frontend.events`)."""

from django.urls import path

from frontend.views import (
    acl,
    audit,
    intentions,
    kv,
    nodes,
    overview,
    security,
    services,
    session,
    topology,
    traffic,
)

app_name = "ui"

urlpatterns = [
    path("", overview.overview, name="overview"),
    path("login", session.login, name="login"),
    path("logout", session.logout, name="logout"),
    path("services", services.service_list, name="services"),
    path("services/<str:name>", services.service_detail, name="service"),
    path("metrics/services/<str:name>/series", services.service_series, name="service-series"),
    path("metrics/services/<str:name>", services.service_metrics, name="service-metrics"),
    path(
        "peers/<str:peer>/services/<str:name>",
        services.imported_service,
        name="imported-service",
    ),
    path("metrics/edges", services.edge_metrics, name="edge-metrics"),
]

urlpatterns += [
    path("intentions", intentions.intention_list, name="intentions"),
    path("intentions/matrix", intentions.intention_matrix, name="intention-matrix"),
    path("intentions/check", intentions.intention_check, name="intention-check"),
    path("intentions/new", intentions.intention_edit, name="intention-new"),
    path("intentions/<str:intention_id>/edit", intentions.intention_edit, name="intention-edit"),
    path(
        "intentions/<str:intention_id>/delete", intentions.intention_delete, name="intention-delete"
    ),
]

urlpatterns += [
    path("traffic", traffic.traffic_index, name="traffic"),
    path("traffic/go", traffic.traffic_go, name="traffic-go"),
    path("traffic/<str:name>", traffic.traffic_service, name="traffic-service"),
    path("traffic/<str:name>/<str:short>", traffic.traffic_edit, name="traffic-edit"),
]

urlpatterns += [
    path("nodes", nodes.node_list, name="nodes"),
    path("nodes/add", nodes.add_host, name="add-host"),
    path("nodes/join-tokens", nodes.join_token_list, name="join-tokens"),
    path(
        "nodes/join-tokens/<str:token_id>/revoke",
        nodes.join_token_revoke,
        name="join-token-revoke",
    ),
    path("nodes/<str:name>", nodes.node_detail, name="node"),
]

urlpatterns += [
    path("kv", kv.kv_browse, name="kv"),
    path("kv/edit", kv.kv_edit, name="kv-edit"),
    path("kv/delete", kv.kv_delete, name="kv-delete"),
]

urlpatterns += [
    path("acl", acl.acl_index, name="acl"),
    path("acl/tokens/<str:accessor_id>/delete", acl.token_delete, name="acl-token-delete"),
    path("acl/tokens/<str:accessor_id>", acl.token_edit, name="acl-token-edit"),
    path("acl/roles", acl.role_list, name="acl-roles"),
    path("acl/roles/<str:role_id>/delete", acl.role_delete, name="acl-role-delete"),
    path("acl/roles/<str:role_id>", acl.role_edit, name="acl-role-edit"),
    path("acl/policies/<str:policy_id>/delete", acl.policy_delete, name="acl-policy-delete"),
]

urlpatterns += [
    path("audit", audit.audit, name="audit"),
    path("security", security.security, name="security"),
    path("security/rotate", security.rotate, name="ca-rotate"),
]

urlpatterns += [
    path("topology", topology.topology, name="topology"),
    path("topology.json", topology.topology_json, name="topology-json"),
]
