"""Rendering a UI page: the template, the viewer and the navigation."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

NAV = (
    ("overview", "Overview", "/ui/"),
    ("services", "Services", "/ui/services"),
    ("topology", "Topology", "/ui/topology"),
    ("intentions", "Intentions", "/ui/intentions"),
    ("traffic", "Traffic", "/ui/traffic"),
    ("nodes", "Nodes", "/ui/nodes"),
    ("kv", "Key/Value", "/ui/kv"),
    ("acl", "ACL", "/ui/acl"),
    ("audit", "Audit", "/ui/audit"),
    ("security", "Security", "/ui/security"),
)


def page(
    request: HttpRequest, template: str, context: dict[str, Any], *, section: str, status: int = 200
) -> HttpResponse:
    viewer = request.viewer  # type: ignore[attr-defined]
    return render(
        request,
        template,
        {"viewer": viewer, "nav": NAV, "section": section, **context},
        status=status,
    )
