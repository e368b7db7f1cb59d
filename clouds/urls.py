"""`/api/clouds/...` and `/api/datacenters/<dc>/gateway-config` (mounted before `/api/`)."""

from django.urls import re_path
from rest_framework.routers import SimpleRouter

from clouds import api

router = SimpleRouter()
router.trailing_slash = "/?"  # `/api/clouds/<name>/sync` and `.../sync/` alike
router.register("clouds", api.CloudAccountViewSet, basename="cloudaccount")

gateway_config = api.GatewayConfigViewSet.as_view({"get": "retrieve"}, basename="gatewayconfig")
gateway_apply = api.GatewayConfigViewSet.as_view({"post": "apply"}, basename="gatewayconfig")

urlpatterns = [
    re_path(r"^datacenters/(?P<dc>[^/]+)/gateway-config/?$", gateway_config, name="gateway-config"),
    re_path(
        r"^datacenters/(?P<dc>[^/]+)/gateway-config/apply/?$", gateway_apply, name="gateway-apply"
    ),
    *router.urls,
]
