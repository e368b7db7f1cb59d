"""`PUT /v1/txn` against a real server, through the unmodified py-consul client and raw HTTP."""

from __future__ import annotations

import base64
import threading

import consul
import consul.exceptions
import pytest

pytestmark = pytest.mark.slow


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _kv(verb: str, key: str, value: str | None = None, **extra) -> dict:
    op = {"Verb": verb, "Key": key, **extra}
    if value is not None:
        op["Value"] = _b64(value)
    return {"KV": op}


def test_py_consul_transaction_applies_every_op_under_one_index(consul_client, unique):
    key = unique("txn")
    answer = consul_client.txn.put(
        [_kv("set", f"{key}/a", "1"), _kv("set", f"{key}/b", "2", Flags=7), _kv("get", f"{key}/a")]
    )
    assert answer["Errors"] is None
    results = [r["KV"] for r in answer["Results"]]
    assert [r["Key"] for r in results] == [f"{key}/a", f"{key}/b", f"{key}/a"]
    assert results[0]["Value"] is None and results[1]["Flags"] == 7  # writes answer no value
    assert base64.b64decode(results[2]["Value"]) == b"1"  # a get in the same txn sees the set
    assert len({r["ModifyIndex"] for r in results}) == 1  # one index for the whole
    assert consul_client.kv.get(f"{key}/b")[1]["Value"] == b"2"


def test_a_failed_op_rolls_everything_back_with_409_errors(http, consul_client, unique):
    key = unique("txn")
    consul_client.kv.put(f"{key}/x", "old")
    _, entry = consul_client.kv.get(f"{key}/x")
    r = http.put(
        "/v1/txn",
        json=[
            _kv("set", f"{key}/new", "n"),
            _kv("cas", f"{key}/x", "v", Index=entry["ModifyIndex"] + 1000),
            _kv("check-not-exists", f"{key}/x"),
            _kv("delete", f"{key}/x"),
        ],
    )
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["Results"] is None
    assert [e["OpIndex"] for e in body["Errors"]] == [1, 2]
    assert "index is stale" in body["Errors"][0]["What"]
    assert "exists" in body["Errors"][1]["What"]
    assert consul_client.kv.get(f"{key}/new")[1] is None  # nothing applied
    assert consul_client.kv.get(f"{key}/x")[1]["Value"] == b"old"
    with pytest.raises(consul.exceptions.ClientError, match="409"):
        consul_client.txn.put([_kv("delete-cas", f"{key}/x", Index=1)])


def test_bad_transactions_are_refused_and_apply_nothing(http, consul_client, unique):
    key = unique("txn")
    # over the 128-operation limit: 413
    r = http.put("/v1/txn", json=[_kv("set", f"{key}/{i}", "v") for i in range(129)])
    assert r.status_code == 413 and "too many operations (129 > 128)" in r.text
    # an unknown verb: 409 naming it
    r = http.put("/v1/txn", json=[_kv("set", f"{key}/a", "v"), _kv("frobnicate", f"{key}/b")])
    assert r.status_code == 409
    assert r.json()["Errors"] == [{"OpIndex": 1, "What": "unknown KV verb 'frobnicate'"}]
    # malformed: not a list, bad base64, no operation kind, a string Index
    for body in (
        {"KV": {}},
        [{"KV": {"Verb": "set", "Key": f"{key}/a", "Value": "***"}}],
        [{}],
        [{"Bogus": {"Verb": "set"}}],
        [{"KV": {"Verb": "cas", "Key": f"{key}/a", "Index": "3"}}],
    ):
        r = http.put("/v1/txn", json=body)
        assert r.status_code == 400, (body, r.text)
    r = http.put("/v1/txn", content=b"[{")
    assert r.status_code == 400
    assert http.get("/v1/txn").status_code == 405
    assert consul_client.kv.get(key, recurse=True)[1] is None  # nothing at all was written


def test_read_only_transaction_reads_consistently_with_an_index(http, consul_client, unique):
    key = unique("txn")
    consul_client.kv.put(f"{key}/a", "A")
    consul_client.kv.put(f"{key}/b", "B")
    _, a = consul_client.kv.get(f"{key}/a")
    r = http.put(
        "/v1/txn",
        json=[
            _kv("get-tree", f"{key}/"),
            _kv("check-index", f"{key}/a", Index=a["ModifyIndex"]),
            _kv("check-not-exists", f"{key}/zzz"),
        ],
    )
    assert r.status_code == 200, r.text
    assert int(r.headers["X-Consul-Index"]) >= a["ModifyIndex"]
    results = [x["KV"] for x in r.json()["Results"]]
    assert [(x["Key"], base64.b64decode(x["Value"])) for x in results[:2]] == [
        (f"{key}/a", b"A"),
        (f"{key}/b", b"B"),
    ]
    assert results[2]["Key"] == f"{key}/a" and results[2]["Value"] is None
    r = http.put("/v1/txn", json=[_kv("get", f"{key}/missing")])
    assert r.status_code == 409 and "doesn't exist" in r.json()["Errors"][0]["What"]


def test_lock_and_unlock_with_a_session(consul_client, unique):
    key = unique("txn")
    session = consul_client.session.create(name="txn-lock")
    other = consul_client.session.create(name="txn-other")
    try:
        ok = consul_client.txn.put(
            [_kv("lock", key, "held", Session=session), _kv("check-session", key, Session=session)]
        )
        assert ok["Results"][0]["KV"]["Session"] == session
        assert ok["Results"][0]["KV"]["LockIndex"] == 1
        with pytest.raises(consul.exceptions.ClientError, match="lock is already held"):
            consul_client.txn.put([_kv("lock", key, "mine", Session=other)])
        assert consul_client.kv.get(key)[1]["Value"] == b"held"
        consul_client.txn.put([_kv("unlock", key, "free", Session=session)])
        assert "Session" not in consul_client.kv.get(key)[1]
    finally:
        consul_client.session.destroy(session)
        consul_client.session.destroy(other)


def test_node_service_and_check_operations(http, consul_client, unique):
    node = unique("txn-node")
    r = http.put(
        "/v1/txn",
        json=[
            {"Node": {"Verb": "set", "Node": {"Node": node, "Address": "10.1.2.3"}}},
            {
                "Service": {
                    "Verb": "set",
                    "Node": node,
                    "Service": {"ID": "web1", "Service": "web-txn", "Port": 8080, "Tags": ["v1"]},
                }
            },
            {
                "Check": {
                    "Verb": "set",
                    "Check": {
                        "Node": node,
                        "CheckID": "web1-up",
                        "Name": "up",
                        "Status": "passing",
                        "ServiceID": "web1",
                    },
                }
            },
        ],
    )
    assert r.status_code == 200, r.text
    results = r.json()["Results"]
    assert results[0]["Node"]["Address"] == "10.1.2.3"
    assert results[1]["Service"]["Service"] == "web-txn" and results[1]["Service"]["Port"] == 8080
    assert results[2]["Check"]["ServiceID"] == "web1"
    assert results[0]["Node"]["ModifyIndex"] == results[1]["Service"]["ModifyIndex"]
    _, nodes = consul_client.health.service("web-txn", passing=True)
    assert [n["Node"]["Node"] for n in nodes] == [node]
    # a stale service cas fails and the node delete in the same txn does not happen
    r = http.put(
        "/v1/txn",
        json=[
            {"Node": {"Verb": "delete", "Node": {"Node": node}}},
            {
                "Service": {
                    "Verb": "cas",
                    "Node": node,
                    "Service": {"ID": "web1", "Service": "web-txn", "ModifyIndex": 1},
                }
            },
        ],
    )
    assert r.status_code == 409 and r.json()["Errors"][0]["OpIndex"] == 1
    assert consul_client.catalog.node(node)[1]["Node"]["Node"] == node
    r = http.put("/v1/txn", json=[{"Node": {"Verb": "delete", "Node": {"Node": node}}}])
    assert r.status_code == 200, r.text
    assert consul_client.catalog.node(node)[1] is None


def test_catalog_verbs_say_what_is_missing_or_stale(http, unique):
    """Every Node, Service and Check verb names its row in its error, as Consul's do."""
    node = f"verbs-{unique}"

    def errors(*ops: dict) -> list[str]:
        r = http.put("/v1/txn", json=list(ops))
        assert r.status_code == 409, r.text
        return [e["What"] for e in r.json()["Errors"]]

    service = {"ID": "s1", "Service": "verbs-svc"}
    check = {"Node": node, "CheckID": "c1"}
    assert errors(
        {"Node": {"Verb": "get", "Node": {"Node": node}}},
        {"Service": {"Verb": "get", "Node": node, "Service": service}},
        {"Check": {"Verb": "get", "Check": check}},
        {"Node": {"Verb": "delete-cas", "Node": {"Node": node, "ModifyIndex": 1}}},
        {"Service": {"Verb": "set", "Node": node, "Service": service}},
        {"Check": {"Verb": "cas", "Check": {**check, "ModifyIndex": 5}}},
        {"Node": {"Verb": "get", "Node": {}}},
        {"Service": {"Verb": "get", "Node": node, "Service": {}}},
        {"Check": {"Verb": "get", "Check": {"Node": node}}},
    ) == [
        f"node {node!r} doesn't exist",
        f"service 's1' on node {node!r} doesn't exist",
        f"check 'c1' on node {node!r} doesn't exist",
        f"failed to delete node {node!r}, index is stale",
        f"node {node!r} doesn't exist",
        "failed to set check 'c1', index is stale",
        "Must provide node",
        "Must provide a node and a service ID",
        "Must provide a node and a check ID",
    ]
    r = http.put(
        "/v1/txn",
        json=[
            {"Node": {"Verb": "cas", "Node": {"Node": node, "Address": "10.9.9.9"}}},
            {"Service": {"Verb": "cas", "Node": node, "Service": service}},
            {"Check": {"Verb": "set", "Check": {**check, "ServiceID": "s1"}}},
        ],
    )
    assert r.status_code == 200, r.text
    made = r.json()["Results"]
    assert made[0]["Node"]["Address"] == "10.9.9.9"
    assert (made[1]["Service"]["ID"], made[2]["Check"]["Name"]) == ("s1", "c1")
    index = made[1]["Service"]["ModifyIndex"]
    assert errors(
        {
            "Service": {
                "Verb": "delete-cas",
                "Node": node,
                "Service": {**service, "ModifyIndex": index + 1},
            }
        },
        {"Service": {"Verb": "cas", "Node": node, "Service": {**service, "ModifyIndex": 0}}},
    ) == [
        "failed to delete service 's1', index is stale",
        "failed to set service 's1', index is stale",
    ]
    r = http.put(
        "/v1/txn",
        json=[
            {"Check": {"Verb": "get", "Check": check}},
            {
                "Service": {
                    "Verb": "delete-cas",
                    "Node": node,
                    "Service": {**service, "ModifyIndex": index},
                }
            },
            {"Node": {"Verb": "delete", "Node": {"Node": node}}},
        ],
    )
    assert r.status_code == 200, r.text
    assert r.json()["Results"][0]["Check"]["ServiceID"] == "s1"


def test_two_clients_racing_cas_exactly_one_wins_and_no_partial_state(server, unique):
    """Each client reads both keys' indexes, then cas-writes both in one txn: one wins a round."""
    key = unique("race")
    seed = server.consul()
    seed.kv.put(f"{key}/a", "start")
    seed.kv.put(f"{key}/b", "start")
    for round_ in range(8):
        a = seed.kv.get(f"{key}/a")[1]["ModifyIndex"]
        b = seed.kv.get(f"{key}/b")[1]["ModifyIndex"]
        barrier = threading.Barrier(2)
        outcome: dict[str, object] = {}

        def race(name, barrier=barrier, outcome=outcome, a=a, b=b, round_=round_) -> None:
            client = server.consul()
            barrier.wait(30)
            try:
                client.txn.put(
                    [
                        _kv("cas", f"{key}/a", f"{name}-{round_}", Index=a),
                        _kv("cas", f"{key}/b", f"{name}-{round_}", Index=b),
                    ]
                )
                outcome[name] = "won"
            except consul.exceptions.ClientError as exc:
                assert "409" in str(exc)
                outcome[name] = "lost"

        threads = [threading.Thread(target=race, args=(n,)) for n in ("one", "two")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(outcome.values()) == ["lost", "won"], outcome
        winner = next(n for n, o in outcome.items() if o == "won")
        va = seed.kv.get(f"{key}/a")[1]
        vb = seed.kv.get(f"{key}/b")[1]
        assert va["Value"] == vb["Value"] == f"{winner}-{round_}".encode()
        assert va["ModifyIndex"] == vb["ModifyIndex"]


def _token(acl_server, unique, rules: str) -> str:
    with acl_server.client() as admin:
        policy = admin.put("/v1/acl/policy", json={"Name": unique("pol"), "Rules": rules})
        assert policy.status_code == 200, policy.text
        token = admin.put("/v1/acl/token", json={"Policies": [{"ID": policy.json()["ID"]}]})
        return token.json()["SecretID"]


def test_acl_is_checked_per_operation(acl_server, unique):
    key = unique("acl")
    secret = _token(acl_server, unique, f'key_prefix "{key}/mine/" {{ policy = "write" }}')
    admin = acl_server.consul()
    admin.kv.put(f"{key}/theirs/x", "secret")
    with acl_server.client(token=secret) as http:
        r = http.put(
            "/v1/txn",
            json=[_kv("set", f"{key}/mine/a", "1"), _kv("set", f"{key}/theirs/x", "2")],
        )
        assert r.status_code == 409
        assert r.json()["Errors"] == [{"OpIndex": 1, "What": "Permission denied"}]
        assert admin.kv.get(f"{key}/mine/a")[1] is None
        assert admin.kv.get(f"{key}/theirs/x")[1]["Value"] == b"secret"
        ok = http.put("/v1/txn", json=[_kv("set", f"{key}/mine/a", "1")])
        assert ok.status_code == 200, ok.text
        # reads are filtered on the way out: the other prefix is left out
        tree = http.put("/v1/txn", json=[_kv("get-tree", f"{key}/")])
        assert [x["KV"]["Key"] for x in tree.json()["Results"]] == [f"{key}/mine/a"]
