"""Snapshots of the whole registry: save one consistent archive, restore it all or nothing.

What is saved: every table of the registry app (catalog, KV, sessions, ACL
policies and tokens, intentions, config entries, the CA's configuration and
roots with their private keys as stored, still encrypted, join tokens and
enrollments, events, prepared queries, ...), found from the app's models so
a new table is included without a line here; the audit log unless asked not
to. Rows are read in one read transaction (repeatable read on PostgreSQL, a
WAL read snapshot on SQLite), so the archive is one point in time.

Restoring replaces those tables in one transaction: the archive is verified
first (`meshproto.snapshot.unpack`: truncation, checksums, format version)
and refused when it was taken with a schema newer than this server's (a
migration unknown here) or names a table or column this server lacks; any
failure while loading rolls everything back. The restore takes an index
above both the current one and the snapshot's, sets every topic to it and
announces them all, so indexes never go backwards and every blocking query
and agent stream wakes to the restored state. Without the audit log in the
archive, the current audit log is kept (and records the restore).

Encrypted CA keys restore as they were stored: the server restoring must
have the same `MESH_ENCRYPTION_KEY` (or secret key) to use them.
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.management.color import no_style
from django.db import connection, models, transaction
from django.db.migrations.recorder import MigrationRecorder
from django.utils import timezone

from meshproto import snapshot as archive
from registry import topics as topic
from registry.domain import rows
from registry.errors import BadRequest
from registry.txn import Change, current_index

APP = "registry"
# Tables that describe running processes, not state: never saved nor replaced.
EPHEMERAL = frozenset({"serverprocess"})


def _models(include_audit: bool = True) -> list[type[models.Model]]:
    """The registry's tables (many-to-many ones included), parents before children."""
    found = [
        m
        for m in apps.get_app_config(APP).get_models(include_auto_created=True)
        if (include_audit or m._meta.model_name != "auditentry")
        and m._meta.model_name not in EPHEMERAL
    ]
    ordered: list[type[models.Model]] = []
    seen: set[type[models.Model]] = set()

    def visit(model: type[models.Model], path: tuple = ()) -> None:
        if model in seen or model in path:
            return
        for f in model._meta.concrete_fields:
            target = f.related_model if f.is_relation else None
            if target is not None and target is not model and target in found:
                visit(target, (*path, model))
        seen.add(model)
        ordered.append(model)

    for m in sorted(found, key=lambda m: m._meta.db_table):
        visit(m)
    return ordered


def _columns(model: type[models.Model]) -> list[models.Field]:
    return list(model._meta.concrete_fields)


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    return value


def _decode(field: models.Field, value: Any) -> Any:
    if value is None:
        return None
    kind = field.get_internal_type()
    if kind == "BinaryField":
        return base64.b64decode(value["b64"])
    if kind == "DateTimeField":
        return dt.datetime.fromisoformat(value)
    if kind == "DateField":
        return dt.date.fromisoformat(value)
    return value


def migrations() -> list[str]:
    """The registry migrations applied to this database (the schema a snapshot has)."""
    applied = MigrationRecorder(connection).applied_migrations()
    return sorted(name for app, name in applied if app == APP)


def _read_state(include_audit: bool) -> tuple[int, dict[str, dict[str, Any]], dict[str, int]]:
    index = current_index()
    state: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for model in _models(include_audit):
        fields = _columns(model)
        names = [f.attname for f in fields]
        values = model._base_manager.order_by("pk").values_list(*names)
        table_rows = [[_encode(v) for v in row] for row in values]
        state[model._meta.db_table] = {"columns": names, "rows": table_rows}
        counts[model._meta.db_table] = len(table_rows)
    return index, state, counts


def save(include_audit: bool = True) -> tuple[bytes, int]:
    """One consistent archive of the registry and the index it was taken at
    (read-only; never waits for the writer)."""
    if connection.vendor == "sqlite":
        # Django would open an IMMEDIATE (writing) transaction; a plain BEGIN is a
        # read snapshot in WAL mode from the first read on, and blocks no writer.
        with connection.cursor() as cur:
            cur.execute("BEGIN")
            try:
                index, state, counts = _read_state(include_audit)
                names = migrations()
            finally:
                cur.execute("COMMIT")
    else:
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            index, state, counts = _read_state(include_audit)
            names = migrations()
    meta = {
        "ID": str(uuid.uuid4()),
        "Index": index,
        "CreatedAt": timezone.now().isoformat(),
        "Datacenter": settings.MESH_DC,
        "Migrations": names,
        "Audit": include_audit,
        "Tables": counts,
    }
    return archive.pack(meta, state), index


def check_compatible(snap: archive.Snapshot) -> None:
    """Refuse a snapshot this server's schema cannot hold (400, nothing touched)."""
    known = set(migrations())
    newer = [m for m in snap.meta.get("Migrations") or [] if m not in known]
    if newer:
        raise BadRequest(
            "snapshot refused: it was taken with a newer schema (unknown migrations: "
            f"{', '.join(newer[:5])}); upgrade meshweb first"
        )
    by_table = {m._meta.db_table: m for m in _models()}
    for table, data in snap.state.items():
        model = by_table.get(table)
        if model is None:
            raise BadRequest(f"snapshot refused: unknown table {table!r}")
        columns = {f.attname for f in _columns(model)}
        unknown = [c for c in data["columns"] if c not in columns]
        if unknown:
            raise BadRequest(f"snapshot refused: unknown columns {unknown} in {table!r}")


def parse(data: bytes) -> archive.Snapshot:
    """The archive in `data`, verified and compatible with this server, or a 400."""
    try:
        snap = archive.unpack(data)
    except archive.SnapshotError as exc:
        raise BadRequest(f"snapshot refused: {exc}") from None
    check_compatible(snap)
    return snap


def _insert(model: type[models.Model], data: dict[str, Any]) -> None:
    fields = _columns(model)
    by_name = {f.attname: f for f in fields}
    columns = data["columns"]
    missing = [f for f in fields if f.attname not in columns]  # older snapshots: defaults
    names = [*columns, *(f.attname for f in missing)]
    defaults = [f.get_db_prep_save(f.get_default(), connection) for f in missing]
    table = connection.ops.quote_name(model._meta.db_table)
    quoted = ", ".join(connection.ops.quote_name(by_name[n].column) for n in names)
    sql = f"INSERT INTO {table} ({quoted}) VALUES ({', '.join(['%s'] * len(names))})"
    params = []
    for row in data["rows"]:
        if len(row) != len(columns):
            raise BadRequest(f"snapshot refused: a row of {model._meta.db_table!r} is malformed")
        values = [
            by_name[c].get_db_prep_save(_decode(by_name[c], v), connection)
            for c, v in zip(columns, row, strict=True)
        ]
        params.append([*values, *defaults])
    with rows.cursor() as cur:
        for start in range(0, len(params), 500):
            cur.executemany(sql, params[start : start + 500])


def _dangling_users(data: dict[str, Any]) -> None:
    """Tokens minted for UI users of another installation: keep the token, drop the user link."""
    if "user_id" not in data["columns"]:
        return
    from django.contrib.auth import get_user_model

    at = data["columns"].index("user_id")
    wanted = {r[at] for r in data["rows"] if r[at] is not None}
    if not wanted:
        return
    present = set(get_user_model().objects.filter(pk__in=wanted).values_list("pk", flat=True))
    for r in data["rows"]:
        if r[at] is not None and r[at] not in present:
            r[at] = None


def restore(snap: archive.Snapshot) -> int:
    """Replace the registry's state with `snap` in one transaction; returns the new index."""
    check_compatible(snap)
    with_audit = bool(snap.meta.get("Audit"))
    targets = _models(include_audit=with_audit)
    by_table = {m._meta.db_table: m for m in targets}
    with transaction.atomic():
        with rows.cursor() as cur:
            # Lock the index row first: writers on any server wait for the restore.
            cur.execute("UPDATE registry_meshindex SET value = value WHERE id = 1")
        before = current_index()
        for model in reversed(targets):
            model._base_manager.all()._raw_delete(connection.alias)
        with connection.constraint_checks_disabled():
            for model in targets:
                data = snap.state.get(model._meta.db_table)
                if data is None:
                    continue
                if model._meta.db_table == "registry_acltoken":
                    _dangling_users(data)
                _insert(model, data)
        connection.check_constraints(table_names=list(by_table))
        for sql in connection.ops.sequence_reset_sql(no_style(), targets):
            with rows.cursor() as cur:
                cur.execute(sql)
        base = max(before, int(snap.meta.get("Index") or 0))
        with rows.cursor() as cur:
            cur.execute("DELETE FROM registry_meshindex")
            cur.execute("INSERT INTO registry_meshindex (id, value) VALUES (1, %s)", [base])
        topics = list(apps.get_model(APP, "TopicIndex").objects.values_list("topic", flat=True))
        # One write above every index either side had: every topic moves to it and
        # is announced, so blocking readers and agent streams see the new state.
        with Change() as change:
            meta = {k: snap.meta.get(k) for k in ("ID", "Index", "CreatedAt", "Audit", "Tables")}
            change.audit("snapshot.restore", "snapshot", str(snap.meta.get("ID", "")), None, meta)
            change.touch(*topics, topic.ACL)
            index = change.index
        transaction.on_commit(_forget_cached_rows)
    return index


def _forget_cached_rows() -> None:
    """After a restore: what this process keeps in memory of the old rows goes (the
    trust domain may have changed with the cluster identity)."""
    from registry.domain import catalog, intentions, proxycfg

    catalog.forget_local_node()
    proxycfg.forget_shared_reads()
    intentions.reset_caches()
