"""Prepared queries (`/v1/query`): stored service lookups, executed by ID or name."""

from django.db import models

from registry.models.base import Indexed


class PreparedQuery(Indexed):
    """One query as Consul defines it; `definition` holds `Service`, `DNS`, `Template`
    and `Tags` in Consul's field names, validated by `registry.domain.queries`."""

    id = models.CharField(max_length=36, primary_key=True)
    name = models.CharField(max_length=256, blank=True, default="", db_index=True)
    # Ended with its session (Consul: the query is deleted when the session is invalidated).
    session = models.ForeignKey(
        "registry.Session", null=True, blank=True, on_delete=models.CASCADE, related_name="queries"
    )
    # The accessor of the token the query runs with ("" = the caller's token).
    token_accessor = models.CharField(max_length=36, blank=True, default="")
    definition = models.JSONField(default=dict)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["name"], condition=~models.Q(name=""), name="prepared_query_unique_name"
            )
        ]

    def __str__(self) -> str:
        return self.name or self.id
