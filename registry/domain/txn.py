"""Multi-operation transactions (`PUT /v1/txn`), with Consul's verbs and answers.

A transaction is decoded and checked as a whole first (shape, size, verbs,
the caller's permission for every operation); then every operation runs in
one database transaction under one index (`registry.txn.one_index`), each in
its own savepoint so that a failed operation leaves nothing behind while the
others are still tried and their errors collected. Any error rolls the whole
transaction back: all or nothing. KV operations reuse the KV store's own
writes (`registry.domain.kv`), catalog operations the catalog's
(`registry.domain.catalog`), so a transaction obeys the same rules (locks,
lock-delay, sessions, audit) as the single-operation endpoints.

A transaction made only of reads never needs the writer: it is answered in
one read transaction (repeatable read on PostgreSQL) on the read pool.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from registry import decode
from registry.domain import catalog, kv, rows, shapes
from registry.errors import BadRequest, MeshError, TooLarge
from registry.models import Check, KVEntry, Node, ServiceInstance
from registry.txn import current_index, one_index

KV_VERBS = frozenset(
    {
        "set",
        "cas",
        "lock",
        "unlock",
        "get",
        "get-tree",
        "check-index",
        "check-session",
        "check-not-exists",
        "delete",
        "delete-tree",
        "delete-cas",
    }
)
# CATALOG_VERBS (Node, Service, Check) is the table of their handlers' verbs, below.
KV_READS = frozenset({"get", "get-tree", "check-index", "check-session", "check-not-exists"})
PERMISSION_DENIED = "Permission denied"


class TxnFailed(MeshError):
    """Some operations failed: the transaction was rolled back (Consul's 409 answer)."""

    status = 409

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} of the transaction's operations failed")
        self.errors = errors

    def body(self) -> dict[str, Any]:
        return {"Results": None, "Errors": self.errors}


@dataclass
class Op:
    """One decoded operation: its kind (`KV`, `Node`, `Service`, `Check`), verb and fields."""

    index: int
    kind: str
    verb: str
    spec: dict[str, Any] = field(default_factory=dict)
    value: bytes = b""

    @property
    def is_read(self) -> bool:
        if self.kind == "KV":
            return self.verb in KV_READS
        return self.verb == "get"


def max_ops() -> int:
    """`MESH_TXN_MAX_OPS`: Consul's limit of 128 operations per transaction by default."""
    return settings.MESH_TXN_MAX_OPS


# --- decoding ---------------------------------------------------------------------------


def _uint(value: Any, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > kv.UINT64_MAX:
        raise BadRequest(f"Failed to parse body: {what} must be an unsigned integer")
    return value


def _str(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"Failed to parse body: {what} must be a string")
    return value


def decode_ops(body: Any) -> list[Op]:
    """The operations of a `PUT /v1/txn` body; 400 for a malformed one, 413 past the limits.

    An unknown verb is not a decoding error in Consul: it is reported as the
    operation's error (409), see `_verb_errors`.
    """
    if body is None:
        raise BadRequest("Failed to parse body: empty body")
    if not isinstance(body, list):
        raise BadRequest("Failed to parse body: a transaction is a JSON array of operations")
    limit = max_ops()
    if len(body) > limit:
        raise TooLarge(f"Transaction contains too many operations ({len(body)} > {limit})")
    ops: list[Op] = []
    for i, raw in enumerate(body):
        if not isinstance(raw, dict) or len(raw) != 1:
            raise BadRequest(
                f"Failed to parse body: operation {i} must be an object with one of "
                "KV, Node, Service or Check"
            )
        ((kind, spec),) = raw.items()
        kind = {"kv": "KV", "node": "Node", "service": "Service", "check": "Check"}.get(
            str(kind).lower(), kind
        )
        if kind not in ("KV", "Node", "Service", "Check") or not isinstance(spec, dict):
            raise BadRequest(f"Failed to parse body: operation {i}: unknown operation {kind!r}")
        spec = {str(k)[:1].upper() + str(k)[1:]: v for k, v in spec.items()}
        verb = _str(spec.get("Verb"), f"operation {i}'s Verb")
        op = Op(i, kind, verb, spec)
        if kind == "KV":
            op.spec["Key"] = _str(spec.get("Key"), f"operation {i}'s Key")
            op.spec["Index"] = _uint(spec.get("Index"), f"operation {i}'s Index")
            op.spec["Flags"] = _uint(spec.get("Flags"), f"operation {i}'s Flags")
            op.spec["Session"] = _str(spec.get("Session"), f"operation {i}'s Session")
            raw_value = _str(spec.get("Value"), f"operation {i}'s Value")
            try:
                op.value = base64.b64decode(raw_value, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(
                    f"Failed to parse body: operation {i}'s Value is not valid base64"
                ) from None
            if len(op.value) > settings.MESH_KV_MAX_VALUE_SIZE:
                raise TooLarge(
                    f"Value for key {op.spec['Key']!r} is too large "
                    f"({len(op.value)} > {settings.MESH_KV_MAX_VALUE_SIZE} bytes)"
                )
        else:
            inner = spec.get(kind)
            if inner is not None and not isinstance(inner, dict):
                raise BadRequest(f"Failed to parse body: operation {i}'s {kind} must be an object")
            op.spec[kind] = dict(inner or {})
            if kind == "Service":
                op.spec["Node"] = _str(spec.get("Node"), f"operation {i}'s Node")
        ops.append(op)
    return ops


def is_read_only(ops: list[Op]) -> bool:
    return all(op.is_read for op in ops)


def _verb_errors(ops: list[Op]) -> list[dict[str, Any]]:
    errors = []
    for op in ops:
        verbs = KV_VERBS if op.kind == "KV" else CATALOG_VERBS
        if op.verb not in verbs:
            errors.append(_error(op, f"unknown {op.kind} verb {op.verb!r}"))
    return errors


def _error(op: Op, what: str) -> dict[str, Any]:
    return {"OpIndex": op.index, "What": what}


# --- permissions --------------------------------------------------------------------------


def _node_name(op: Op) -> str:
    if op.kind == "Node":
        return str(op.spec["Node"].get("Node") or "")
    if op.kind == "Check":
        return str(op.spec["Check"].get("Node") or "")
    return op.spec.get("Node", "")


def _service_name(op: Op) -> str:
    """The service a Service or Check operation writes (by name, as ACL rules say)."""
    if op.kind == "Service":
        svc = op.spec["Service"]
        name = svc.get("Service") or ""
        if not name and svc.get("ID"):
            stored = _instance(op.spec["Node"], svc["ID"])
            name = stored.name if stored is not None else ""
        return name
    check = op.spec["Check"]
    if check.get("ServiceID"):
        stored = _instance(_node_name(op), check["ServiceID"])
        return stored.name if stored is not None else check.get("ServiceName") or ""
    return ""


def _allowed(authz, op: Op) -> bool:
    """Consul's per-operation check (`vetTxnOp`): reads are filtered on the way out."""
    if op.kind == "KV":
        key = op.spec["Key"]
        if op.verb in ("get", "get-tree"):
            return True
        if op.verb in ("check-index", "check-session"):
            return authz.key_read(key)
        if op.verb == "delete-tree":
            return authz.key_write_prefix(key)
        return authz.key_write(key)
    if op.verb == "get":
        return True
    if op.kind == "Node":
        return authz.node_write(_node_name(op))
    service = _service_name(op)
    if op.kind == "Check" and not service:
        return authz.node_write(_node_name(op))
    return authz.service_write(service)


def _visible(authz, op: Op, result: dict[str, Any]) -> bool:
    if "KV" in result:
        return authz.key_read(result["KV"]["Key"])
    if "Node" in result:
        return authz.node_read(result["Node"]["Node"])
    if "Service" in result:
        return authz.node_read(_node_name(op)) and authz.service_read(result["Service"]["Service"])
    check = result["Check"]
    if check.get("ServiceName"):
        return authz.service_read(check["ServiceName"])
    return authz.node_read(check["Node"])


# --- running ---------------------------------------------------------------------------------


def _kv_entry(key: str) -> KVEntry | None:
    # Plain SQL on the unique key: a 10-operation transaction reads ten of these.
    return rows.first(KVEntry, key=key)


def _kv_result(key: str, *, with_value: bool = False) -> list[dict[str, Any]]:
    entry = _kv_entry(key)
    if entry is None:
        return []
    out = kv.entry_json(entry)
    if not with_value:
        out["Value"] = None
    out.setdefault("Session", "")
    return [{"KV": out}]


def _kv(op: Op) -> list[dict[str, Any]]:
    key, index, session = op.spec["Key"], op.spec["Index"], op.spec["Session"]
    verb = op.verb
    if verb in ("get-tree", "delete-tree"):
        kv.validate_key(key, allow_empty=True)
    else:
        kv.validate_key(key)
    if verb == "get":
        found = _kv_result(key, with_value=True)
        if not found:
            raise BadRequest(f"key {key!r} doesn't exist")
        return found
    if verb == "get-tree":
        return [{"KV": {**kv.entry_json(e), "Session": e.session_id or ""}} for e in kv._under(key)]
    if verb in ("check-index", "check-session", "check-not-exists"):
        entry = _kv_entry(key)
        if verb == "check-not-exists":
            if entry is not None:
                raise BadRequest(f"key {key!r} exists")
            return []
        if entry is None:
            raise BadRequest(f"failed to check {verb[6:]}, key {key!r} doesn't exist")
        if verb == "check-index" and entry.modify_index != index:
            raise BadRequest(
                f"failed index check for key {key!r}, current modify index "
                f"{entry.modify_index} != {index}"
            )
        if verb == "check-session" and (entry.session_id or "") != session:
            raise BadRequest(
                f"failed session check for key {key!r}, current session "
                f"{entry.session_id or ''!r} != {session!r}"
            )
        return _kv_result(key)
    if verb == "set":
        kv.put(key, op.value, flags=op.spec["Flags"])
        return _kv_result(key)
    if verb == "cas":
        if not kv.put(key, op.value, flags=op.spec["Flags"], cas=index):
            raise BadRequest(f"failed to set key {key!r}, index is stale")
        return _kv_result(key)
    if verb == "lock":
        if not kv.put(key, op.value, flags=op.spec["Flags"], acquire=session):
            raise BadRequest(f"failed to lock key {key!r}, lock is already held")
        return _kv_result(key)
    if verb == "unlock":
        if not kv.put(key, op.value, flags=op.spec["Flags"], release=session):
            raise BadRequest(
                f"failed to unlock key {key!r}, lock isn't held, or is held by another session"
            )
        return _kv_result(key)
    if verb == "delete":
        kv.delete(key)
        return []
    if verb == "delete-tree":
        kv.delete(key, recurse=True)
        return []
    # delete-cas
    if not kv.delete(key, cas=index):
        raise BadRequest(f"failed to delete key {key!r}, index is stale")
    return []


def _instance(node: str, service_id: str) -> ServiceInstance | None:
    return (
        ServiceInstance.objects.select_related("node__datacenter")
        .filter(node__name=node, service_id=service_id)
        .first()
    )


def _cas(index: Any, stored, what: str) -> None:
    """Consul's catalog cas: index 0 means "only if absent", else the ModifyIndex must match."""
    index = _uint(index, "ModifyIndex")
    if (index == 0 and stored is not None) or (
        index != 0 and (stored is None or stored.modify_index != index)
    ):
        raise BadRequest(f"failed to set {what}, index is stale")


@dataclass(frozen=True)
class _Target:
    """The catalog row one Node, Service or Check operation names.

    `key` is its name or ID on `node`; `what` names it in error messages ("node 'a'", "service 'web'"); `where`
    adds its node where the row lives on one ("... on node 'a'").
    """

    node: str
    key: str
    what: str
    where: str
    stored: Any
    deregister: dict[str, str]
    result: Callable[[], list[dict[str, Any]]]


def _node_target(op: Op) -> _Target:
    name = _node_name(op)
    if not name:
        raise BadRequest("Must provide node")

    def result() -> list[dict[str, Any]]:
        node = Node.objects.select_related("datacenter").get(name=name)
        return [{"Node": shapes.node_json(node)}]

    return _Target(
        node=name,
        key=name,
        what=f"node {name!r}",
        where="",
        stored=Node.objects.select_related("datacenter").filter(name=name).first(),
        deregister={"Node": name},
        result=result,
    )


def _service_target(op: Op) -> _Target:
    spec = op.spec["Service"]
    node = _node_name(op)
    service_id = str(spec.get("ID") or spec.get("Service") or "")
    if not node or not service_id:
        raise BadRequest("Must provide a node and a service ID")

    def result() -> list[dict[str, Any]]:
        svc = _instance(node, service_id)
        return [{"Service": shapes.agent_service_json(svc, with_index=True)}]

    return _Target(
        node=node,
        key=service_id,
        what=f"service {service_id!r}",
        where=f" on node {node!r}",
        stored=_instance(node, service_id),
        deregister={"Node": node, "ServiceID": service_id},
        result=result,
    )


def _check_target(op: Op) -> _Target:
    spec = op.spec["Check"]
    node = _node_name(op)
    check_id = str(spec.get("CheckID") or spec.get("Name") or "")
    if not node or not check_id:
        raise BadRequest("Must provide a node and a check ID")

    def result() -> list[dict[str, Any]]:
        check = Check.objects.select_related("node").get(node__name=node, check_id=check_id)
        return [{"Check": shapes.check_json(check)}]

    return _Target(
        node=node,
        key=check_id,
        what=f"check {check_id!r}",
        where=f" on node {node!r}",
        stored=Check.objects.filter(node__name=node, check_id=check_id).first(),
        deregister={"Node": node, "CheckID": check_id},
        result=result,
    )


def _node_register(spec: dict[str, Any], target: _Target) -> dict[str, Any]:
    register = {"Node": target.node, "Address": spec.get("Address") or ""}
    for ours, theirs in (
        ("ID", "ID"),
        ("Datacenter", "Datacenter"),
        ("TaggedAddresses", "TaggedAddresses"),
        ("NodeMeta", "Meta"),
    ):
        if spec.get(theirs):
            register[ours] = spec[theirs]
    return register


_SERVICE_FIELDS = (
    ("ID", "ID"),
    ("Name", "Service"),
    ("Kind", "Kind"),
    ("Tags", "Tags"),
    ("Address", "Address"),
    ("Port", "Port"),
    ("Meta", "Meta"),
    ("TaggedAddresses", "TaggedAddresses"),
    ("Weights", "Weights"),
    ("EnableTagOverride", "EnableTagOverride"),
    ("Proxy", "Proxy"),
    ("Connect", "Connect"),
)


def _service_register(spec: dict[str, Any], target: _Target) -> dict[str, Any]:
    service = {ours: spec[theirs] for ours, theirs in _SERVICE_FIELDS if spec.get(theirs)}
    service["ID"] = target.key
    return {"Node": target.node, "SkipNodeUpdate": True, "Service": service}


def _check_register(spec: dict[str, Any], target: _Target) -> dict[str, Any]:
    check_id = target.key
    check = {
        k: spec[k]
        for k in ("CheckID", "Name", "Status", "Notes", "Output", "ServiceID", "Definition")
        if spec.get(k) not in (None, "")
    }
    check["CheckID"] = check_id
    check.setdefault("Name", check_id)
    return {"Node": target.node, "SkipNodeUpdate": True, "Check": check}


@dataclass(frozen=True)
class _CatalogKind:
    """How one catalog kind finds its row and builds its registration."""

    target: Callable[[Op], _Target]
    register: Callable[[dict[str, Any], _Target], dict[str, Any]]
    # A service or check lives on a node that must exist; a node op makes its own.
    needs_node: bool


_CATALOG = {
    "Node": _CatalogKind(_node_target, _node_register, needs_node=False),
    "Service": _CatalogKind(_service_target, _service_register, needs_node=True),
    "Check": _CatalogKind(_check_target, _check_register, needs_node=True),
}


def _catalog_get(op: Op, kind: _CatalogKind, target: _Target) -> list[dict[str, Any]]:
    if target.stored is None:
        raise BadRequest(f"{target.what}{target.where} doesn't exist")
    return target.result()


def _catalog_delete(op: Op, kind: _CatalogKind, target: _Target) -> list[dict[str, Any]]:
    stored = target.stored
    if op.verb == "delete-cas" and (
        stored is None
        or stored.modify_index != _uint(op.spec[op.kind].get("ModifyIndex"), "ModifyIndex")
    ):
        raise BadRequest(f"failed to delete {target.what}, index is stale")
    catalog.catalog_deregister(target.deregister)
    return []


def _catalog_set(op: Op, kind: _CatalogKind, target: _Target) -> list[dict[str, Any]]:
    spec = op.spec[op.kind]
    if op.verb == "cas":
        _cas(spec.get("ModifyIndex"), target.stored, target.what)
    if kind.needs_node and not Node.objects.filter(name=target.node).exists():
        raise BadRequest(f"node {target.node!r} doesn't exist")
    catalog.catalog_register(decode.CATALOG_REGISTER(kind.register(spec, target)))
    return target.result()


# The verbs of Node, Service and Check operations, one handler each.
_CATALOG_HANDLERS = {
    "get": _catalog_get,
    "set": _catalog_set,
    "cas": _catalog_set,
    "delete": _catalog_delete,
    "delete-cas": _catalog_delete,
}
CATALOG_VERBS = frozenset(_CATALOG_HANDLERS)


def _catalog_op(op: Op) -> list[dict[str, Any]]:
    """Run one Node, Service or Check operation (its verb was checked by `check`)."""
    kind = _CATALOG[op.kind]
    return _CATALOG_HANDLERS[op.verb](op, kind, kind.target(op))


def _run_ops(authz, ops: list[Op]) -> list[dict[str, Any]]:
    """Run every operation; raise `TxnFailed` with all the errors.

    A KV operation decides before it writes and writes once (see
    `registry.domain.kv`), so a failed one has written nothing; a catalog
    operation may write several rows before it fails, so it runs in a
    savepoint of its own.
    """
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for op in ops:
        try:
            if op.kind == "KV":
                out = _kv(op)
            else:
                with transaction.atomic():
                    out = _catalog_op(op)
        except MeshError as exc:
            errors.append(_error(op, exc.message))
            continue
        results.extend(r for r in out if _visible(authz, op, r))
    if errors:
        raise TxnFailed(errors)
    return results


def check(authz, ops: list[Op]) -> None:
    """Refuse unknown verbs and operations the caller may not do, before running anything."""
    errors = _verb_errors(ops)
    bad = {e["OpIndex"] for e in errors}
    for op in ops:
        if op.index not in bad and not _allowed(authz, op):
            errors.append(_error(op, PERMISSION_DENIED))
    if errors:
        errors.sort(key=lambda e: e["OpIndex"])
        raise TxnFailed(errors)


def apply(authz, ops: list[Op]) -> tuple[int, list[dict[str, Any]]]:
    """Run a transaction that writes: all of it under one index, or none of it."""
    check(authz, ops)
    with one_index() as change:
        results = _run_ops(authz, ops)
        index = change.index
    return index, results


def read(authz, ops: list[Op]) -> tuple[int, list[dict[str, Any]]]:
    """Run a read-only transaction in one consistent read (no writer, no index taken)."""
    check(authz, ops)
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        index = current_index()
        results = _run_ops(authz, ops)
    return index, results
