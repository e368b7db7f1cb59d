"""The global Raft-style index and per-topic indexes for blocking queries."""

from django.db import models


class MeshIndex(models.Model):
    """One row (id=1) holding the global, monotonically increasing index.

    Every write transaction increments it first (`UPDATE ... RETURNING`), which
    on PostgreSQL also takes the row lock that serialises writers: indexes are
    handed out in commit order, as Raft's are.
    """

    value = models.BigIntegerField(default=0)


class TopicIndex(models.Model):
    """The index of the last write that touched a topic.

    Topics name what a blocking query reads: `services`, `service:web`,
    `node:n1`, `kv:app/config`, `acl`, ... A read's `X-Consul-Index` is the max
    over its topics, so a delete (which leaves no row behind) still moves it.
    """

    topic = models.CharField(max_length=600, primary_key=True)
    index = models.BigIntegerField()

    def __str__(self) -> str:
        return f"{self.topic}@{self.index}"
