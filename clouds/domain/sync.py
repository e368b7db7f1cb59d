"""The sync engine: one run of one account, read → diff → apply → record.

    queued ──claim──> running ──> succeeded | failed
       │                 └── (process died) ──> abandoned, found by the next run
       └── (account held by another run) ──> skipped

- One sync per account at a time: a run claims its account with a conditional
  UPDATE of the account's lease (`lease_until`, `lease_run`), which works the
  same on PostgreSQL and SQLite, across any number of workers, and frees
  itself when the process holding it dies (the lease runs out).
- Read everything first (every page), then plan with the pure diff
  (`clouds.diff`), then apply. An unchanged item is not written: a sync that
  finds nothing new writes nothing to the catalog, not even an index.
- The catalog side is written in one transaction through the registry's own
  catalog functions (`registry.domain.catalog`): a run that fails or is killed
  half-way leaves the catalog as it was. Exports are applied to the cloud
  before it (cloud writes cannot be rolled back; they are idempotent and a
  later run converges).
- Ownership: an account's imported instances live on its own node
  (`cloud-<account>`) and carry `external-source` and `mesh-cloud-account`
  meta; the engine touches nothing else. Exported instances carry the
  account's name as an attribute; import skips them, and an export only
  deregisters its own.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from clouds import diff
from clouds.domain.accounts import CredentialsError, get_account, node_name, spec_of
from clouds.models import CloudAccount, SyncRun
from clouds.providers import open_provider
from clouds.providers.base import (
    ImportedInstance,
    Inventory,
    ItemError,
    MeshInstance,
    ProviderError,
)
from registry import audit
from registry.domain import catalog
from registry.errors import MeshError
from registry.models import Check, ServiceInstance
from registry.txn import Change

log = logging.getLogger(__name__)

OWNER_KEY = "mesh-cloud-account"
SOURCE_KEY = "external-source"
NODE_ADDRESS = "0.0.0.0"  # an account's node stands for the cloud, not a host


def request_sync(name: str, trigger: str = "demand") -> SyncRun:
    """Queue a run of account `name` (404 if unknown); the caller dispatches it."""
    account = get_account(name)
    return SyncRun.objects.create(account=account, trigger=trigger)


def _lease() -> timedelta:
    return timedelta(seconds=settings.MESH_CLOUD_SYNC_LEASE_SECONDS)


def _claim(account: CloudAccount, run: SyncRun) -> bool:
    now = timezone.now()
    claimed = (
        CloudAccount.objects.filter(pk=account.pk)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        .update(lease_until=now + _lease(), lease_run=run.pk)
    )
    return claimed == 1


def _renew(account: CloudAccount, run: SyncRun) -> None:
    CloudAccount.objects.filter(pk=account.pk, lease_run=run.pk).update(
        lease_until=timezone.now() + _lease()
    )


def _release(account: CloudAccount, run: SyncRun) -> None:
    now = timezone.now()
    CloudAccount.objects.filter(pk=account.pk, lease_run=run.pk).update(
        lease_until=None,
        lease_run=None,
        next_sync_at=now + timedelta(seconds=account.interval_seconds),
    )


def _phase(run: SyncRun, phase: str) -> None:
    run.phase = phase
    SyncRun.objects.filter(pk=run.pk).update(phase=phase)


def _error(ref: str, message: str) -> dict[str, str]:
    return {"ref": ref, "message": message}


def sync_cloud_account(run_id: int) -> SyncRun | None:
    """Run the queued run `run_id` (None if it is gone; unchanged if not queued)."""
    run = SyncRun.objects.select_related("account").filter(pk=run_id).first()
    if run is None or run.status != SyncRun.QUEUED:
        return run
    account = run.account
    now = timezone.now()
    if not _claim(account, run):
        holder = CloudAccount.objects.filter(pk=account.pk).values_list("lease_run", flat=True)
        if holder.first() == run.pk:
            return run  # this very run, delivered twice: another worker has it
        run.status, run.finished_at = SyncRun.SKIPPED, now
        run.errors = [
            _error(
                f"account:{account.name}",
                f"another sync of {account.name} is running (run {holder.first()}); "
                "this one did not start",
            )
        ]
        run.save()
        return run
    # Runs that still say "running" lost their process: their lease ran out before ours.
    # Runs queued longer than a lease ago were lost before any worker took them.
    stale_runs = SyncRun.objects.filter(account=account).exclude(pk=run.pk)
    stale_runs = stale_runs.filter(
        Q(status=SyncRun.RUNNING) | Q(status=SyncRun.QUEUED, queued_at__lt=now - _lease())
    )
    for stale in stale_runs:
        stale.status, stale.finished_at = SyncRun.ABANDONED, now
        stale.errors = [
            *stale.errors,
            _error(
                f"run:{stale.pk}",
                f"abandoned during {stale.phase or 'the queue'}: its process stopped; "
                "nothing it had not committed was applied",
            ),
        ]
        stale.save()
    run.status, run.started_at, run.phase = SyncRun.RUNNING, now, "reading"
    run.save()
    provider = None
    try:
        provider = open_provider(account.provider, spec_of(account))
        _run(account, run, provider)
        run.status = SyncRun.SUCCEEDED
    except (ProviderError, CredentialsError, MeshError) as exc:
        run.status = SyncRun.FAILED
        run.errors = [*run.errors, _error(f"account:{account.name}", str(exc))]
        log.warning("cloud sync of %s failed: %s", account.name, exc)
    except Exception as exc:
        run.status = SyncRun.FAILED
        run.errors = [
            *run.errors,
            _error(f"account:{account.name}", f"internal error: {type(exc).__name__}"),
        ]
        log.exception("cloud sync of %s failed", account.name)
    finally:
        if provider is not None:
            run.api_calls, run.retries = provider.stats.calls, provider.stats.retries
            run.notes = list(provider.stats.notes)
        run.finished_at = timezone.now()
        run.phase = "done"
        run.save()
        _release(account, run)
    return run


def _run(account: CloudAccount, run: SyncRun, provider) -> None:
    inventory = provider.inventory()
    run.errors = [_error(e.ref, e.message) for e in inventory.errors]
    exports = list((account.export_config or {}).get("services") or [])
    if exports or (account.export_config or {}).get("namespace"):
        _phase(run, "exporting")
        current = provider.export_state(exports)
        wanted = [provider.export_item(m) for m in mesh_instances(account, exports)]
        plan = diff.export_plan(wanted, current)
        if not plan.empty:
            _renew(account, run)
            failed = provider.apply_export(plan)
            run.errors += [_error(e.ref, e.message) for e in failed]
        run.exported_created = sum(
            1 for w in plan.register if f"{w.service}/{w.instance_id}" not in current
        )
        run.exported_updated = len(plan.register) - run.exported_created + len(plan.update_health)
        run.exported_removed = len(plan.deregister)
    _phase(run, "applying")
    _renew(account, run)
    plan, errors = apply_import(account, inventory)
    run.errors += [_error(e.ref, e.message) for e in errors]
    run.created, run.updated, run.removed = len(plan.create), len(plan.update), len(plan.remove)


# --- the catalog side -------------------------------------------------------------------


def mesh_instances(account: CloudAccount, services: list[str]) -> list[MeshInstance]:
    """The account's datacenter's own instances of `services` (never imported ones)."""
    if not services:
        return []
    rows = list(
        ServiceInstance.objects.select_related("node")
        .filter(name__in=services, kind="typical", node__datacenter__name=account.datacenter)
        .order_by("node__name", "service_id")
    )
    rows = [r for r in rows if SOURCE_KEY not in (r.meta or {})]
    checks = catalog.checks_for(rows)
    return [
        MeshInstance(
            service=r.name,
            node=r.node.name,
            service_id=r.service_id,
            address=r.address or r.node.address,
            port=r.port,
            healthy=catalog.aggregate_status(c.status for c in checks.get(r.pk, []))
            == Check.PASSING,
        )
        for r in rows
    ]


def stored_instances(account: CloudAccount) -> dict[str, diff.StoredInstance]:
    """What the account imported earlier, as the catalog holds it."""
    node = catalog.find_node(node_name(account))
    if node is None:
        return {}
    health = {
        sid.removeprefix("service:"): (status, output)
        for sid, status, output in Check.objects.filter(
            node_id=node.pk, check_id__startswith="service:"
        ).values_list("check_id", "status", "output")
    }
    out = {}
    for sid, name, address, port, tags, meta in ServiceInstance.objects.filter(
        node_id=node.pk
    ).values_list("service_id", "name", "address", "port", "tags", "meta"):
        if (meta or {}).get(OWNER_KEY) != account.name:
            continue  # not this account's (registered on its node by someone else)
        status, output = health.get(sid, (None, ""))
        out[sid] = diff.StoredInstance(sid, name, address, port, tuple(tags), meta, status, output)
    return out


def _spec(w: ImportedInstance) -> dict[str, Any]:
    return {
        "ID": w.service_id,
        "Name": w.name,
        "Address": w.address,
        "Port": w.port,
        "Tags": list(w.tags),
        "Meta": dict(w.meta),
    }


def _owned(account: CloudAccount, inventory: Inventory) -> list[ImportedInstance]:
    owner = {SOURCE_KEY: account.provider, OWNER_KEY: account.name}
    return [dataclasses.replace(w, meta={**w.meta, **owner}) for w in inventory.instances]


def _refusals(
    account: CloudAccount, wanted: list[ImportedInstance]
) -> tuple[list[ImportedInstance], list[ItemError]]:
    """Leave out what the catalog would refuse or what would take another's name."""
    node = node_name(account)
    names = {w.name for w in wanted}
    taken = {
        name
        for name, meta, owner in ServiceInstance.objects.filter(name__in=names)
        .exclude(node__name=node)
        .values_list("name", "meta", "node__name")
        if SOURCE_KEY not in (meta or {})
    }
    ok, errors = [], []
    for w in wanted:
        ref = f"{account.provider}:{w.service_id}"
        if w.name in taken:
            errors.append(
                ItemError(
                    ref,
                    f'service "{w.name}" is registered by mesh agents: the cloud\'s '
                    f"{w.meta.get('aws-ec2-instance-id') or w.meta.get('aws-instance-id') or w.service_id} "
                    "was not imported under that name",
                    # No service_id: an earlier import of it leaves (the agents own the name).
                )
            )
            continue
        try:
            catalog.validate_service(_spec(w))
        except MeshError as exc:
            errors.append(ItemError(ref, f"refused by the catalog: {exc}", w.service_id))
            continue
        ok.append(w)
    return ok, errors


def apply_import(
    account: CloudAccount, inventory: Inventory
) -> tuple[diff.ImportPlan, list[ItemError]]:
    """Bring the account's node to `inventory`, all in one transaction."""
    wanted, errors = _refusals(account, _owned(account, inventory))
    stored = stored_instances(account)
    # Items the cloud listed but that could not be read (or imported) keep their last state.
    keep = {e.service_id for e in (*errors, *inventory.errors) if e.service_id}
    plan = diff.import_plan(wanted, stored, keep=keep)
    if plan.empty:
        return plan, errors
    actor = audit.Actor(f"cloud:{account.name}", f"cloud account {account.name}", "cloud")
    with audit.scope(actor, "cloud.sync"), Change() as change:
        node = _ensure_node(account)
        for w in plan.create:
            svc = catalog.save_instance(change, node, _spec(w), agent_local=False)
            _health(change, node, svc, w, new=True)
        for w in plan.update:
            s = stored[w.service_id]
            svc = None
            if (s.name, s.address, s.port, tuple(s.tags), s.meta) != (
                w.name,
                w.address,
                w.port,
                tuple(w.tags),
                w.meta,
            ):
                svc = catalog.save_instance(change, node, _spec(w), agent_local=False)
            if (s.health, s.health_output) != (w.health, w.health_output):
                svc = svc or ServiceInstance.objects.get(node_id=node.pk, service_id=w.service_id)
                svc.node = node
                _health(change, node, svc, w)
        if plan.remove:
            for svc in ServiceInstance.objects.select_related("node").filter(
                node_id=node.pk, service_id__in=plan.remove
            ):
                catalog.delete_instance(change, svc)
    return plan, errors


def _ensure_node(account: CloudAccount):
    name = node_name(account)
    node = catalog.find_node(name)
    meta = {"external-node": "true", SOURCE_KEY: account.provider, OWNER_KEY: account.name}
    if node is None or node.meta != meta or node.datacenter.name != account.datacenter:
        catalog.catalog_register(
            {
                "Node": name,
                "Address": NODE_ADDRESS,
                "Datacenter": account.datacenter,
                "NodeMeta": meta,
            }
        )
        node = catalog.find_node(name)
    return node


def _health(
    change: Change, node, svc: ServiceInstance, w: ImportedInstance, new: bool = False
) -> None:
    # A new instance has no check yet: say so, and spare the lookup.
    known = {"existing": None} if new else {}
    catalog.upsert_check(
        change,
        node,
        {
            "Status": w.health,
            "Notes": f"health as {w.meta.get(SOURCE_KEY, 'the cloud')} reports it",
        },
        check_id=f"service:{w.service_id}",
        name=f"{w.meta.get(SOURCE_KEY, 'cloud')} health",
        svc=svc,
        agent_local=False,
        status=w.health,
        output=w.health_output,
        **known,
    )
