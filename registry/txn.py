"""Write transactions: one global index per write, topics announced on commit."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator

from django.db import connection, transaction
from django.utils import timezone

from registry import audit, changes, db
from registry.domain import rows
from registry.models import TopicIndex

_joined = threading.local()  # the open `one_index()` Change of this thread, if any


def next_index() -> int:
    """Take the next global index. Must run inside the write's transaction."""
    with rows.cursor() as cur:
        cur.execute("UPDATE registry_meshindex SET value = value + 1 WHERE id = 1 RETURNING value")
        row = cur.fetchone()
    if row is None:  # a database without the seed row: create it (once, whoever races)
        with rows.cursor() as cur:
            cur.execute(
                "INSERT INTO registry_meshindex (id, value) VALUES (1, 0) ON CONFLICT (id) DO NOTHING"
            )
        return next_index()
    return int(row[0])


def reserve_indexes(count: int) -> int:
    """Take `count` consecutive indexes at once; returns the last. Inside a transaction."""
    with rows.cursor() as cur:
        cur.execute(
            "UPDATE registry_meshindex SET value = value + %s WHERE id = 1 RETURNING value",
            [count],
        )
        row = cur.fetchone()
    if row is None:
        first = next_index()
        if count > 1:
            return reserve_indexes(count - 1)
        return first
    return int(row[0])


class Change:
    """A write: `with Change() as w:` runs in one transaction, takes `w.index`,
    and records which topics it touched (`w.touch(...)`).

    On commit, the topics' indexes are stored and the change is announced to
    waiting readers; on rollback nothing is stored or announced. Inside a
    writer batch (`registry.db.Batch`) the index comes from the batch's
    reservation and the audit rows, topic indexes and announcement are the
    batch's to store once for all its writes.
    """

    def __init__(self) -> None:
        self.index = 0
        self.topics: set[str] = set()
        self._audit: list[tuple[str, str, str, object, object]] = []
        # Inside `one_index()` every Change is part of the outer one: same
        # index, its topics and audit entries handed to it (see `_Joined`).
        self._outer: Change | None = getattr(_joined, "change", None)
        if self._outer is not None:
            return
        self._batch = db.current_batch()
        # A write's first Change needs no savepoint of its own: the writer
        # runs each write in one, which rolls back exactly what this would.
        self._atomic = transaction.atomic(savepoint=self._batch is None or self._batch.depth > 0)

    def __enter__(self) -> Change:
        if self._outer is not None:
            self.index = self._outer.index
            return self
        self._atomic.__enter__()
        try:
            self.index = self._batch.take_index() if self._batch else next_index()
        except BaseException as exc:
            self._atomic.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if self._batch is not None:
            self._batch.depth += 1
        return self

    def touch(self, *topics: str) -> None:
        self.topics.update(topics)

    def audit(
        self, action: str, resource_type: str, resource_id: str, before=None, after=None
    ) -> None:
        """Record what this write did to one resource (written only inside an audit scope)."""
        self._audit.append((action, resource_type, resource_id, before, after))

    def _audit_rows(self) -> list[tuple]:
        """This change's audit entries as rows for `write_audit_rows` (none outside a scope)."""
        scope = audit.current()
        if scope is None:
            return []
        entries = list(self._audit)
        if not entries and not scope.recorded and self.topics:
            # No explicit record: note the request itself, so no write goes unseen.
            kind = scope.action.split(".", 1)[0]
            entries = [(scope.action, kind, "", None, scope.body)]
        if not entries:
            return []
        scope.recorded = True
        actor = scope.actor
        at = timezone.now()
        path = audit.redact_path(scope.path)[:2048]
        # The one place entry rows are made, so the one place they are redacted:
        # no secret may reach a row that `operator:read` can list (see registry.audit).
        return [
            (
                at,
                self.index,
                actor.id[:64],
                actor.name[:256],
                actor.via[:16],
                action[:128],
                rtype[:64],
                rid[:1024],
                scope.method[:8],
                path,
                _json_or_null(audit.jsonable(audit.redact(action, before))),
                _json_or_null(audit.jsonable(audit.redact(action, after))),
            )
            for action, rtype, rid, before, after in entries
        ]

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if self._outer is not None:
            # The caller of `one_index()` runs each step in its own savepoint:
            # a failed step's rows roll back there, and it hands nothing over.
            if exc_type is None:
                self._outer.topics.update(self.topics)
                self._outer._audit.extend(self._audit)
            return None
        if self._batch is not None:
            self._batch.depth -= 1
        if exc_type is None and (self.topics or self._audit):
            try:
                rows = self._audit_rows()
                index, topics = self.index, sorted(self.topics)
                if self._batch is not None:
                    self._batch.audit_rows.extend(rows)
                    self._batch.changes.append((index, topics))
                else:
                    write_audit_rows(rows)
                    store_topics(dict.fromkeys(topics, index))
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


@contextlib.contextmanager
def one_index() -> Iterator[Change]:
    """One write made of several: every `Change` opened inside shares this one's
    index and transaction (a multi-operation transaction, `PUT /v1/txn`).

    The caller wraps each step in `transaction.atomic()` if a failed step must
    roll back alone; the whole rolls back when the block raises.
    """
    if getattr(_joined, "change", None) is not None:
        raise RuntimeError("one_index() does not nest")
    with Change() as outer:
        _joined.change = outer
        try:
            yield outer
        finally:
            _joined.change = None


def _give_back(index: int) -> None:
    with connection.cursor() as cur:
        cur.execute(
            "UPDATE registry_meshindex SET value = value - 1 WHERE id = 1 AND value = %s", [index]
        )


def _json_or_null(value: object) -> str | None:
    return None if value is None else json.dumps(value)


_AUDIT_COLUMNS = (
    'at, "index", actor, actor_name, via, action, resource_type, resource_id, method, path, '
    "before, after"
)


def write_audit_rows(rows_: list[tuple]) -> None:
    """Store audit rows (from `Change._audit_rows`): the one place audit entries are written.

    Plain SQL, one statement for all the rows (per thousand): it runs on every audited write.
    """
    if not rows_:
        return
    at = connection.ops.adapt_datetimefield_value
    rows.insert_rows(
        f"INSERT INTO registry_auditentry ({_AUDIT_COLUMNS})",
        [(at(r[0]), *r[1:]) for r in rows_],
    )


def store_topics(latest: dict[str, int]) -> None:
    """Upsert topics' indexes in one statement (plain SQL: it runs on every write)."""
    if not latest:
        return
    rows.insert_rows(
        'INSERT INTO registry_topicindex (topic, "index")',
        sorted(latest.items()),  # one lock order for every writer
        'ON CONFLICT (topic) DO UPDATE SET "index" = EXCLUDED."index"',
    )


def topic_index(*topics: str) -> int:
    """The max index over `topics` (0 if none was ever written)."""
    return topics_index(topics)


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
    with rows.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    return int(row[0] or 0)
