"""Per-host agents: the join tokens that let them into the mesh."""

from django.db import models

from registry.models.base import Indexed


class JoinToken(Indexed):
    """A credential an agent exchanges once (or, multi-use, several times) for
    its node identity.

    The token an operator hands out is `<id>.<secret>`; only the secret's
    SHA-256 is stored. A token is usable while it is not revoked, not expired
    and `uses < max_uses` (`max_uses == 0`: unlimited); `uses` is raised by a
    conditional UPDATE (`registry.domain.join_tokens.consume`), so two agents can
    never both use a single-use token.
    """

    id = models.CharField(max_length=32, primary_key=True)
    secret_hash = models.CharField(max_length=64)
    description = models.TextField(blank=True, default="")
    datacenter = models.CharField(max_length=128)
    max_uses = models.IntegerField(default=1)  # 0: unlimited
    uses = models.IntegerField(default=0)
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_by = models.CharField(max_length=256, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_used_by = models.CharField(max_length=256, blank=True, default="")  # node name

    class Meta:
        ordering = ["-create_index"]

    def __str__(self) -> str:
        return self.id
