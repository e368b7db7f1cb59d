"""Write transactions: one global index per write, topics announced on commit."""

from __future__ import annotations

from django.db import connection, transaction

from registry import audit, changes
from registry.models import AuditEntry, TopicIndex


def next_index() -> int:
    """Take the next global index. Must run inside the write's transaction."""
    with connection.cursor() as cur:
        cur.execute("UPDATE registry_meshindex SET value = value + 1 WHERE id = 1 RETURNING value")
        row = cur.fetchone()
    if row is None:  # first write ever on a database migrated without the seed row
        with connection.cursor() as cur:
            cur.execute("INSERT INTO registry_meshindex (id, value) VALUES (1, 1)")
        return 1
    return int(row[0])


class Change:
    """A write: `with Change() as w:` runs in one transaction, takes `w.index`,
    and records which topics it touched (`w.touch(...)`).

    On commit, the topics' indexes are stored and the change is announced to
    waiting readers; on rollback nothing is stored or announced.
    """

    def __init__(self) -> None:
        self.index = 0
        self.topics: set[str] = set()
        self._audit: list[tuple[str, str, str, object, object]] = []
        self._atomic = transaction.atomic()

    def __enter__(self) -> Change:
        self._atomic.__enter__()
        try:
            self.index = next_index()
        except BaseException as exc:
            self._atomic.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def touch(self, *topics: str) -> None:
        self.topics.update(topics)

    def audit(
        self, action: str, resource_type: str, resource_id: str, before=None, after=None
    ) -> None:
        """Record what this write did to one resource (written only inside an audit scope)."""
        self._audit.append((action, resource_type, resource_id, before, after))

    def _write_audit(self) -> None:
        scope = audit.current()
        if scope is None:
            return
        entries = list(self._audit)
        if not entries and not scope.recorded and self.topics:
            # No explicit record: note the request itself, so no write goes unseen.
            kind = scope.action.split(".", 1)[0]
            entries = [(scope.action, kind, "", None, scope.body)]
        if not entries:
            return
        scope.recorded = True
        actor = scope.actor
        path = audit.redact_path(scope.path)[:2048]
        # The one place entries are written, so the one place they are redacted:
        # no secret may reach a row that `operator:read` can list (see registry.audit).
        AuditEntry.objects.bulk_create(
            [
                AuditEntry(
                    index=self.index,
                    actor=actor.id,
                    actor_name=actor.name,
                    via=actor.via,
                    action=action,
                    resource_type=rtype,
                    resource_id=rid[:1024],
                    method=scope.method,
                    path=path,
                    before=audit.jsonable(audit.redact(action, before)),
                    after=audit.jsonable(audit.redact(action, after)),
                )
                for action, rtype, rid, before, after in entries
            ]
        )

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if exc_type is None and (self.topics or self._audit):
            try:
                self._write_audit()
                _store_topics(self.index, sorted(self.topics))
                index, topics = self.index, sorted(self.topics)
                transaction.on_commit(lambda: changes.publish(index, topics))
            except BaseException as err:
                return self._atomic.__exit__(type(err), err, err.__traceback__)
        elif exc_type is None:
            # A write that touched nothing (a cas that did not match, a refused
            # lock, an unchanged value) gives its index back: a request that
            # changed nothing must leave no trace, not even a higher index. The
            # index row is still locked by this transaction, so no one else
            # took a later index meanwhile.
            try:
                _give_back(self.index)
            except BaseException as err:
                return self._atomic.__exit__(type(err), err, err.__traceback__)
        return self._atomic.__exit__(exc_type, exc, tb)


def _give_back(index: int) -> None:
    with connection.cursor() as cur:
        cur.execute(
            "UPDATE registry_meshindex SET value = value - 1 WHERE id = 1 AND value = %s", [index]
        )


def _store_topics(index: int, topics: list[str]) -> None:
    """Upsert the topics' index in one statement (plain SQL: it runs on every write)."""
    if not topics:
        return
    values = ", ".join(["(%s, %s)"] * len(topics))
    params: list[object] = []
    for t in topics:
        params += [t, index]
    with connection.cursor() as cur:
        cur.execute(
            f'INSERT INTO registry_topicindex (topic, "index") VALUES {values} '
            'ON CONFLICT (topic) DO UPDATE SET "index" = EXCLUDED."index"',
            params,
        )


def topic_index(*topics: str) -> int:
    """The max index over `topics` (0 if none was ever written)."""
    from django.db.models import Max

    if len(topics) == 1:
        row = TopicIndex.objects.filter(topic=topics[0]).values_list("index", flat=True).first()
        return row or 0
    return TopicIndex.objects.filter(topic__in=topics).aggregate(m=Max("index"))["m"] or 0


def prefix_index(prefix: str) -> int:
    """The max index over every topic starting with `prefix`."""
    from django.db.models import Max

    return TopicIndex.objects.filter(topic__startswith=prefix).aggregate(m=Max("index"))["m"] or 0


def current_index() -> int:
    from registry.models import MeshIndex

    return MeshIndex.objects.filter(id=1).values_list("value", flat=True).first() or 0


def topics_index(exact: tuple[str, ...], prefixes: tuple[str, ...] = ()) -> int:
    """Max index over exact topics and topic prefixes in one cheap query.

    Hot path (every cached read validates with it), so it is plain SQL.
    """
    clauses, params = [], []
    if exact:
        clauses.append(f"topic IN ({', '.join(['%s'] * len(exact))})")
        params.extend(exact)
    for p in prefixes:
        clauses.append("topic LIKE %s ESCAPE '\\'")
        params.append(p.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
    if not clauses:
        return 0
    sql = f'SELECT MAX("index") FROM registry_topicindex WHERE {" OR ".join(clauses)}'
    with connection.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    return int(row[0] or 0)
