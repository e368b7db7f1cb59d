"""OpenAPI description of `/api` authentication (imported by views.py to register it)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class MeshTokenScheme(OpenApiAuthenticationExtension):
    """An ACL token in any one of three places (alternatives, not all three)."""

    target_class = "registry.api.auth.MeshTokenAuthentication"
    name = ["consulToken", "bearerToken", "tokenQuery"]

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, Any]]:
        return [
            {"type": "apiKey", "in": "header", "name": "X-Consul-Token"},
            {"type": "http", "scheme": "bearer", "description": "the ACL token's secret"},
            {"type": "apiKey", "in": "query", "name": "token"},
        ]

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list]]:
        return [{name: []} for name in self.name]
