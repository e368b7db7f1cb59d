"""Golden metrics for the UI's charts, read through the REST API's own views.

The telemetry store answers `/api/metrics/services/<name>` and
`/api/metrics/edges` (rolling windows: requests per second, success rate,
latency percentiles) and `/api/metrics/services/<name>/series` (the points a
chart draws over 15 minutes, an hour or a day). The UI does not know that store's internals: it calls
those views in-process with the signed-in token, so their ACL rules and
shapes stay theirs. Where the routes are not there (or have no data yet)
the charts show an empty state.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from django.http import HttpRequest, QueryDict
from django.urls import Resolver404, resolve

from frontend.auth import SESSION_KEY
from registry.api.errors import not_found

# The windows a service page's charts offer (`registry.domain.golden.SERIES_WINDOWS`).
CHART_WINDOWS = ("15m", "1h", "24h")


def service_path(name: str) -> str:
    return f"/api/metrics/services/{name}"


def series_path(name: str) -> str:
    return f"/api/metrics/services/{name}/series"


def edges_path() -> str:
    return "/api/metrics/edges"


def edges_url(window: str) -> str:
    """Where the overview and topology fetch edge metrics over `window` (through the UI)."""
    return f"/ui/metrics/edges?window={window}"


def available(path: str) -> bool:
    try:
        match = resolve(path)
    except Resolver404:
        return False
    return match.func is not not_found


def fetch(request: HttpRequest, path: str, query: dict[str, str]) -> tuple[int, Any]:
    """(status, JSON) of GET `path` as the signed-in token; (404, None) without the route."""
    try:
        match = resolve(path)
    except Resolver404:
        return 404, None
    if match.func is not_found:
        return 404, None
    sub = HttpRequest()
    sub.method = "GET"
    sub.path = sub.path_info = path
    qs = urlencode(query)
    sub.META = {
        "REQUEST_METHOD": "GET",
        "QUERY_STRING": qs,
        "SERVER_NAME": request.META.get("SERVER_NAME", "localhost"),
        "SERVER_PORT": request.META.get("SERVER_PORT", "80"),
        "HTTP_HOST": request.get_host(),
        "HTTP_ACCEPT": "application/json",
        "REMOTE_ADDR": request.META.get("REMOTE_ADDR", ""),
    }
    token = request.session.get(SESSION_KEY)
    if token:
        sub.META["HTTP_X_CONSUL_TOKEN"] = token
    sub.GET = QueryDict(qs)
    response = match.func(sub, *match.args, **match.kwargs)
    if hasattr(response, "render"):
        response.render()
    try:
        data = json.loads(response.content or b"null")
    except ValueError:
        data = None
    return response.status_code, data
