"""The product REST API (`/api/...`), its OpenAPI schema and its docs."""

from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from registry.api import audit, ca, views
from registry.api import config_entries as config_entries_api
from registry.api import connect_status as connect_status_api
from registry.api import gateways as gateways_api
from registry.api import intentions as intentions_api
from registry.api import join_tokens as join_tokens_api
from registry.api import metrics as metrics_api
from registry.api import proxycfg as proxycfg_api
from registry.api.errors import not_found

app_name = "api"

router = SimpleRouter()
router.register("datacenters", views.DatacenterViewSet, basename="datacenter")
router.register("nodes", views.NodeViewSet, basename="node")
router.register("services", views.ServiceViewSet, basename="service")
router.register("instances", views.InstanceViewSet, basename="instance")
router.register("checks", views.CheckViewSet, basename="check")
router.register("acl/tokens", views.ACLTokenViewSet, basename="acltoken")
router.register("acl/policies", views.ACLPolicyViewSet, basename="aclpolicy")
router.register("acl/roles", views.ACLRoleViewSet, basename="aclrole")
router.register("intentions", intentions_api.IntentionViewSet, basename="intention")
router.register("audit", audit.AuditEntryViewSet, basename="audit")
router.register("join-tokens", join_tokens_api.JoinTokenViewSet, basename="jointoken")

# Keys contain slashes (and may end with one), so a key's URL is `kv/<key>`
# exactly, with no trailing slash added.
kv_list = views.KVViewSet.as_view({"get": "list"}, basename="kv")
kv_entry = views.KVViewSet.as_view(
    {"get": "retrieve", "put": "update", "delete": "destroy"}, basename="kv"
)

urlpatterns = [
    path("", views.RootView.as_view(), name="root"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="swagger-ui"),
    path("redoc/", views.RedocView.as_view(url_name="api:schema"), name="redoc"),
    path("kv/", kv_list, name="kv-list"),
    path("kv/<path:key>", kv_entry, name="kv-detail"),
    # Before the router: `services/<name>/...` is otherwise the services viewset's.
    re_path(
        r"^services/(?P<name>[^/]+)/proxy-config/?$",
        proxycfg_api.ProxyConfigView.as_view(),
        name="service-proxy-config",
    ),
    re_path(
        r"^metrics/services/?$",
        metrics_api.ServiceMetricsListView.as_view(),
        name="metrics-services",
    ),
    re_path(
        r"^metrics/services/(?P<name>[^/]+)/series/?$",
        metrics_api.ServiceSeriesView.as_view(),
        name="metrics-service-series",
    ),
    re_path(
        r"^metrics/services/(?P<name>[^/]+)/?$",
        metrics_api.ServiceMetricsView.as_view(),
        name="metrics-service",
    ),
    re_path(r"^metrics/edges/?$", metrics_api.EdgeMetricsView.as_view(), name="metrics-edges"),
    re_path(r"^gateways/?$", gateways_api.GatewayListView.as_view(), name="gateway-list"),
    re_path(
        r"^gateways/(?P<node>[^/]+)/(?P<gateway_id>[^/]+)/config/?$",
        gateways_api.GatewayConfigView.as_view(),
        name="gateway-config",
    ),
    *router.urls,
    re_path(r"^ca/sign/?$", ca.SignView.as_view(), name="ca-sign"),
    re_path(r"^ca/roots/?$", ca.RootsView.as_view(), name="ca-roots"),
    re_path(r"^ca/rotate/?$", ca.RotateView.as_view(), name="ca-rotate"),
    re_path(
        r"^connect/status/?$", connect_status_api.ConnectStatusView.as_view(), name="connect-status"
    ),
    *config_entries_api.urlpatterns,
    re_path(r"^.*$", not_found),
]
