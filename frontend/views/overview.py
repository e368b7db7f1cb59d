"""The overview: what is unhealthy and where, each item linking to its fix."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from frontend import metrics
from frontend.auth import ui_view
from frontend.render import page
from registry.domain import dashboard
from registry.grpc import status as streams


@ui_view()
def overview(request: HttpRequest) -> HttpResponse:
    authz = request.viewer.authz
    checks, failing_total = dashboard.failing_checks(authz)
    return page(
        request,
        "frontend/overview.html",
        {
            "datacenters": dashboard.datacenters(authz),
            "services": dashboard.services_by_health(authz),
            "checks": checks,
            "failing_total": failing_total,
            "roots": dashboard.expiring_roots(authz),
            "quiet": dashboard.quiet_agents(authz),
            "refused": dashboard.refused_configs(
                authz, streams.proxy_streams(), streams.connected_nodes()
            ),
            "denied_url": metrics.edges_url("5m"),
        },
        section="overview",
    )
