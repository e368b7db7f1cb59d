"""`/v1/session` and KV locks against a real server: py-consul and raw HTTP."""

from __future__ import annotations

import threading
import time

import consul
import pytest

from tests.support.servers import make_server

pytestmark = pytest.mark.slow

SESSION_FIELDS = {
    "ID",
    "Name",
    "Node",
    "LockDelay",
    "Behavior",
    "TTL",
    "NodeChecks",
    "ServiceChecks",
    "CreateIndex",
    "ModifyIndex",
}


@pytest.fixture(scope="module")
def short_ttl_server(tmp_path_factory):
    """A server whose session TTL minimum is 1 s, so expiry is quick to see."""
    srv = make_server(
        tmp_path_factory.mktemp("short-ttl"), extra_env={"MESH_SESSION_TTL_MIN": "1s"}
    )
    yield srv
    srv.close()


def _local_node(http) -> str:
    return http.get("/v1/agent/self").json()["Config"]["NodeName"]


def _wait_until(predicate, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


# --- create, read, destroy ---------------------------------------------------------------------


def test_a_default_session_is_on_the_servers_node_with_consuls_shape(http, consul_client, unique):
    name = unique("sess")
    sid = consul_client.session.create(name=name)
    index, info = consul_client.session.info(sid)
    assert set(info) == SESSION_FIELDS
    assert info["ID"] == sid
    assert info["Name"] == name
    assert info["Node"] == _local_node(http)
    assert info["NodeChecks"] == ["serfHealth"]
    assert info["ServiceChecks"] is None
    assert info["LockDelay"] == 15_000_000_000
    assert info["Behavior"] == "release"
    assert info["TTL"] == ""
    assert int(index) >= info["CreateIndex"] == info["ModifyIndex"]
    assert sid in [s["ID"] for s in consul_client.session.list()[1]]
    assert sid in [s["ID"] for s in consul_client.session.node(info["Node"])[1]]
    assert consul_client.session.destroy(sid) is True
    assert consul_client.session.info(sid)[1] is None
    assert http.get(f"/v1/session/info/{sid}").json() == []
    assert consul_client.session.destroy(sid) is True  # destroying what is gone is fine


def test_py_consul_session_options_are_stored(consul_client, unique):
    sid = consul_client.session.create(
        name=unique("sess"), lock_delay=5, behavior="delete", ttl=30, checks=[]
    )
    _, info = consul_client.session.info(sid)
    assert info["LockDelay"] == 5_000_000_000
    assert info["Behavior"] == "delete"
    assert info["TTL"] == "30s"
    assert info["NodeChecks"] == []
    consul_client.session.destroy(sid)


def test_a_lock_delay_number_under_1000_is_seconds_and_a_string_is_a_duration(http):
    a = http.put("/v1/session/create", json={"LockDelay": 7}).json()["ID"]
    b = http.put("/v1/session/create", json={"lock_delay": "250ms"}).json()["ID"]
    assert http.get(f"/v1/session/info/{a}").json()[0]["LockDelay"] == 7_000_000_000
    assert http.get(f"/v1/session/info/{b}").json()[0]["LockDelay"] == 250_000_000
    for sid in (a, b):
        http.put(f"/v1/session/destroy/{sid}")


def test_renew_answers_the_session_and_an_unknown_one_is_404(http, consul_client):
    sid = consul_client.session.create(ttl=20)
    renewed = consul_client.session.renew(sid)
    assert renewed["ID"] == sid and renewed["TTL"] == "20s"
    consul_client.session.destroy(sid)
    r = http.put(f"/v1/session/renew/{sid}")
    assert r.status_code == 404
    assert r.text == f"Session id '{sid}' not found"


def test_a_session_list_blocks_until_a_session_is_created(server, consul_client):
    index, _ = consul_client.session.list()
    created: list[str] = []

    def create_later() -> None:
        time.sleep(0.4)
        created.append(server.consul().session.create())

    thread = threading.Thread(target=create_later)
    thread.start()
    started = time.monotonic()
    new_index, sessions = consul_client.session.list(index=index, wait="10s")
    thread.join(5)
    assert time.monotonic() - started < 2
    assert int(new_index) > int(index)
    assert created[0] in [s["ID"] for s in sessions]
    consul_client.session.destroy(created[0])


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "Request decode failed"),
        (b"[1, 2]", "Request decode failed"),
        (b'{"TTL": 30}', "Request decode failed: TTL: expected string"),
        (b'{"TTL": "5s"}', "Invalid Session TTL '5s', must be between [10s=24h0m0s]"),
        (b'{"TTL": "100000s"}', "Invalid Session TTL '100000s'"),
        (b'{"TTL": "soon"}', "Session TTL 'soon' invalid"),
        (b'{"LockDelay": "later"}', "LockDelay"),
        (b'{"Behavior": "vanish"}', "Invalid Behavior setting 'vanish'"),
        (b'{"Node": "no-such-node"}', "Missing node registration"),
        (b'{"NodeChecks": ["no-such-check"]}', "Missing check 'no-such-check' registration"),
        (b'{"ServiceChecks": [{"ID": "nope"}]}', "Missing check 'nope' registration"),
    ],
)
def test_bad_sessions_are_400s_that_create_nothing(http, body, message):
    before = http.get("/v1/session/list").json()
    r = http.put("/v1/session/create", content=body)
    assert r.status_code == 400, r.text
    assert message in r.text
    assert http.get("/v1/session/list").json() == before


def test_a_session_bound_to_a_critical_check_is_refused(http, unique):
    check = unique("chk")
    r = http.put("/v1/agent/check/register", json={"CheckID": check, "Name": check, "TTL": "60s"})
    assert r.status_code == 200, r.text
    r = http.put("/v1/session/create", json={"NodeChecks": ["serfHealth", check]})
    assert r.status_code == 400
    assert r.text == f"Check '{check}' is in critical state"
    http.put(f"/v1/agent/check/deregister/{check}")


@pytest.mark.parametrize("path", ["destroy", "renew", "info"])
def test_a_malformed_session_id_is_a_400(http, path):
    method = "GET" if path == "info" else "PUT"
    r = http.request(method, f"/v1/session/{path}/not-a-uuid")
    assert r.status_code == 400
    assert "must be a UUID" in r.text


# --- locks -----------------------------------------------------------------------------------------


def test_a_lock_held_by_one_session_is_refused_to_another_until_released(consul_client, unique):
    key = unique("lock")
    first = consul_client.session.create(lock_delay=0)
    second = consul_client.session.create(lock_delay=0)
    assert consul_client.kv.put(key, "first", acquire=first) is True
    _, entry = consul_client.kv.get(key)
    assert (entry["Session"], entry["LockIndex"], entry["Value"]) == (first, 1, b"first")
    assert consul_client.kv.put(key, "second", acquire=second) is False
    assert consul_client.kv.put(key, "second", release=second) is False
    assert consul_client.kv.get(key)[1]["Value"] == b"first"
    assert consul_client.kv.put(key, "released", release=first) is True
    _, entry = consul_client.kv.get(key)
    assert "Session" not in entry and entry["Value"] == b"released"
    assert consul_client.kv.put(key, "second", acquire=second) is True
    _, entry = consul_client.kv.get(key)
    assert (entry["Session"], entry["LockIndex"]) == (second, 2)
    for sid in (first, second):
        consul_client.session.destroy(sid)


def test_destroying_a_session_releases_its_lock_for_others_after_the_lock_delay(
    consul_client, http, unique
):
    key = unique("lock")
    holder = http.put("/v1/session/create", json={"LockDelay": "1s"}).json()["ID"]
    waiter = consul_client.session.create(lock_delay=0)
    assert consul_client.kv.put(key, "v", acquire=holder) is True
    assert consul_client.session.destroy(holder) is True
    _, entry = consul_client.kv.get(key)
    assert "Session" not in entry and entry["LockIndex"] == 1
    # Consul refuses the key to a new holder for the old session's lock-delay.
    assert consul_client.kv.put(key, "v", acquire=waiter) is False
    _wait_until(lambda: consul_client.kv.put(key, "v", acquire=waiter), timeout=5)
    assert consul_client.kv.get(key)[1]["Session"] == waiter
    consul_client.session.destroy(waiter)


def test_a_delete_session_deletes_its_keys_when_it_ends(consul_client, unique):
    key = unique("eph")
    sid = consul_client.session.create(behavior="delete", lock_delay=0)
    assert consul_client.kv.put(key, "here while I live", acquire=sid) is True
    consul_client.session.destroy(sid)
    assert consul_client.kv.get(key)[1] is None


def test_a_check_going_critical_ends_the_session_and_frees_its_lock(http, consul_client, unique):
    key, check = unique("lock"), unique("chk")
    http.put("/v1/agent/check/register", json={"CheckID": check, "Name": check, "TTL": "60s"})
    http.put(f"/v1/agent/check/pass/{check}")
    sid = http.put("/v1/session/create", json={"NodeChecks": [check], "LockDelay": 0}).json()["ID"]
    assert consul_client.kv.put(key, "leader", acquire=sid) is True
    assert http.put(f"/v1/agent/check/fail/{check}").status_code == 200
    assert consul_client.session.info(sid)[1] is None
    assert "Session" not in consul_client.kv.get(key)[1]
    http.put(f"/v1/agent/check/deregister/{check}")


def test_a_ttl_session_that_is_not_renewed_expires_and_releases_its_lock(short_ttl_server):
    c = short_ttl_server.consul()
    with short_ttl_server.client() as http:
        sid = http.put("/v1/session/create", json={"TTL": "1s", "LockDelay": 0}).json()["ID"]
        keeper = http.put("/v1/session/create", json={"TTL": "1s"}).json()["ID"]
        assert c.kv.put("leader", "me", acquire=sid) is True
        started = time.monotonic()
        # Renew only `keeper`: it must outlive `sid`, which Consul ends after 2 x TTL.
        while c.session.info(sid)[1] is not None:
            assert time.monotonic() - started < 10, "session never expired"
            assert http.put(f"/v1/session/renew/{keeper}").status_code == 200
            time.sleep(0.2)
        assert time.monotonic() - started >= 1.5
        assert c.session.info(keeper)[1] is not None
        assert "Session" not in c.kv.get("leader")[1]


# --- ACLs ---------------------------------------------------------------------------------------------


def _acl_token(acl_server, unique, rules: str) -> str:
    with acl_server.client() as admin:
        policy = admin.put("/v1/acl/policy", json={"Name": unique("pol"), "Rules": rules}).json()
        token = admin.put("/v1/acl/token", json={"Policies": [{"ID": policy["ID"]}]})
        return token.json()["SecretID"]


def test_sessions_need_session_write_on_the_node_and_reads_are_filtered(acl_server, unique):
    admin = acl_server.consul()
    with acl_server.client() as http:
        node = _local_node(http)
    with pytest.raises(consul.ACLPermissionDenied):
        acl_server.consul(token="").session.create()
    sid = admin.session.create(name=unique("sess"))
    reader = acl_server.consul(
        token=_acl_token(acl_server, unique, f'session "{node}" {{ policy = "read" }}')
    )
    assert sid in [s["ID"] for s in reader.session.list()[1]]
    assert reader.session.info(sid)[1]["ID"] == sid
    with pytest.raises(consul.ACLPermissionDenied):
        reader.session.create()
    with pytest.raises(consul.ACLPermissionDenied):
        reader.session.destroy(sid)
    with pytest.raises(consul.ACLPermissionDenied):
        reader.session.renew(sid)
    stranger = acl_server.consul(
        token=_acl_token(acl_server, unique, 'session "elsewhere" { policy = "write" }')
    )
    assert stranger.session.info(sid)[1] is None
    assert sid not in [s["ID"] for s in stranger.session.list()[1]]
    assert admin.session.destroy(sid) is True


def test_sessions_in_an_unknown_datacenter_are_404(http):
    assert http.get("/v1/session/list?dc=nowhere").status_code == 404
    assert http.put("/v1/session/create?dc=nowhere").status_code == 404
