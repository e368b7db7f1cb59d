"""`/v1/kv` against a real server, through the unmodified py-consul client and raw HTTP."""

from __future__ import annotations

import threading
import time

import consul
import pytest

pytestmark = pytest.mark.slow


def _acl_token(acl_server, unique, rules: str) -> str:
    """A token holding one policy with `rules`, made through /v1/acl as an operator would."""
    with acl_server.client() as admin:
        policy = admin.put("/v1/acl/policy", json={"Name": unique("pol"), "Rules": rules})
        assert policy.status_code == 200, policy.text
        token = admin.put("/v1/acl/token", json={"Policies": [{"ID": policy.json()["ID"]}]})
        assert token.status_code == 200, token.text
        return token.json()["SecretID"]


# --- values ----------------------------------------------------------------------------------


def test_py_consul_puts_and_gets_text_and_binary_values(consul_client, unique):
    key = unique("kv")
    binary = bytes(range(256)) + b"\x00\xff"
    assert consul_client.kv.put(f"{key}/text", "héllo") is True
    assert consul_client.kv.put(f"{key}/bin", binary) is True
    index, entry = consul_client.kv.get(f"{key}/text")
    assert entry["Value"] == "héllo".encode()
    assert entry["Key"] == f"{key}/text"
    assert entry["Flags"] == 0 and entry["LockIndex"] == 0
    assert "Session" not in entry
    assert int(index) == entry["ModifyIndex"] == entry["CreateIndex"]
    assert consul_client.kv.get(f"{key}/bin")[1]["Value"] == binary


def test_a_missing_key_is_a_404_with_an_index_and_none_in_py_consul(http, consul_client, unique):
    key = unique("kv")
    r = http.get(f"/v1/kv/{key}")
    assert r.status_code == 404
    assert r.content == b""
    assert int(r.headers["X-Consul-Index"]) >= 1
    assert consul_client.kv.get(key)[1] is None


def test_raw_answers_the_bare_bytes_as_text_plain(http, unique):
    key = unique("kv")
    http.put(f"/v1/kv/{key}", content=b"\x00raw\xff")
    r = http.get(f"/v1/kv/{key}", params={"raw": ""})
    assert r.status_code == 200
    assert r.content == b"\x00raw\xff"
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "X-Consul-Index" in r.headers


def test_an_empty_value_is_null_and_raw_is_empty(http, unique):
    key = unique("kv")
    assert http.put(f"/v1/kv/{key}").json() is True
    assert http.get(f"/v1/kv/{key}").json()[0]["Value"] is None
    assert http.get(f"/v1/kv/{key}?raw").content == b""


def test_flags_round_trip_up_to_the_largest_uint64(consul_client, unique):
    key = unique("kv")
    assert consul_client.kv.put(key, "v", flags=2**64 - 1) is True
    assert consul_client.kv.get(key)[1]["Flags"] == 2**64 - 1
    assert consul_client.kv.put(key, "v") is True  # a write without ?flags resets them
    assert consul_client.kv.get(key)[1]["Flags"] == 0


def test_cas_creates_only_when_absent_and_updates_only_at_the_read_index(consul_client, unique):
    key = unique("kv")
    assert consul_client.kv.put(key, "one", cas=0) is True
    assert consul_client.kv.put(key, "two", cas=0) is False
    _, entry = consul_client.kv.get(key)
    assert consul_client.kv.put(key, "two", cas=entry["ModifyIndex"] + 1000) is False
    assert consul_client.kv.get(key)[1]["Value"] == b"one"
    assert consul_client.kv.put(key, "two", cas=entry["ModifyIndex"]) is True
    _, after = consul_client.kv.get(key)
    assert after["Value"] == b"two"
    assert after["ModifyIndex"] > entry["ModifyIndex"]
    assert after["CreateIndex"] == entry["CreateIndex"]


def test_cas_delete_only_at_the_read_index(consul_client, unique):
    key = unique("kv")
    consul_client.kv.put(key, "v")
    _, entry = consul_client.kv.get(key)
    assert consul_client.kv.delete(key, cas=entry["ModifyIndex"] + 1) is False
    assert consul_client.kv.get(key)[1] is not None
    assert consul_client.kv.delete(key, cas=entry["ModifyIndex"]) is True
    assert consul_client.kv.get(key)[1] is None


# --- prefixes -------------------------------------------------------------------------------------


def test_recurse_returns_every_entry_under_the_prefix_in_key_order(consul_client, unique):
    base = unique("tree")
    for key in ("b", "a/1", "a/2", "B"):
        consul_client.kv.put(f"{base}/{key}", key)
    consul_client.kv.put(f"{base}x", "outside the prefix")
    consul_client.kv.put(base.upper() + "/a", "other case")
    _, entries = consul_client.kv.get(f"{base}/", recurse=True)
    assert [(e["Key"], e["Value"]) for e in entries] == [
        (f"{base}/B", b"B"),
        (f"{base}/a/1", b"a/1"),
        (f"{base}/a/2", b"a/2"),
        (f"{base}/b", b"b"),
    ]
    assert consul_client.kv.get(f"{unique('none')}/", recurse=True)[1] is None


def test_keys_list_names_and_fold_them_at_the_separator(consul_client, http, unique):
    base = unique("keys")
    for key in ("a", "b/c", "b/d", "e/f/g"):
        consul_client.kv.put(f"{base}/{key}", "v")
    _, keys = consul_client.kv.get(f"{base}/", keys=True)
    assert keys == [f"{base}/a", f"{base}/b/c", f"{base}/b/d", f"{base}/e/f/g"]
    _, folded = consul_client.kv.get(f"{base}/", keys=True, separator="/")
    assert folded == [f"{base}/a", f"{base}/b/", f"{base}/e/"]
    # Consul's historic misspelling is honoured too.
    assert http.get(f"/v1/kv/{base}/?keys&seperator=/").json() == folded
    assert http.get(f"/v1/kv/{unique('none')}/?keys").status_code == 404


def test_delete_recurse_removes_the_prefix_and_nothing_else(consul_client, unique):
    base = unique("del")
    for key in (f"{base}/a", f"{base}/b/c", f"{base}-sibling"):
        consul_client.kv.put(key, "v")
    assert consul_client.kv.delete(f"{base}/", recurse=True) is True
    assert consul_client.kv.get(f"{base}/", recurse=True)[1] is None
    assert consul_client.kv.get(f"{base}-sibling")[1] is not None


# --- blocking ----------------------------------------------------------------------------------------


def _put_later(server, key: str, value: str, delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        server.consul().kv.put(key, value)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_blocking_get_returns_within_a_second_of_another_clients_put(
    server, consul_client, unique
):
    key = unique("block")
    consul_client.kv.put(key, "before")
    index, _ = consul_client.kv.get(key)
    writer = _put_later(server, key, "after", delay=0.6)
    started = time.monotonic()
    new_index, entry = consul_client.kv.get(key, index=index, wait="10s")
    elapsed = time.monotonic() - started
    writer.join(5)
    assert entry["Value"] == b"after"
    assert int(new_index) > int(index)
    assert 0.5 <= elapsed < 1.6, elapsed


def test_a_blocking_get_ignores_writes_to_other_keys(server, consul_client, unique):
    key = unique("block")
    consul_client.kv.put(key, "mine")
    index, _ = consul_client.kv.get(key)
    writer = _put_later(server, unique("other"), "noise", delay=0.2)
    started = time.monotonic()
    same_index, entry = consul_client.kv.get(key, index=index, wait="1s")
    writer.join(5)
    assert same_index == index
    assert entry["Value"] == b"mine"
    assert time.monotonic() - started >= 0.9


def test_a_blocking_recurse_wakes_on_a_delete_under_the_prefix(server, consul_client, unique):
    base = unique("watch")
    consul_client.kv.put(f"{base}/a", "1")
    consul_client.kv.put(f"{base}/b", "2")
    index, _ = consul_client.kv.get(f"{base}/", recurse=True)

    def delete_later() -> None:
        time.sleep(0.3)
        server.consul().kv.delete(f"{base}/b")

    thread = threading.Thread(target=delete_later)
    thread.start()
    new_index, entries = consul_client.kv.get(f"{base}/", recurse=True, index=index, wait="10s")
    thread.join(5)
    assert [e["Key"] for e in entries] == [f"{base}/a"]
    assert int(new_index) > int(index)  # the delete moved it; it never goes back


# --- bad input ---------------------------------------------------------------------------------------


def test_an_oversized_value_is_413_with_consuls_text_and_stores_nothing(http, unique):
    key = unique("big")
    r = http.put(f"/v1/kv/{key}", content=b"x" * (512 * 1024 + 1))
    assert r.status_code == 413
    assert r.text.startswith("Request body(524289 bytes) too large, max size: 524288 bytes.")
    assert http.get(f"/v1/kv/{key}").status_code == 404
    assert http.put(f"/v1/kv/{key}", content=b"x" * (512 * 1024)).json() is True


@pytest.mark.parametrize(
    "method, path, message",
    [
        ("PUT", "/v1/kv/bad%FFkey", "Invalid key: must be valid UTF-8"),
        ("GET", "/v1/kv/bad%C3key", "Invalid key: must be valid UTF-8"),
        ("PUT", "/v1/kv/nul%00key", "the URL contains a NUL character"),
        ("PUT", "/v1/kv/", "Missing key name"),
        ("GET", "/v1/kv/", "Missing key name"),
        ("DELETE", "/v1/kv/", "Missing key name"),
        ("PUT", "/v1/kv/{key}?cas=x", "Invalid value for ?cas: 'x' is not an unsigned integer"),
        ("PUT", "/v1/kv/{key}?cas=", "Invalid value for ?cas"),
        ("PUT", "/v1/kv/{key}?flags=-1", "Invalid value for ?flags"),
        ("PUT", "/v1/kv/{key}?flags=18446744073709551616", "out of range"),
        ("PUT", "/v1/kv/{key}?cas=0&acquire=x", "Conflicting flags"),
        ("DELETE", "/v1/kv/{key}?recurse&cas=1", "Conflicting flags"),
        ("PUT", "/v1/kv/{key}?acquire=", "Missing session"),
        ("GET", "/v1/kv/{key}?recurse=maybe", "Invalid value for ?recurse"),
    ],
)
def test_bad_requests_are_400s_that_write_nothing(http, unique, method, path, message):
    key = unique("bad")
    r = http.request(method, path.format(key=key), content=b"value")
    assert r.status_code == 400, r.text
    assert message in r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    assert http.get(f"/v1/kv/{key}").status_code == 404


def test_acquiring_with_an_unknown_session_is_a_400_that_writes_nothing(http, unique):
    key = unique("lock")
    r = http.put(f"/v1/kv/{key}?acquire=8b0d2f6a-59f4-4d41-9a5d-000000000000", content=b"v")
    assert r.status_code == 400
    assert "Invalid session" in r.text
    assert http.get(f"/v1/kv/{key}").status_code == 404


def test_kv_answers_only_get_put_and_delete(http, unique):
    r = http.post(f"/v1/kv/{unique('m')}", content=b"v")
    assert r.status_code == 405


# --- ACLs ------------------------------------------------------------------------------------------


def test_without_a_token_kv_is_denied_and_with_management_it_works(acl_server, unique):
    key = unique("acl")
    anonymous = acl_server.consul(token="")
    with pytest.raises(consul.ACLPermissionDenied):
        anonymous.kv.put(key, "v")
    admin = acl_server.consul()
    assert admin.kv.put(key, "v") is True
    with pytest.raises(consul.ACLPermissionDenied):
        anonymous.kv.get(key)
    assert admin.kv.get(key)[1]["Value"] == b"v"


def test_a_read_token_reads_and_lists_only_its_prefix_and_cannot_write(acl_server, unique):
    team = unique("team")
    admin = acl_server.consul()
    for key in (f"{team}/a", f"{team}/secret/b", f"{team}-other/c"):
        admin.kv.put(key, "v")
    secret = _acl_token(
        acl_server,
        unique,
        f'key_prefix "{team}/" {{ policy = "read" }}\n'
        f'key_prefix "{team}/secret/" {{ policy = "deny" }}',
    )
    reader = acl_server.consul(token=secret)
    assert reader.kv.get(f"{team}/a")[1]["Value"] == b"v"
    with pytest.raises(consul.ACLPermissionDenied):
        reader.kv.get(f"{team}/secret/b")
    with pytest.raises(consul.ACLPermissionDenied):
        reader.kv.put(f"{team}/a", "w")
    with acl_server.client(token=secret) as http:
        r = http.get(f"/v1/kv/{team}", params={"recurse": ""})
        assert [e["Key"] for e in r.json()] == [f"{team}/a"]
        assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
        # Listing key names needs `list` on the prefix; `read` is not enough.
        r = http.get(f"/v1/kv/{team}/", params={"keys": ""})
        assert r.status_code == 403
        assert "key:list" in r.text


def test_a_list_token_lists_keys_it_may_read(acl_server, unique):
    team = unique("team")
    admin = acl_server.consul()
    admin.kv.put(f"{team}/a", "v")
    admin.kv.put(f"{team}/b/c", "v")
    secret = _acl_token(acl_server, unique, f'key_prefix "{team}/" {{ policy = "list" }}')
    _, keys = acl_server.consul(token=secret).kv.get(f"{team}/", keys=True, separator="/")
    assert keys == [f"{team}/a", f"{team}/b/"]


def test_recursive_delete_needs_write_on_everything_under_the_prefix(acl_server, unique):
    team = unique("team")
    admin = acl_server.consul()
    admin.kv.put(f"{team}/a", "v")
    admin.kv.put(f"{team}/locked/b", "v")
    secret = _acl_token(
        acl_server,
        unique,
        f'key_prefix "{team}/" {{ policy = "write" }}\n'
        f'key_prefix "{team}/locked/" {{ policy = "read" }}',
    )
    writer = acl_server.consul(token=secret)
    with pytest.raises(consul.ACLPermissionDenied):
        writer.kv.delete(f"{team}/", recurse=True)
    assert len(admin.kv.get(f"{team}/", recurse=True)[1]) == 2
    assert writer.kv.delete(f"{team}/a") is True
    assert writer.kv.put(f"{team}/new", "v") is True


def test_an_unknown_datacenter_is_404(http, unique):
    r = http.put(f"/v1/kv/{unique('dc')}?dc=nowhere", content=b"v")
    assert r.status_code == 404
    assert r.text == 'No path to datacenter "nowhere"'
