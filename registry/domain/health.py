"""Health checking for the checks on the control plane's own node.

`tick()` is the one periodic entry point (the in-process loop and Celery beat
both call it). Each call, idempotently and safely beside other workers:

1. claims the due HTTP / TCP / gRPC checks (a conditional UPDATE of
   `next_run_at`, so two workers never run the same check run) and probes them
   on a small bounded thread pool, each with its own timeout;
2. turns TTL checks whose `ttl_expires_at` passed critical ("TTL expired"),
   once per lapse;
3. recomputes alias checks when any check, service or node changed;
4. deregisters services whose check has been critical longer than its
   `DeregisterCriticalServiceAfter`;
5. expires sessions whose TTL lapsed (`sessions.expire_sessions`, when present).

Only checks of the server's own node (`MESH_NODE_NAME`) run here: other nodes'
checks belong to their per-host agents.

Results are stored with `catalog.apply_check_result` inside a `Change`, which
bumps indexes (and wakes watchers) only when a status or output changed; a
result equal to the stored one writes nothing.

Probes (`probe_http`, `probe_tcp`, `probe_grpc`) and the Consul rules around
them (`threshold_step`, `alias_result`, `ttl_expired_output`) are plain
functions on plain data in `meshproto.probes`, shared with the agent.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connections, transaction
from django.db.models import Q
from django.utils import timezone

# The probes and Consul's rules around results live in meshproto.probes (one
# implementation for the control plane and the per-host agent).
from meshproto.probes import (  # noqa: F401 - re-exported for callers and tests
    DEFAULT_OUTPUT_MAX,
    DEFAULT_TIMEOUT,
    MAX_REDIRECTS,
    PROBED_TYPES,
    USER_AGENT,
    Result,
    alias_result,
    probe_grpc,
    probe_http,
    probe_tcp,
    probe_timeout,
    threshold_step,
    ttl_expired_output,
    uses_thresholds,
)
from meshproto.probes import run as _run_kind
from registry import topics as topic
from registry.domain import catalog, connect_ca, enrollment
from registry.errors import NotFound
from registry.models import Check, Node, ServiceInstance
from registry.txn import Change, topic_index

log = logging.getLogger(__name__)
# Private to this module: the consecutive-results counter kept in Check.definition
# for SuccessBeforePassing / FailuresBeforeCritical (never shown by the API).
STREAK_KEY = "_streak"
# A change to any of these topics may change an alias check's answer.
ALIAS_TOPICS = (topic.CHECKS, topic.SERVICES, topic.NODES)


@dataclass(frozen=True)
class Probe:
    """A claimed check run, as plain data (what the pool threads get)."""

    pk: int
    kind: str
    definition: dict[str, Any]
    timeout: float


def run_probe(probe: Probe) -> Result:
    """Run one probe; never raises (an unexpected error is a critical result)."""
    try:
        return _run_kind(probe.kind, probe.definition, probe.timeout)
    except Exception as exc:  # a bad definition must not kill the pool thread
        log.warning("check %s probe failed unexpectedly", probe.pk, exc_info=True)
        return Result(Check.CRITICAL, f"check failed: {exc}")


# --- the pool of probe threads ---------------------------------------------------------

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_in_flight: set[int] = set()


def _executor() -> ThreadPoolExecutor:
    """The process's probe pool (recreated after a fork: Celery's prefork children)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(
                getattr(settings, "MESH_CHECK_CONCURRENCY", 8), thread_name_prefix="mesh-check"
            )
            _pool_pid = os.getpid()
            _in_flight.clear()
        return _pool


def _with_db_retry(fn, *args: Any) -> Any:
    """Run DB code from a pool thread; a dead pooled connection is dropped and retried once."""
    try:
        return fn(*args)
    except (OperationalError, InterfaceError):
        for conn in connections.all(initialized_only=True):
            conn.close()
        return fn(*args)
    finally:
        for conn in connections.all(initialized_only=True):
            if conn.errors_occurred and not conn.in_atomic_block:
                conn.close_if_unusable_or_obsolete()


def _probe_and_record(probe: Probe) -> None:
    try:
        result = run_probe(probe)
        _with_db_retry(record_result, probe, result)
    except Exception:
        log.exception("recording the result of check %s failed", probe.pk)
    finally:
        with _pool_lock:
            _in_flight.discard(probe.pk)


# --- the database shell ------------------------------------------------------------------


def _comparable(defn: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (defn or {}).items() if k != STREAK_KEY}


def record_result(probe: Probe, result: Result) -> bool:
    """Store a probe's result; True when the check's status or output changed.

    A result for a check that was deleted or re-registered with another
    definition while it ran is dropped (the next run uses the new definition).
    """
    check = Check.objects.filter(pk=probe.pk).only("status", "output", "definition").first()
    if check is None or _comparable(check.definition) != _comparable(probe.definition):
        return False
    defn = check.definition or {}
    apply, streak = True, None
    if uses_thresholds(defn):
        apply, streak = threshold_step(
            defn.get(STREAK_KEY),
            result.status,
            int(defn.get("SuccessBeforePassing") or 0),
            int(defn.get("FailuresBeforeCritical") or 0),
        )
    if apply and (result.status != check.status or result.output != check.output):
        # Lock order as every writer: the global index (Change) first, then the row.
        with Change() as change:
            row = (
                Check.objects.select_related("node").select_for_update().filter(pk=probe.pk).first()
            )
            if row is None or _comparable(row.definition) != _comparable(probe.definition):
                return False
            if streak is not None:
                row.definition = {**row.definition, STREAK_KEY: streak}
            catalog.apply_check_result(change, row, result.status, result.output)
        return True
    if streak is not None and streak != defn.get(STREAK_KEY):
        # Only the counter moved: no index, no topic, nobody to wake.
        with transaction.atomic():
            row = Check.objects.select_for_update().filter(pk=probe.pk).first()
            if row is not None and _comparable(row.definition) == _comparable(probe.definition):
                row.definition = {**row.definition, STREAK_KEY: streak}
                row.save(update_fields=["definition"])
    return False


def _claim(check: Check, now: datetime) -> bool:
    """Take this run of a due check: only one worker's UPDATE matches the value it read."""
    next_run = now + timedelta(seconds=max(check.interval, 0.1))
    return bool(
        Check.objects.filter(pk=check.pk, next_run_at=check.next_run_at).update(
            next_run_at=next_run
        )
    )


def _probe_of(check: Check) -> Probe:
    return Probe(
        pk=check.pk,
        kind=check.type,
        definition=dict(check.definition or {}),
        timeout=probe_timeout(check.timeout, check.interval),
    )


def run_due_checks(due: list[Check], now: datetime, *, wait: bool = False) -> int:
    """Claim and start the due probes; returns how many this worker took.

    With `wait`, probes still run concurrently but results are written by the
    calling thread before returning (tests use it); otherwise the pool
    threads write them as they finish, so a slow endpoint never holds up the
    tick loop.
    """
    pool = _executor()
    claimed: list[Probe] = []
    for check in due:
        with _pool_lock:
            if check.pk in _in_flight:  # still running here from an earlier tick
                continue
        if _claim(check, now):
            claimed.append(_probe_of(check))
    if not claimed:
        return 0
    if wait:
        futures: dict[Future, Probe] = {pool.submit(run_probe, p): p for p in claimed}
        for fut in as_completed(futures):
            record_result(futures[fut], fut.result())
        return len(claimed)
    with _pool_lock:
        _in_flight.update(p.pk for p in claimed)
    for p in claimed:
        pool.submit(_probe_and_record, p)
    return len(claimed)


def run_check(check_pk: int) -> Result | None:
    """Run one HTTP/TCP/gRPC check now and store its result (None: nothing to run).

    The run is claimed like a scheduled one (its next run moves one interval
    on), so a tick running the same check at the same moment does not double it.
    """
    check = Check.objects.filter(pk=check_pk, type__in=PROBED_TYPES).first()
    if check is None or not _claim(check, timezone.now()):
        return None
    probe = _probe_of(check)
    result = run_probe(probe)
    record_result(probe, result)
    return result


def expire_ttl_checks(lapsed: list[Check]) -> int:
    """Turn lapsed TTL checks critical, once per lapse (the timer is cleared until
    the next pass/warn/fail re-arms it)."""
    expired = 0
    for check in lapsed:
        with Change() as change:
            claimed = Check.objects.filter(pk=check.pk, ttl_expires_at=check.ttl_expires_at).update(
                ttl_expires_at=None
            )
            if not claimed:  # renewed, deleted or expired by another worker meanwhile
                continue
            row = Check.objects.select_related("node").select_for_update().get(pk=check.pk)
            catalog.apply_check_result(change, row, Check.CRITICAL, ttl_expired_output(row.output))
            # apply_check_result re-arms a TTL timer; a lapsed one stays unarmed.
            Check.objects.filter(pk=row.pk).update(ttl_expires_at=None)
            expired += 1
    return expired


_alias_seen: dict[str, int] = {}


def update_alias_checks(node_name: str, *, force: bool = False) -> int:
    """Recompute the node's alias checks when a check, service or node changed.

    One small query (the topics' index) when nothing changed since this
    process last looked; the answer is idempotent, so several workers agree.
    """
    seen_key = f"{os.getpid()}:{node_name}"
    index = topic_index(*ALIAS_TOPICS)
    if not force and _alias_seen.get(seen_key) == index:
        return 0
    aliases = list(Check.objects.filter(node__name=node_name, type="alias").select_related("node"))
    changed = 0
    for alias in aliases:
        result = _alias_status(alias)
        if (result.status, result.output) == (alias.status, alias.output):
            continue
        with Change() as change:
            row = (
                Check.objects.select_related("node").select_for_update().filter(pk=alias.pk).first()
            )
            if row is None:
                continue
            result = _alias_status(row)
            if (result.status, result.output) != (row.status, row.output):
                catalog.apply_check_result(change, row, result.status, result.output)
                changed += 1
    _alias_seen[seen_key] = index
    return changed


def _alias_status(alias: Check) -> Result:
    defn = alias.definition or {}
    service_id = defn.get("AliasService") or ""
    node_name = defn.get("AliasNode") or alias.node.name
    node = Node.objects.filter(name=node_name).only("pk").first()
    if node is None:
        return Result(Check.CRITICAL, f"Node {node_name} could not be found")
    found = (
        bool(service_id)
        and ServiceInstance.objects.filter(node=node, service_id=service_id).exists()
    )
    q = Q(service_id="") | Q(service_id=service_id) if service_id else Q(service_id="")
    rows = (
        Check.objects.filter(node=node)
        .filter(q)
        .exclude(pk=alias.pk)
        .order_by("check_id")
        .values_list("service_id", "name", "status", "output")
    )
    return alias_result(rows, service_id, node_name, found)


def reap_critical_services(candidates: list[Check], now: datetime) -> int:
    """Deregister services whose check stayed critical past DeregisterCriticalServiceAfter."""
    reaped = 0
    for check in candidates:
        if not check.service_id or check.critical_since is None:
            continue
        if check.critical_since + timedelta(seconds=check.deregister_after) > now:
            continue
        with Change():
            # Re-read under the lock: the check may have passed since we looked.
            row = Check.objects.select_for_update().filter(pk=check.pk).first()
            if row is None or row.status != Check.CRITICAL or row.critical_since is None:
                continue
            if row.critical_since + timedelta(seconds=row.deregister_after) > now:
                continue
            try:
                catalog.deregister_agent_service(check.node, check.service_id)
            except NotFound:  # already gone (another worker, or a user)
                continue
            log.info(
                "deregistered service %s: check %s critical since %s",
                check.service_id,
                check.check_id,
                check.critical_since.isoformat(),
            )
            reaped += 1
    return reaped


def expire_sessions() -> int:
    """Session TTL expiry, when the sessions module offers it."""
    from registry.domain import sessions

    fn = getattr(sessions, "expire_sessions", None)
    if fn is None:
        return 0
    return int(fn() or 0)


def tick(*, wait: bool = False) -> dict[str, int]:
    """One pass of health work for this server's node; returns what it did.

    Idempotent and safe beside other workers (see the module docstring). With
    nothing due it costs two small queries (plus session expiry's own).
    """
    now = timezone.now()
    node_name = settings.MESH_NODE_NAME
    rows = list(
        Check.objects.select_related("node")
        .filter(node__name=node_name)
        .filter(
            Q(type__in=PROBED_TYPES, next_run_at__lte=now)
            | Q(type="ttl", ttl_expires_at__lte=now)
            | Q(deregister_after__gt=0, critical_since__isnull=False)
        )
        .order_by("next_run_at", "pk")
    )
    due = [c for c in rows if c.type in PROBED_TYPES and c.next_run_at and c.next_run_at <= now]
    lapsed = [c for c in rows if c.type == "ttl" and c.ttl_expires_at and c.ttl_expires_at <= now]
    dying = [c for c in rows if c.deregister_after > 0 and c.critical_since is not None]
    connect_ca.retire_expired_roots()  # old CA roots whose last leaf expired (idle: no query)
    return {
        "checks_run": run_due_checks(due, now, wait=wait) if due else 0,
        "ttl_expired": expire_ttl_checks(lapsed) if lapsed else 0,
        "aliases_updated": update_alias_checks(node_name),
        "services_deregistered": reap_critical_services(dying, now) if dying else 0,
        "sessions_expired": expire_sessions(),
        "nodes_down": enrollment.sweep_liveness(now),
    }
