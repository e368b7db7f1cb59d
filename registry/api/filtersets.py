"""One FilterSet per model: the query parameters a list accepts (also used by the UI)."""

from __future__ import annotations

import django_filters as df
from django.db.models import QuerySet
from django.db.models.fields.json import KeyTransform
from django_filters.widgets import QueryArrayWidget
from rest_framework.exceptions import ValidationError

from registry.models import (
    ACLPolicy,
    ACLRole,
    ACLToken,
    Check,
    Datacenter,
    KVEntry,
    Node,
    ServiceInstance,
)


def _meta_pairs(values: list[str], param: str) -> list[tuple[str, str]]:
    pairs = []
    for raw in values:
        key, sep, value = raw.partition(":")
        if not sep or not key:
            raise ValidationError({param: f"expected key:value, got {raw!r}"})
        pairs.append((key, value))
    return pairs


def filter_json_map(qs: QuerySet, field: str, pairs: list[tuple[str, str]]) -> QuerySet:
    """Rows whose JSON object `field` has every `key` equal to `value`."""
    for i, (key, value) in enumerate(pairs):
        alias = f"_{field}_{i}"
        qs = qs.alias(**{alias: KeyTransform(key, field)}).filter(**{alias: value})
    return qs


class MultiValueCharFilter(df.BaseInFilter, df.CharFilter):
    """`?x=a&x=b` (or `?x[]=a&x[]=b`): any of the values."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", QueryArrayWidget)
        super().__init__(*args, **kwargs)


class MetaFilter(MultiValueCharFilter):
    """`?meta=env:prod&meta=team:pay`: every pair must match."""

    def filter(self, qs: QuerySet, value: list[str] | None) -> QuerySet:
        if not value:
            return qs
        return filter_json_map(qs, self.field_name, _meta_pairs(value, self.field_name))


class DatacenterFilterSet(df.FilterSet):
    provider = df.MultipleChoiceFilter(
        field_name="provider", choices=[(p, p) for p in Datacenter.PROVIDERS]
    )
    region = df.CharFilter(field_name="region")

    class Meta:
        model = Datacenter
        fields = ["provider", "region"]


class NodeFilterSet(df.FilterSet):
    datacenter = df.CharFilter(field_name="datacenter__name")
    address = df.CharFilter(field_name="address")
    meta = MetaFilter(field_name="meta")
    q = df.CharFilter(field_name="name", lookup_expr="icontains", label="name contains")

    class Meta:
        model = Node
        fields = ["datacenter", "address", "meta", "q"]


class ServiceInstanceFilterSet(df.FilterSet):
    """Also filters the instances `/api/services/` aggregates."""

    name = df.CharFilter(field_name="name", label="service name")
    service_id = df.CharFilter(field_name="service_id")
    node = df.CharFilter(field_name="node__name")
    datacenter = df.CharFilter(field_name="node__datacenter__name")
    kind = df.MultipleChoiceFilter(
        field_name="kind", choices=[(k, k) for k in ServiceInstance.KINDS]
    )
    tag = MultiValueCharFilter(method="filter_tags", label="has every tag (repeat for several)")
    meta = MetaFilter(field_name="meta")
    q = df.CharFilter(field_name="name", lookup_expr="icontains", label="name contains")

    class Meta:
        model = ServiceInstance
        fields = ["name", "service_id", "node", "datacenter", "kind", "tag", "meta", "q"]

    def filter_tags(self, qs: QuerySet, name: str, value: list[str]) -> QuerySet:
        if not value:
            return qs
        # JSON list containment is not portable (SQLite has none): match in Python.
        wanted = set(value)
        ids = [pk for pk, tags in qs.values_list("pk", "tags") if wanted <= set(tags or [])]
        return qs.filter(pk__in=ids)


class CheckFilterSet(df.FilterSet):
    status = df.MultipleChoiceFilter(field_name="status", choices=[(s, s) for s in Check.STATUSES])
    node = df.CharFilter(field_name="node__name")
    service = df.CharFilter(field_name="service_name", label="service name")
    service_id = df.CharFilter(field_name="service_id")
    check_id = df.CharFilter(field_name="check_id")
    datacenter = df.CharFilter(field_name="node__datacenter__name")
    type = df.CharFilter(field_name="type")

    class Meta:
        model = Check
        fields = ["status", "node", "service", "service_id", "check_id", "datacenter", "type"]


class KVEntryFilterSet(df.FilterSet):
    prefix = df.CharFilter(method="filter_prefix", label="key prefix (case-sensitive)")
    session = df.CharFilter(field_name="session_id")

    class Meta:
        model = KVEntry
        fields = ["prefix", "session"]

    def filter_prefix(self, qs: QuerySet, name: str, value: str) -> QuerySet:
        # `startswith` is a case-insensitive LIKE on SQLite: narrow in SQL,
        # decide in Python (KV keys are case-sensitive, as in Consul).
        narrowed = qs.filter(key__startswith=value).values_list("pk", "key")
        return qs.filter(pk__in=[pk for pk, key in narrowed if key.startswith(value)])


class ACLPolicyFilterSet(df.FilterSet):
    name = df.CharFilter(field_name="name")
    q = df.CharFilter(field_name="name", lookup_expr="icontains", label="name contains")

    class Meta:
        model = ACLPolicy
        fields = ["name", "q"]


class ACLRoleFilterSet(df.FilterSet):
    name = df.CharFilter(field_name="name")
    q = df.CharFilter(field_name="name", lookup_expr="icontains", label="name contains")
    policy = df.CharFilter(field_name="policies__name", label="linked to the policy named")

    class Meta:
        model = ACLRole
        fields = ["name", "q", "policy"]


class ACLTokenFilterSet(df.FilterSet):
    policy = df.CharFilter(field_name="policies__name", label="linked to the policy named")
    role = df.CharFilter(field_name="roles__name", label="linked to the role named")
    local = df.BooleanFilter(field_name="local")

    class Meta:
        model = ACLToken
        fields = ["policy", "role", "local"]
