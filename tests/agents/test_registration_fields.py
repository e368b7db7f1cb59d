"""Every field of the service-definition table works on every path at once.

The table (`meshproto.registration.decode.AGENT_SERVICE`, with its Connect,
Proxy, Upstreams and Checks sub-tables) is walked field by field; each field
gets a value of its type, and the definitions that hold them are registered

  A. with `PUT /v1/agent/service/register` on a real `mesh server`,
  B. as a definition file (snake_case, as Consul's config files spell it) in a
     real `mesh agent`'s config dir, read back from the agent's `/v1/agent` API,
  C. by that agent's `SyncNode` into the catalog, read back from the server's
     `/v1/catalog/node/<node>` and `/v1/health/node/<node>`.

All three must answer the same, and each field's value must show in the
answer (unless Consul's answers never echo it: NOT_ECHOED says why). A field
added to the table is walked here without touching this file.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from meshproto.registration import decode
from meshproto.servicedefs import DefinitionError, canonical_service, load_config_file
from tests.agents.conftest import eventually

pytestmark = pytest.mark.slow

# Fields Consul's JSON shapes do not echo back (so only "all paths agree" is shown).
NOT_ECHOED = {
    "ServiceID": "an inline check belongs to its service whatever it says",
    "SuccessBeforePassing": "not part of a check's Definition in Consul's answers",
    "FailuresBeforeCritical": "not part of a check's Definition in Consul's answers",
    "OutputMaxSize": "not part of a check's Definition in Consul's answers",
    "AliasService": "not part of a check's Definition in Consul's answers (Type shows alias)",
    "AliasNode": "not part of a check's Definition in Consul's answers (Type shows alias)",
    "SocketPath": "the catalog has no column for it yet (accepted and dropped everywhere alike)",
}
# Fields the sidecar rule sets whatever the definition says (Consul's agent does the same).
SET_BY_RULE = {
    "Connect.SidecarService.Proxy.DestinationServiceName",
    "Connect.SidecarService.Proxy.DestinationServiceID",
}
# Check fields that say how a check runs: one per check.
CHECK_KIND_FIELDS = ("HTTP", "TCP", "GRPC", "TTL", "AliasService", "AliasNode", "ScriptArgs")
# Values a field's rule constrains (everything else gets a unique marker of its type).
SPECIAL = {
    "Status": "passing",
    "HTTP": "http://127.0.0.1:1/walk",
    "TCP": "127.0.0.1:1",
    "GRPC": "127.0.0.1:1/walk",
    "TTL": "1h",
    "Interval": "11s",
    "Timeout": "3s",
    "DeregisterCriticalServiceAfter": "13m0s",
    "DestinationType": "service",
    "Namespace": "default",
}


class Walk:
    """Values for the fields of a table, and the (table, field) pairs visited."""

    def __init__(self) -> None:
        self.visited: set[tuple[int, str]] = set()
        self.markers: list[tuple[str, Any]] = []  # (field path, value that must show)
        self.counter = 19000

    def value(self, dec: Any, name: str, path: str) -> Any:
        kind = getattr(dec, "kind", None)
        table = getattr(dec, "__self__", None)
        if isinstance(table, decode.Struct):
            return self.struct(table, path)
        if kind == "lazy":
            return self.struct(dec.factory(), path)
        if kind == "list":
            return [self.value(dec.item, name, f"{path}[0]")]
        if kind == "map":
            return {"walk-key": self.value(dec.item, name, f"{path}.walk-key")}
        self.counter += 1
        if name in SPECIAL:
            value = SPECIAL[name]
        elif kind == "str":
            value = f"walk-{name.lower()}-{self.counter}"
        elif kind == "int":
            value = self.counter
        elif kind == "bool":
            value = True
        elif kind == "duration":
            value = "17s"
        elif kind == "any":
            value = {"walk": f"walk-{name.lower()}-{self.counter}"}
        else:
            raise AssertionError(f"{path}: a decoder this walk does not know ({dec!r})")
        self.markers.append((path, value))
        return value

    def struct(self, table: decode.Struct, path: str, only=None, skip=()) -> dict:
        out = {}
        for name, dec in table.fields.items():
            if (only is not None and name not in only) or name in skip:
                continue
            self.visited.add((id(table), name))
            out[name] = self.value(dec, name, f"{path}.{name}" if path else name)
        return out


def all_pairs(table: decode.Struct, seen: set[int] | None = None) -> set[tuple[int, str]]:
    """Every (table, field) reachable from `table`."""
    seen = set() if seen is None else seen
    if id(table) in seen:
        return set()
    seen.add(id(table))
    pairs = set()
    for name, dec in table.fields.items():
        pairs.add((id(table), name))
        while getattr(dec, "kind", None) in ("list", "map"):
            dec = dec.item
        if getattr(dec, "kind", None) == "lazy":
            dec = dec.factory().decode
        sub = getattr(dec, "__self__", None)
        if isinstance(sub, decode.Struct):
            pairs |= all_pairs(sub, seen)
    return pairs


def definitions() -> tuple[list[dict], Walk, dict]:
    """Definitions that together give every field of the table a value, each valid."""
    walk = Walk()
    svc, check = decode.AGENT_SERVICE, decode.AGENT_CHECK
    main = walk.struct(svc, "", skip=("Kind", "Check", "Checks", "Connect"))
    main["Connect"] = walk.struct(decode.CONNECT, "Connect", only=("Native",))
    # One check per way of running one, the rest of a check's fields on the TTL one.
    main["Checks"] = [
        {
            **walk.struct(check, "Checks[0]", skip=CHECK_KIND_FIELDS),
            **walk.struct(check, "Checks[0]", only=("TTL",)),
        }
    ]
    for kind in CHECK_KIND_FIELDS[:-1]:
        if kind != "TTL":
            c = walk.struct(check, f"Checks.{kind}", only=(kind,))
            if kind in ("HTTP", "TCP", "GRPC"):
                c["Interval"] = "11s"
            main["Checks"].append(c)
    main["Check"] = {"CheckID": "walk-single", "TTL": "1h"}
    walk.visited |= {(id(svc), "Check"), (id(svc), "Checks"), (id(svc), "Connect")}
    kind = {
        "ID": "walk-proxy",
        "Name": "walk-proxy",
        "Kind": "connect-proxy",
        "Port": 19998,
        "Proxy": {"DestinationServiceName": main["Name"]},
    }
    walk.visited.add((id(svc), "Kind"))
    sidecar = {"ID": "walk-sc", "Name": "walk-sc", "Port": 19997}
    sidecar["Connect"] = {
        "SidecarService": walk.struct(svc, "Connect.SidecarService", only=("Proxy",))
    }
    walk.visited.add((id(decode.CONNECT), "SidecarService"))
    script = {"Name": "walk-script", "Check": {"ScriptArgs": ["/bin/true"], "Interval": "5s"}}
    walk.visited.add((id(check), "ScriptArgs"))
    return [main, kind, sidecar], walk, script


def snake(value: Any, dec: Any) -> Any:
    """A definition as Consul's config files spell it (struct keys in snake_case)."""
    table = getattr(dec, "__self__", None)
    if getattr(dec, "kind", None) == "lazy":
        table = dec.factory()
    if isinstance(table, decode.Struct):
        return {_snake(k): snake(v, table.fields[k]) for k, v in value.items()}
    if getattr(dec, "kind", None) == "list":
        return [snake(v, dec.item) for v in value]
    if getattr(dec, "kind", None) == "map":
        return {k: snake(v, dec.item) for k, v in value.items()}
    return value


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def normal_services(services: dict, ids: set[str]) -> dict:
    drop = ("CreateIndex", "ModifyIndex", "ContentHash")
    return {
        sid: {k: v for k, v in s.items() if k not in drop}
        for sid, s in services.items()
        if sid in ids
    }


def normal_checks(checks: list[dict], ids: set[str]) -> dict:
    out = {}
    for c in checks:
        if c["ServiceID"] not in ids:
            continue
        c = {k: v for k, v in c.items() if k not in ("Node", "CreateIndex", "ModifyIndex")}
        c.pop("Output")
        if c["Type"] != "ttl":
            c.pop("Status")  # run by each side's own prober: when it ran is not the point
        out[c["CheckID"]] = c
    return out


def test_every_field_of_the_table_works_in_the_api_in_agent_files_and_over_sync(
    control_plane, make_agent, unique
):
    defs, walk, script = definitions()
    missing = all_pairs(decode.AGENT_SERVICE) - walk.visited
    tables = {id(v): k for k, v in vars(decode).items() if isinstance(v, decode.Struct)}
    names = {f"{tables.get(t, t)}.{n}" for t, n in missing}
    assert not missing, f"fields of the table the walk did not visit: {names}"

    # A: the control plane's own /v1/agent API.
    with control_plane.client() as cp:
        for d in defs:
            r = cp.put("/v1/agent/service/register", json=d)
            assert r.status_code == 200, (d["ID"], r.text)
        r = cp.put("/v1/agent/service/register", json=script)
        assert r.status_code == 400 and "script checks are not supported" in r.text
        ids = {d["ID"] for d in defs} | {"walk-sc-sidecar-proxy"}
        a_services = normal_services(cp.get("/v1/agent/services").json(), ids)
        a_checks = normal_checks(list(cp.get("/v1/agent/checks").json().values()), ids)
    assert set(a_services) == ids

    # B: a definition file read by a real agent.
    files = {
        "walk.json": json.dumps({"services": [snake(d, decode.AGENT_SERVICE.decode) for d in defs]})
    }
    agent = make_agent(files=files)
    with agent.client() as http:
        b_services = normal_services(http.get("/v1/agent/services").json(), ids)
        b_checks = normal_checks(list(http.get("/v1/agent/checks").json().values()), ids)
        r = http.put("/v1/agent/service/register", json=script)
        assert r.status_code == 400 and "script checks are not supported" in r.text
    with pytest.raises(DefinitionError, match="script checks are not supported"):
        canonical_service(snake(script, decode.AGENT_SERVICE.decode))

    # C: what the agent's SyncNode put in the catalog.
    def synced() -> tuple[dict, dict]:
        with control_plane.client() as cp:
            node = cp.get(f"/v1/catalog/node/{agent.node}").json() or {}
            services = normal_services(node.get("Services") or {}, ids)
            checks = normal_checks(cp.get(f"/v1/health/node/{agent.node}").json(), ids)
        assert set(services) == set(a_services) and set(checks) == set(a_checks)
        return services, checks

    c_services, c_checks = eventually(synced, timeout=60)

    assert b_services == a_services
    assert c_services == a_services
    assert b_checks == a_checks
    assert c_checks == a_checks

    shown = json.dumps([a_services, a_checks])
    unseen = [
        (path, value)
        for path, value in walk.markers
        if path.rsplit(".", 1)[-1].split("[")[0] not in NOT_ECHOED
        and path not in SET_BY_RULE
        and json.dumps(value)[1:-1] not in shown
        and not (value is True and "true" in shown)
    ]
    assert not unseen, f"fields whose value no answer shows: {unseen}"


def test_the_walk_reaches_every_sub_table():
    """Connect, Proxy, Upstreams, Checks, Weights and TaggedAddresses are all walked."""
    _defs, walk, _script = definitions()
    tables = {t for t, _ in walk.visited}
    for table in (
        decode.AGENT_SERVICE,
        decode.AGENT_CHECK,
        decode.CONNECT,
        decode.PROXY,
        decode.UPSTREAM,
        decode.WEIGHTS,
        decode.SERVICE_ADDRESS,
    ):
        assert id(table) in tables


def test_a_new_field_is_walked_without_touching_the_walk(monkeypatch):
    monkeypatch.setitem(decode.UPSTREAM.fields, "WalkNew", decode.Str)
    _defs, walk, _script = definitions()
    assert (id(decode.UPSTREAM), "WalkNew") in walk.visited
    assert any(path.endswith("Upstreams[0].WalkNew") for path, _ in walk.markers)


def test_the_agents_local_api_and_files_keep_the_decoders_bounds(make_agent, tmp_path):
    agent = make_agent()
    with agent.client() as http:
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
            r = http.put("/v1/agent/service/register", content=body)
            assert r.status_code == 400 and "nested deeper than 64 levels" in r.text
        for check, field in (
            ({"TTL": "1000000000h"}, "Check.TTL"),
            ({"TTL": "1s", "Interval": 2**63}, "Check.Interval"),
        ):
            r = http.put("/v1/agent/service/register", json={"Name": "bounded", "Check": check})
            assert r.status_code == 400 and field in r.text, r.text
        r = http.put("/v1/agent/service/register", content=b'{"Name": "bounded", "Port": NaN}')
        assert r.status_code == 400 and "NaN is not valid JSON" in r.text
        assert "bounded" not in http.get("/v1/agent/services").json()
    path = tmp_path / "bounded.yaml"
    path.write_text("service:\n  name: bounded\n  port: .nan\n")
    with pytest.raises(DefinitionError, match="bounded.yaml: service\\[0\\].Port"):
        load_config_file(path)
