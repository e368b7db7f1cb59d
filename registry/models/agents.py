"""Per-host agents: the join tokens that let them into the mesh, the nodes that
joined with them and the node certificates those nodes were given."""

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
    # The scope a node that joins with this token gets: the node name it must
    # use ("" = any) and the services it may register and get leaves for
    # (names, `prefix-*` patterns, or "*" for any; [] = none).
    node_name = models.CharField(max_length=128, blank=True, default="")
    services = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-create_index"]

    def __str__(self) -> str:
        return self.id


class NodeEnrollment(models.Model):
    """A node that joined with a join token: its identity, scope and liveness.

    One row per node name. `node_id` is the identity the node's certificates
    are bound to: a `-replace` join gives the name a new `node_id`, so the
    previous holder's certificates stop working. `revoked_at` set: every
    certificate of the node is refused and its sync is never accepted again
    (until the name joins anew with another token). `last_seen_at` is raised
    by the node's RPCs (at most every few seconds); a node silent for
    `MESH_NODE_LIVENESS_TIMEOUT` gets a critical `serfHealth` check.
    """

    node = models.CharField(max_length=128, primary_key=True)
    node_id = models.CharField(max_length=36)
    join_token = models.CharField(max_length=32, blank=True, default="", db_index=True)
    services = models.JSONField(default=list, blank=True)  # as JoinToken.services
    joined_at = models.DateTimeField()
    last_seen_at = models.DateTimeField(db_index=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    down = models.BooleanField(default=False)  # serfHealth set critical by the liveness sweep

    def __str__(self) -> str:
        return self.node


class NodeCertificate(models.Model):
    """A node certificate the join flow (or a renewal) issued, bound to a node ID.

    The gRPC server accepts a client certificate only when its serial is here,
    for the node it names, with the node's current `node_id` and the node not
    revoked: certificates signed any other way (`/api/ca/sign`) or held by a
    replaced node are refused.
    """

    serial = models.CharField(max_length=64, primary_key=True)  # lower-case hex, no colons
    node = models.CharField(max_length=128, db_index=True)
    node_id = models.CharField(max_length=36)
    not_after = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.serial
