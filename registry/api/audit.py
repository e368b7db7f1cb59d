"""`/api/audit/`: the audit log, read-only (entries are written by the writes themselves)."""

from __future__ import annotations

import django_filters as df
from rest_framework import mixins, serializers

from registry.api.auth import Need
from registry.api.views import MeshViewSet
from registry.models import AuditEntry


class AuditEntrySerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEntry
        fields = [
            "id",
            "at",
            "index",
            "actor",
            "actor_name",
            "via",
            "action",
            "resource_type",
            "resource_id",
            "method",
            "path",
            "before",
            "after",
        ]
        read_only_fields = fields


class AuditEntryFilterSet(df.FilterSet):
    actor = df.CharFilter()
    via = df.CharFilter()
    action = df.CharFilter(lookup_expr="startswith")
    resource_type = df.CharFilter()
    resource_id = df.CharFilter(lookup_expr="startswith")
    since = df.IsoDateTimeFilter(field_name="at", lookup_expr="gte")
    until = df.IsoDateTimeFilter(field_name="at", lookup_expr="lt")
    min_index = df.NumberFilter(field_name="index", lookup_expr="gte")

    class Meta:
        model = AuditEntry
        fields = ["actor", "via", "action", "resource_type", "resource_id"]


class AuditEntryViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, MeshViewSet):
    """Who changed what, when, with before and after. Needs `operator:read`."""

    serializer_class = AuditEntrySerializer
    filterset_class = AuditEntryFilterSet
    ordering_fields = ["index", "at"]
    ordering = ["-index", "-id"]
    model = AuditEntry
    acl = {"list": Need("operator:read"), "retrieve": Need("operator:read")}

    def visible(self):
        return AuditEntry.objects.all()
