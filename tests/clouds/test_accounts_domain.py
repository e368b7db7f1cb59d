"""Cloud accounts and the sync engine's rules, on the real database (no cloud needed)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from django.utils import timezone

from clouds.domain import accounts, sync
from clouds.models import CloudAccount, SyncRun
from clouds.providers.base import ImportedInstance, Inventory, ItemError
from registry.domain import catalog
from registry.errors import BadRequest, Conflict
from registry.models import ServiceInstance

SECRET = "very-secret-access-key/unit"


def make(name: str = "acct", **kw) -> CloudAccount:
    args = dict(
        name=name,
        provider="aws",
        datacenter="dc1",
        regions=["us-east-1"],
        credentials={"access_key_id": "AKIAUNITTESTKEY00001", "secret_access_key": SECRET},
    )
    return accounts.create_account(**{**args, **kw})


def inst(sid: str, name: str = "web", health: str = "passing", **kw) -> ImportedInstance:
    return ImportedInstance(
        service_id=sid,
        name=name,
        address=kw.get("address", "10.1.1.1"),
        port=kw.get("port", 80),
        tags=(),
        meta={"aws-instance-id": sid},
        health=health,
        health_output=f"cloud says {health}",
    )


def test_it_stores_credentials_only_encrypted_and_never_shows_them(db):
    account = make()
    row = CloudAccount.objects.get(pk=account.pk)
    assert row.credentials_encrypted.startswith("fernet:")
    assert SECRET not in row.credentials_encrypted
    assert accounts.spec_of(row).credentials["secret_access_key"] == SECRET
    assert SECRET not in repr(accounts.spec_of(row))
    shown = accounts.account_json(row)
    assert shown["credentials"] == "stored" and SECRET not in str(shown)


def test_a_new_datacenter_is_the_clouds_region(db):
    from registry.models import Datacenter

    make("east", datacenter="aws-east", regions=["us-east-2"])
    dc = Datacenter.objects.get(name="aws-east")
    assert (dc.provider, dc.region) == ("aws", "us-east-2")
    with pytest.raises(BadRequest, match="Invalid datacenter name"):
        make("west", datacenter="no such dc")


def test_an_account_without_credentials_uses_the_environment(db):
    account = make("envy", credentials=None)
    assert account.credentials_encrypted == ""
    assert accounts.spec_of(account).credentials is None


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"name": "Bad Name"}, "Invalid account name"),
        ({"provider": "ibm"}, "Unknown provider"),
        ({"regions": []}, "name at least one AWS region"),
        ({"regions": ["moon-1"]}, "unknown AWS region(s): moon-1"),
        ({"credentials": {"access_key_id": "x", "secret_access_key": "y"}}, "access_key_id"),
        ({"credentials": {"access_key_id": "AKIAUNITTESTKEY00001"}}, "secret_access_key"),
        ({"endpoint_url": "ftp://x"}, "endpoint_url"),
        ({"interval": 5}, "interval"),
        ({"interval": 10**12}, "interval"),
        ({"endpoint_url": "http://x/" + "a" * 600}, "too long"),
        ({"import_config": {"s3": {}}}, "unknown key(s) s3"),
        ({"import_config": {"cloud_map": {"namespaces": "ns"}}}, "namespaces"),
        ({"import_config": {"cloud_map": {"service_name": "{nope}"}}}, "service_name"),
        ({"export_config": {"services": ["web"]}}, "name the Cloud Map namespace"),
    ],
)
def test_it_refuses_what_it_cannot_use_and_stores_nothing(db, kw, message):
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        make(**kw)
    assert not CloudAccount.objects.exists()


def test_a_taken_name_is_a_conflict(db):
    make()
    with pytest.raises(Conflict):
        make()


def test_an_import_creates_updates_and_removes_on_the_accounts_own_node(db):
    account = make()
    plan, errors = sync.apply_import(account, Inventory((inst("a"), inst("b"))))
    assert (len(plan.create), errors) == (2, [])
    node = catalog.find_node("cloud-acct")
    assert node.meta["mesh-cloud-account"] == "acct" and node.datacenter.name == "dc1"
    # Someone else's instance on the account's node is none of the engine's business.
    catalog.catalog_register(
        {"Node": "cloud-acct", "SkipNodeUpdate": True, "Service": {"Service": "x", "Name": "x"}}
    )
    plan, _ = sync.apply_import(account, Inventory((inst("a", health="critical"), inst("c"))))
    assert ([w.service_id for w in plan.update], plan.remove) == (["a"], ("b",))
    assert [w.service_id for w in plan.create] == ["c"]
    ids = set(ServiceInstance.objects.filter(node=node).values_list("service_id", flat=True))
    assert ids == {"a", "c", "x"}
    stored = sync.stored_instances(account)
    assert stored["a"].health == "critical" and stored["a"].health_output == "cloud says critical"
    # The same inventory again: nothing to do.
    plan, _ = sync.apply_import(account, Inventory((inst("a", health="critical"), inst("c"))))
    assert plan.empty


def test_two_accounts_with_the_same_service_keep_apart(db):
    one, two = make("one"), make("two")
    sync.apply_import(one, Inventory((inst("i-1"),)))
    sync.apply_import(two, Inventory((inst("i-1"),)))
    sync.apply_import(one, Inventory(()))  # one's instance leaves; two's stays
    rows = list(ServiceInstance.objects.filter(name="web").values_list("node__name", flat=True))
    assert rows == ["cloud-two"]


def test_an_item_the_cloud_could_not_describe_keeps_its_last_state(db):
    account = make()
    sync.apply_import(account, Inventory((inst("a"),)))
    plan, _ = sync.apply_import(
        account, Inventory((), (ItemError("cloudmap:x", "malformed port", "a"),))
    )
    assert plan.empty
    assert ServiceInstance.objects.filter(service_id="a").exists()


def test_a_name_the_catalog_refuses_is_recorded_not_applied(db):
    account = make()
    plan, errors = sync.apply_import(account, Inventory((inst("a", name=""), inst("b"))))
    assert [w.service_id for w in plan.create] == ["b"]
    assert len(errors) == 1 and "refused by the catalog: Missing service name" in errors[0].message


def test_a_second_run_is_skipped_while_one_holds_the_account(db):
    account = make()
    holder = SyncRun.objects.create(account=account, status=SyncRun.RUNNING)
    CloudAccount.objects.filter(pk=account.pk).update(
        lease_until=timezone.now() + timedelta(minutes=5), lease_run=holder.pk
    )
    run = sync.sync_cloud_account(sync.request_sync("acct").pk)
    assert run.status == SyncRun.SKIPPED
    assert f"another sync of acct is running (run {holder.pk})" in run.errors[0]["message"]
    holder.refresh_from_db()
    assert holder.status == SyncRun.RUNNING


def test_a_run_whose_process_died_is_abandoned_when_its_lease_ran_out(db, settings):
    account = make()
    dead = SyncRun.objects.create(account=account, status=SyncRun.RUNNING, phase="applying")
    lost = SyncRun.objects.create(account=account)  # queued, never taken by a worker
    SyncRun.objects.filter(pk=lost.pk).update(queued_at=timezone.now() - timedelta(hours=1))
    fresh = SyncRun.objects.create(account=account)  # queued just now: still waiting
    CloudAccount.objects.filter(pk=account.pk).update(
        lease_until=timezone.now() - timedelta(seconds=1), lease_run=dead.pk
    )
    # The stored credentials cannot be read with another key: the run fails, named why.
    settings.MESH_ENCRYPTION_KEY = Fernet.generate_key().decode()
    run = sync.sync_cloud_account(sync.request_sync("acct").pk)
    dead.refresh_from_db()
    assert dead.status == SyncRun.ABANDONED
    assert "abandoned during applying" in dead.errors[-1]["message"]
    lost.refresh_from_db()
    fresh.refresh_from_db()
    assert (lost.status, fresh.status) == (SyncRun.ABANDONED, SyncRun.QUEUED)
    assert run.status == SyncRun.FAILED
    assert "cannot decrypt the stored cloud credentials" in run.errors[0]["message"]
    account.refresh_from_db()
    assert account.lease_run is None and account.next_sync_at > timezone.now()


def test_removing_an_account_removes_its_node_and_runs(db):
    account = make()
    sync.apply_import(account, Inventory((inst("a"),)))
    SyncRun.objects.create(account=account)
    accounts.delete_account("acct")
    assert catalog.find_node("cloud-acct") is None
    assert not SyncRun.objects.exists()


def test_a_run_delivered_twice_is_left_to_the_worker_that_holds_it(db):
    account = make()
    run = sync.request_sync("acct")
    CloudAccount.objects.filter(pk=account.pk).update(
        lease_until=timezone.now() + timedelta(minutes=5), lease_run=run.pk
    )
    again = sync.sync_cloud_account(run.pk)
    assert again.status == SyncRun.QUEUED and again.errors == []
