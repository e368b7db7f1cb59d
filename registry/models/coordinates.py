"""Network coordinates (`/v1/coordinate`): one Vivaldi coordinate per node."""

from django.db import models


class NodeCoordinate(models.Model):
    """A node's latest coordinate (Consul's `Coord` shape, `meshproto.vivaldi`), as its
    agent reported it or, for the control plane's own node, as the server computed it."""

    node = models.CharField(max_length=128, primary_key=True)
    coord = models.JSONField()
    # Where peers measure the round trip to this node's agent (TCP connect time); 0: nowhere.
    probe_port = models.IntegerField(default=0)
    updated_at = models.DateTimeField()
    modify_index = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return self.node
