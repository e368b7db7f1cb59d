"""Hot reads and writes in plain SQL.

Reads return light row objects the shape functions accept; writes (`first`,
`save`) take and return the registry's models but skip the ORM's query
compiler, which costs more than the database on every registration.

`/v1/health/service/:name` is the most frequent read in a mesh (every
watcher, every DNS-less client); building it through the ORM spends more
time compiling SQL and instantiating models than reading the rows. These
queries are written once here and yield objects with the same attribute
names as the models (`svc.node.datacenter.name`, `check.status`, ...), so
`registry.domain.shapes` stays the one home of Consul's JSON shapes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, TypeVar

from django.db import connection, models
from django.utils.dateparse import parse_datetime

from registry.db import note_statement

M = TypeVar("M", bound=models.Model)


@contextlib.contextmanager
def cursor() -> Iterator[Any]:
    """A cursor for the hot statements, on the connection's current transaction.

    On PostgreSQL it binds parameters on the server (Django's own cursors
    quote them into the SQL text client-side): no per-call quoting, and a
    statement run a few times is prepared once and only executed after
    that. Errors still come out as Django's database exceptions.
    """
    connection.ensure_connection()
    note_statement()
    if connection.vendor == "sqlite":
        # sqlite3's own cursor: Django's wrapper rewrites every statement's
        # placeholders with a regular expression.
        with connection.wrap_database_errors:
            cur = _SQLiteCursor(connection.connection.cursor())
            try:
                yield cur
            finally:
                cur.close()
        return
    if connection.vendor != "postgresql":
        with connection.cursor() as cur:
            yield cur
        return
    import psycopg

    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cur:
        yield cur


@functools.lru_cache(maxsize=512)
def _qmark(sql: str) -> str:
    return sql.replace("%s", "?").replace("%%", "%")


class _SQLiteCursor:
    """A sqlite3 cursor taking the `%s` placeholders the rest of the code writes."""

    __slots__ = ("_cur",)

    def __init__(self, cur) -> None:
        self._cur = cur

    def execute(self, sql: str, params=()) -> Any:
        return self._cur.execute(_qmark(sql), params)

    def executemany(self, sql: str, seq) -> Any:
        return self._cur.executemany(_qmark(sql), seq)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list:
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def close(self) -> None:
        self._cur.close()


def _json(value: Any) -> Any:
    # SQLite hands JSON columns back as text, PostgreSQL (jsonb) as objects.
    return json.loads(value) if isinstance(value, str) else value


# One statement reads a health answer: the topic's index (the same snapshot
# as the rows, so the index never runs ahead of or behind them), each
# instance with its node and datacenter, and every check that concerns it.
# JSON columns are read as text (`CAST`: PostgreSQL's jsonb too) and decoded
# here, so that the many equal values of a catalog (the same tags, meta and
# weights on every instance of a service) are decoded once, not per row.
_HEALTH_SQL = """
SELECT (SELECT MAX(t."index") FROM registry_topicindex t WHERE t.topic = %s),
       s.id, s.service_id, s.name, s.kind, CAST(s.tags AS TEXT), s.address, s.port,
       CAST(s.meta AS TEXT), CAST(s.tagged_addresses AS TEXT), CAST(s.weights AS TEXT),
       s.enable_tag_override, CAST(s.proxy AS TEXT), CAST(s.connect AS TEXT), s.namespace,
       s.destination_name, s.create_index, s.modify_index,
       n.id, n.node_id, n.name, n.address, CAST(n.tagged_addresses AS TEXT),
       CAST(n.meta AS TEXT), n.create_index, n.modify_index, d.name,
       c.check_id, c.name, c.status, c.notes, c.output, c.service_id, c.service_name,
       CAST(c.service_tags AS TEXT), c.type, CAST(c.definition AS TEXT), c.create_index,
       c.modify_index
FROM registry_serviceinstance s
JOIN registry_node n ON n.id = s.node_id
JOIN registry_datacenter d ON d.id = n.datacenter_id
LEFT JOIN registry_check c
  ON c.node_id = s.node_id AND (c.service_id = '' OR c.service_id = s.service_id)
WHERE {where} AND d.name = %s
ORDER BY n.name, s.service_id, c.service_id <> '', c.check_id
"""

_FLAT = (str, int, float, bool, type(None))
_decoded: dict[str, Any] = {}
_DECODED_MAX = 8192


def _json_text(text: str | None) -> Any:
    """A JSON column's value from its text, decoded once per distinct flat value.

    A flat list or object (strings and numbers only: tags, meta, weights) is
    kept and handed out again, shared: its readers copy it (the shapes build
    new top-level containers) and never change it. Nested values are decoded
    anew every time, so no reader can reach into another's.
    """
    if text is None:
        return None
    value = _decoded.get(text)
    if value is not None:
        return value
    value = json.loads(text)
    if (isinstance(value, list) and all(isinstance(v, _FLAT) for v in value)) or (
        isinstance(value, dict) and all(isinstance(v, _FLAT) for v in value.values())
    ):
        if len(_decoded) >= _DECODED_MAX:
            _decoded.clear()
        _decoded[text] = value
    return value


def _node(r: tuple) -> SimpleNamespace:
    decode = _json_text
    return SimpleNamespace(
        pk=r[18], node_id=r[19], name=r[20], address=r[21],
        tagged_addresses=decode(r[22]), meta=decode(r[23]),
        create_index=r[24], modify_index=r[25], datacenter=SimpleNamespace(name=r[26]),
    )  # fmt: skip


def _instance(r: tuple, node: SimpleNamespace) -> SimpleNamespace:
    decode = _json_text
    return SimpleNamespace(
        pk=r[1], service_id=r[2], name=r[3], kind=r[4], tags=decode(r[5]), address=r[6],
        port=r[7], meta=decode(r[8]), tagged_addresses=decode(r[9]), weights=decode(r[10]),
        enable_tag_override=bool(r[11]), proxy=decode(r[12]), connect=decode(r[13]),
        namespace=r[14], destination_name=r[15], create_index=r[16], modify_index=r[17],
        node=node, node_id=node.pk, checks=[],
    )  # fmt: skip


def _check(r: tuple) -> SimpleNamespace:
    decode = _json_text
    return SimpleNamespace(
        check_id=r[27], name=r[28], status=r[29], notes=r[30], output=r[31],
        service_id=r[32], service_name=r[33], service_tags=decode(r[34]), type=r[35],
        definition=decode(r[36]), create_index=r[37], modify_index=r[38],
    )  # fmt: skip


def health(
    name: str, dc: str, topic: str, *, connect: bool = False
) -> tuple[int | None, list[SimpleNamespace]]:
    """`topic`'s index and the instances of `name` (or, with `connect`, the
    proxies for it) in `dc`, each with its `node` and its `checks` (the
    node's own first, then the instance's, each by check ID), read in one
    statement. The index is None when no instance is in `dc` (nor, maybe,
    `dc` itself): the caller then asks for both apart.

    The objects carry the models' attribute names, so the shape functions
    take them as they take model rows.
    """
    if connect:  # proxies for the service, and the service itself if Connect-native
        where, params = "(s.destination_name = %s OR s.name = %s)", [topic, name, name, dc]
    else:
        where, params = "s.name = %s", [topic, name, dc]
    with cursor() as cur:
        cur.execute(_HEALTH_SQL.format(where=where), params)
        rows = cur.fetchall()
    if not rows:
        return None, []
    nodes: dict[int, SimpleNamespace] = {}
    out: list[SimpleNamespace] = []
    svc = None
    for r in rows:
        if svc is None or svc.pk != r[1]:
            if connect and r[15] != name and not (_json_text(r[13]) or {}).get("Native"):
                svc = SimpleNamespace(pk=r[1], checks=[])  # not listed; its check rows skipped
            else:
                node = nodes.get(r[18])
                if node is None:
                    node = nodes[r[18]] = _node(r)
                svc = _instance(r, node)
                out.append(svc)
        if r[27] is not None:
            svc.checks.append(_check(r))
    return int(rows[0][0] or 0), out


# --- model rows by key, without the ORM's compiler -------------------------------------------


class _Table:
    """One model's columns and the SQL for `first` / `save`, built once."""

    def __init__(self, model: type[models.Model]) -> None:
        self.model = model
        fields = model._meta.concrete_fields
        self.table = model._meta.db_table
        self.pk = model._meta.pk
        self.fields = fields
        self.attnames = [f.attname for f in fields]
        self.data_fields = [f for f in fields if not f.primary_key]
        self.select = "SELECT {} FROM {}".format(
            ", ".join(connection.ops.quote_name(f.column) for f in fields), self.table
        )
        cols = ", ".join(connection.ops.quote_name(f.column) for f in self.data_fields)
        marks = ", ".join(["%s"] * len(self.data_fields))
        self.insert = (
            f"INSERT INTO {self.table} ({cols}) VALUES ({marks}) "
            f"RETURNING {connection.ops.quote_name(self.pk.column)}"
        )
        sets = ", ".join(f"{connection.ops.quote_name(f.column)} = %s" for f in self.data_fields)
        self.update = (
            f"UPDATE {self.table} SET {sets} WHERE {connection.ops.quote_name(self.pk.column)} = %s"
        )
        self.load = [_loader(f) for f in fields]
        self.dump = [_dumper(f) for f in self.data_fields]


def _loader(field: models.Field):
    if isinstance(field, models.JSONField):
        return _json
    if isinstance(field, models.DateTimeField):
        return _datetime
    if isinstance(field, models.BooleanField):
        return lambda v: v if v is None else bool(v)
    return None


def _dumper(field: models.Field):
    if isinstance(field, models.JSONField):
        return lambda v: None if v is None and field.null else json.dumps(v)
    if isinstance(field, models.DateTimeField):
        return lambda v: connection.ops.adapt_datetimefield_value(v)
    return None


def _datetime(value: Any) -> dt.datetime | None:
    # PostgreSQL hands datetimes back aware; SQLite as naive UTC (parsed by the
    # connection's converters) or as text: the models hold them aware.
    if value is None:
        return None
    parsed = value if isinstance(value, dt.datetime) else parse_datetime(value)
    if parsed is not None and parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed


_tables: dict[type[models.Model], _Table] = {}


def _table(model: type[models.Model]) -> _Table:
    t = _tables.get(model)
    if t is None:
        t = _tables[model] = _Table(model)
    return t


def _row_to_model(t: _Table, row: tuple) -> Any:
    values = [v if load is None else load(v) for v, load in zip(row, t.load, strict=True)]
    return t.model.from_db(connection.alias, t.attnames, values)


def new(model: type[M], **values: Any) -> M:
    """A new (unsaved) model with `values` (attribute names), the rest at their defaults.

    Positional construction: `Model(**kwargs)` costs several times more, and
    the hot writes build one or two per registration.
    """
    t = _table(model)
    args = []
    for f, name in zip(t.fields, t.attnames, strict=True):
        if name in values:
            args.append(values[name])
        elif f.primary_key:
            args.append(None)
        else:
            args.append(f.get_default())
    return model(*args)


def first(model: type[M], **equal: Any) -> M | None:
    """The row whose columns equal `equal` (a unique key), as a model, or None.

    Keys are attribute names (`node_id`, not `node`); no ordering is applied,
    so use it for unique keys only.
    """
    t = _table(model)
    where = " AND ".join(f"{connection.ops.quote_name(k)} = %s" for k in equal)
    with cursor() as cur:
        cur.execute(f"{t.select} WHERE {where} LIMIT 1", list(equal.values()))
        row = cur.fetchone()
    return None if row is None else _row_to_model(t, row)


@functools.lru_cache(maxsize=64)
def _related_sql(model: type[models.Model], relation: str, keys: tuple[str, ...]) -> str:
    t = _table(model)
    related = _table(model._meta.get_field(relation).related_model)
    q = connection.ops.quote_name
    cols = [f"a.{q(f.column)}" for f in t.fields] + [f"b.{q(f.column)}" for f in related.fields]
    fk = q(model._meta.get_field(relation).column)
    where = " AND ".join(f"a.{q(k)} = %s" for k in keys)
    return (
        f"SELECT {', '.join(cols)} FROM {t.table} a JOIN {related.table} b "
        f"ON b.{q(related.pk.column)} = a.{fk} WHERE {where} LIMIT 1"
    )


def first_related(model: type[M], relation: str, **equal: Any) -> M | None:
    """Like `first`, with the row its foreign key `relation` points at read in the same statement."""
    t = _table(model)
    related = _table(model._meta.get_field(relation).related_model)
    with cursor() as cur:
        cur.execute(_related_sql(model, relation, tuple(equal)), list(equal.values()))
        row = cur.fetchone()
    if row is None:
        return None
    obj = _row_to_model(t, row[: len(t.fields)])
    setattr(obj, relation, _row_to_model(related, row[len(t.fields) :]))
    return obj


def where(model: type[M], sql: str, params: list[Any]) -> list[M]:
    """Rows matching a WHERE clause written in columns, as models."""
    t = _table(model)
    with cursor() as cur:
        cur.execute(f"{t.select} WHERE {sql}", params)
        return [_row_to_model(t, r) for r in cur.fetchall()]


def where_each(queries: list[tuple[type[models.Model], str, list[Any]]]) -> list[list[Any]]:
    """Several `where` reads, in order (one home for a write's reads of its stored rows)."""
    return [where(model, sql, params) for model, sql, params in queries]


def save(obj: models.Model) -> None:
    """Insert (no pk yet) or update every column of `obj` in one statement.

    For the catalog's hot writes: the model's own `save()` compiles its SQL
    anew every time and, for an update, may first try a SELECT.
    """
    t = _table(type(obj))
    values = []
    for f, dump in zip(t.data_fields, t.dump, strict=True):
        v = getattr(obj, f.attname)
        values.append(v if dump is None else dump(v))
    with cursor() as cur:
        if obj.pk is None:
            cur.execute(t.insert, values)
            obj.pk = cur.fetchone()[0]
        else:
            cur.execute(t.update, [*values, obj.pk])
    obj._state.adding = False
    obj._state.db = connection.alias


def _values(t: _Table, obj: models.Model) -> list[Any]:
    values = []
    for f, dump in zip(t.data_fields, t.dump, strict=True):
        v = getattr(obj, f.attname)
        values.append(v if dump is None else dump(v))
    return values


def save_each(objs: list[models.Model]) -> None:
    """`save` every one of `objs` in one statement, one round trip, on PostgreSQL.

    For a write that stores several rows it has already read (an instance
    and its checks, a node's synced instances): one `save` per row waits for
    the database each time. On PostgreSQL the inserts and updates become the
    parts of one `WITH` statement (each part changes a different row, so
    their running on one snapshot changes nothing); elsewhere they run one
    after another.
    """
    if connection.vendor != "postgresql" or len(objs) < 2:
        for obj in objs:
            save(obj)
        return
    q = connection.ops.quote_name
    parts, params, inserted = [], [], []
    for n, obj in enumerate(objs):
        t = _table(type(obj))
        values = _values(t, obj)
        cols = ", ".join(q(f.column) for f in t.data_fields)
        marks = ", ".join(["%s"] * len(values))
        pk = q(t.pk.column)
        if obj.pk is None:
            parts.append(
                f"q{n} AS (INSERT INTO {t.table} ({cols}) VALUES ({marks}) RETURNING {pk})"
            )
            params.extend(values)
            inserted.append((n, obj))
        else:
            sets = ", ".join(f"{q(f.column)} = %s" for f in t.data_fields)
            parts.append(f"q{n} AS (UPDATE {t.table} SET {sets} WHERE {pk} = %s RETURNING {pk})")
            params.extend([*values, obj.pk])
    select = " UNION ALL ".join(
        f"SELECT {n}, {q(_table(type(o)).pk.column)} FROM q{n}" for n, o in inserted
    )
    sql = f"WITH {', '.join(parts)} {select or 'SELECT 0, 0'}"
    with cursor() as cur:
        cur.execute(sql, params)
        ids = dict(cur.fetchall())
    for n, obj in inserted:
        obj.pk = ids[n]
    for obj in objs:
        obj._state.adding = False
        obj._state.db = connection.alias


def insert_rows(head: str, rows_: list[tuple], tail: str = "", chunk: int = 1000) -> None:
    """`head VALUES (...), (...) tail` for every tuple of `rows_`: one statement per
    `chunk` rows on PostgreSQL, `executemany` elsewhere.

    psycopg runs `executemany` in its pipeline mode, which polls the socket
    for writing as well as reading and so spins on the GIL until the answer
    comes; one multi-row statement is one plain round trip.
    """
    if not rows_:
        return
    width = len(rows_[0])
    one = f"({', '.join(['%s'] * width)})"
    with cursor() as cur:
        if connection.vendor != "postgresql":
            cur.executemany(f"{head} VALUES {one} {tail}", rows_)
            return
        for start in range(0, len(rows_), chunk):
            part = rows_[start : start + chunk]
            cur.execute(
                f"{head} VALUES {', '.join([one] * len(part))} {tail}",
                [v for row in part for v in row],
            )


def update_where(model: type[models.Model], values: dict[str, Any], **equal: Any) -> int:
    """`UPDATE ... SET values WHERE equal` in one statement; returns the rows changed."""
    t = _table(model)
    by_name = {f.attname: (f, dump) for f, dump in zip(t.data_fields, t.dump, strict=True)}
    sets, params = [], []
    for name, v in values.items():
        field, dump = by_name[name]
        sets.append(f"{connection.ops.quote_name(field.column)} = %s")
        params.append(v if dump is None else dump(v))
    where = " AND ".join(f"{connection.ops.quote_name(k)} = %s" for k in equal)
    with cursor() as cur:
        cur.execute(
            f"UPDATE {t.table} SET {', '.join(sets)} WHERE {where}", [*params, *equal.values()]
        )
        return cur.rowcount
