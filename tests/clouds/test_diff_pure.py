"""The cloud-sync diff on plain data: creates, updates and removes only what differs."""

from __future__ import annotations

import pytest

from clouds import diff
from clouds.providers.base import ExportedInstance, ImportedInstance, IngressRule


def imported(sid: str, **kw) -> ImportedInstance:
    base = dict(
        service_id=sid,
        name="web",
        address="10.0.0.1",
        port=80,
        tags=("t",),
        meta={"k": "v"},
        health="passing",
        health_output="ok",
    )
    return ImportedInstance(**{**base, **kw})


def stored(w: ImportedInstance, **kw) -> diff.StoredInstance:
    base = dict(
        service_id=w.service_id,
        name=w.name,
        address=w.address,
        port=w.port,
        tags=w.tags,
        meta=w.meta,
        health=w.health,
        health_output=w.health_output,
    )
    return diff.StoredInstance(**{**base, **kw})


def test_it_plans_nothing_when_the_catalog_matches():
    wanted = [imported("a"), imported("b")]
    plan = diff.import_plan(wanted, {w.service_id: stored(w) for w in wanted})
    assert plan.empty


@pytest.mark.parametrize(
    "change",
    [
        {"address": "10.0.0.2"},
        {"port": 81},
        {"tags": ("u",)},
        {"meta": {"k": "w"}},
        {"name": "api"},
        {"health": "critical"},
        {"health_output": "down"},
        {"health": None},
    ],
)
def test_it_updates_an_instance_that_differs_in_any_field(change):
    w = imported("a")
    plan = diff.import_plan([w], {"a": stored(w, **change)})
    assert (plan.create, plan.update, plan.remove) == ((), (w,), ())


def test_it_creates_new_and_removes_gone_instances_only():
    keep, new = imported("keep"), imported("new")
    plan = diff.import_plan([keep, new], {"keep": stored(keep), "gone": stored(imported("gone"))})
    assert (plan.create, plan.update, plan.remove) == ((new,), (), ("gone",))


def test_it_keeps_stored_instances_the_cloud_could_not_describe():
    plan = diff.import_plan([], {"bad": stored(imported("bad"))}, keep={"bad"})
    assert plan.empty


def exported(iid: str, health: str = "HEALTHY", **attrs) -> ExportedInstance:
    return ExportedInstance("web", iid, {"AWS_INSTANCE_IPV4": "10.0.0.1", **attrs}, health)


def test_an_export_registers_new_and_changed_updates_health_and_removes_its_own():
    current = {
        "web/same": exported("same"),
        "web/moved": exported("moved"),
        "web/sick": exported("sick"),
        "web/gone": exported("gone"),
    }
    wanted = [
        exported("same"),
        exported("moved", AWS_INSTANCE_IPV4="10.0.0.9"),
        exported("sick", "UNHEALTHY"),
        exported("new"),
    ]
    plan = diff.export_plan(wanted, current)
    assert [i.instance_id for i in plan.register] == ["moved", "new"]
    assert [i.instance_id for i in plan.update_health] == ["sick"]
    assert [i.instance_id for i in plan.deregister] == ["gone"]
    assert diff.export_plan(wanted[:1], {"web/same": exported("same")}).empty


def rule(cidr: str, description: str = "meshweb gateway dc2/gw") -> IngressRule:
    return IngressRule("tcp", 8443, cidr, description)


def test_a_firewall_plan_adds_missing_rules_and_removes_only_its_own_stale_ones():
    current = [
        rule("198.51.100.1/32"),  # wanted, there
        rule("198.51.100.2/32"),  # meshweb's, no longer wanted
        rule("0.0.0.0/0", "ssh by hand"),  # someone else's
    ]
    wanted = [rule("198.51.100.1/32"), rule("198.51.100.3/32")]
    plan = diff.firewall_plan("sg-1", wanted, current)
    assert [r.cidr for r in plan.add] == ["198.51.100.3/32"]
    assert [r.cidr for r in plan.remove] == ["198.51.100.2/32"]
    # Descriptions do not make rules differ: the same rule with another text is in place.
    again = diff.firewall_plan("sg-1", wanted, [rule("198.51.100.1/32", "x"), *wanted[1:]])
    assert again.empty


def test_ingress_rules_come_from_peer_gateway_addresses_and_name_what_they_skip():
    from clouds.domain.gateway import Gateway, ingress_rules

    peers = [
        Gateway("gcp-west", "gw-1", "mesh-gateway", "198.51.100.7", 8443),
        Gateway("gcp-west", "gw-2", "mesh-gateway", "198.51.100.7", 8443),  # same address
        Gateway("onprem", "gw-3", "mesh-gateway", "gw.example.net", 8443),
        Gateway("azure", "gw-4", "mesh-gateway", "2001:db8::1", 8443),
    ]
    rules, notes = ingress_rules(9443, peers)
    assert [(r.protocol, r.port, r.cidr) for r in rules] == [("tcp", 9443, "198.51.100.7/32")]
    assert rules[0].description.startswith(diff.RULE_PREFIX)
    assert len(notes) == 2
    assert "gw.example.net" in notes[0] and "not an IP" in notes[0]
    assert "IPv6" in notes[1]


def test_exported_instance_ids_fit_cloud_map_and_stay_stable():
    from clouds.providers.aws import export_instance_id

    assert export_instance_id("host-1", "web-1") == "host-1.web-1"
    assert export_instance_id("host 1", "web#1") == "host_1.web_1"
    long = export_instance_id("n" * 50, "s" * 50)
    assert len(long) == 64 and long == export_instance_id("n" * 50, "s" * 50)
    assert long != export_instance_id("n" * 50, "s" * 49 + "t")
