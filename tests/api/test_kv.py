"""/api/kv/: list with a prefix, read, write (text, bytes, cas), delete; ACLs."""

from __future__ import annotations

import base64

from registry.domain import kv
from registry.models import KVEntry
from tests.api.conftest import results, token_with


def test_it_writes_and_reads_a_text_value_with_flags(api):
    r = api.put("/api/kv/app/config", {"value": "hello", "flags": 42}, format="json")
    assert r.status_code == 200, r.content
    body = api.get("/api/kv/app/config").json()
    assert body["key"] == "app/config"
    assert (body["value"], body["value_base64"], body["flags"]) == ("hello", "aGVsbG8=", 42)
    assert body["modify_index"] == body["create_index"] > 0
    # The same entry through the KV service layer /v1 uses.
    _index, entry = kv.get("app/config")
    assert kv.entry_json(entry)["Value"] == "aGVsbG8=" and kv.entry_json(entry)["Flags"] == 42


def test_binary_values_go_in_and_out_as_base64(api):
    raw = bytes(range(256))
    r = api.put("/api/kv/bin/blob", {"value_base64": base64.b64encode(raw).decode()}, format="json")
    assert r.status_code == 200
    body = api.get("/api/kv/bin/blob").json()
    assert body["value"] is None
    assert base64.b64decode(body["value_base64"]) == raw


def test_flags_take_the_full_unsigned_64_bit_range(api):
    api.put("/api/kv/f", {"value": "x", "flags": 2**64 - 1}, format="json")
    assert api.get("/api/kv/f").json()["flags"] == 2**64 - 1


def test_it_lists_keys_under_a_prefix_case_sensitively(api):
    for key in ["app/a", "app/b/c", "App/x", "other"]:
        api.put(f"/api/kv/{key}", {"value": key}, format="json")
    assert [e["key"] for e in results(api.get("/api/kv/?prefix=app/"))] == ["app/a", "app/b/c"]
    assert len(results(api.get("/api/kv/"))) == 4
    body = api.get("/api/kv/?limit=1&offset=1&ordering=-key").json()
    assert body["count"] == 4 and body["results"][0]["key"] == "app/b/c"


def test_cas_writes_only_over_the_index_it_names(api):
    first = api.put("/api/kv/lock", {"value": "1", "cas": 0}, format="json").json()
    r = api.put("/api/kv/lock", {"value": "2", "cas": 0}, format="json")
    assert r.status_code == 409
    assert r.json() == {"error": 'Key "lock" was not written: cas 0 did not match'}
    r = api.put("/api/kv/lock", {"value": "2", "cas": first["modify_index"]}, format="json")
    assert r.status_code == 200 and r.json()["value"] == "2"


def test_it_deletes_one_key_or_a_whole_prefix(api):
    for key in ["d/1", "d/2", "d2"]:
        api.put(f"/api/kv/{key}", {"value": "v"}, format="json")
    assert api.delete("/api/kv/d/1").status_code == 204
    assert api.get("/api/kv/d/1").status_code == 404
    assert api.delete("/api/kv/d/1").status_code == 404
    assert api.delete("/api/kv/d/?recurse=true").status_code == 204
    assert sorted(KVEntry.objects.values_list("key", flat=True)) == ["d2"]


def test_bad_kv_input_is_a_400_naming_the_field_and_stores_nothing(api):
    cases = [
        ({"value": 5}, "value"),
        ({"value_base64": "%%%"}, "value_base64"),
        ({"value": "a", "value_base64": "YQ=="}, "body"),
        ({"value": "a", "flags": -1}, "flags"),
        ({"value": "a", "flags": 2**64}, "flags"),
    ]
    for body, field in cases:
        r = api.put("/api/kv/bad", body, format="json")
        assert r.status_code == 400, body
        assert field in r.json()["fields"], (body, r.json())
    r = api.put("/api/kv//leading", {"value": "a"}, format="json")
    assert (r.status_code, r.json()) == (400, {"error": "Invalid key: must not begin with a '/'"})
    assert not KVEntry.objects.exists()


def test_a_value_over_the_kv_limit_is_a_413(api, settings):
    settings.MESH_KV_MAX_VALUE_SIZE = 1024
    r = api.put("/api/kv/big", {"value": "x" * 1025}, format="json")
    assert r.status_code == 413
    assert r.json()["error"].startswith("Request body(1025 bytes) too large")
    assert not KVEntry.objects.exists()


def test_acls_filter_the_list_and_guard_reads_and_writes(acl_api):
    kv.put("public/a", b"1")
    kv.put("private/b", b"2")
    secret = token_with('key_prefix "public/" { policy = "write" }')
    acl_api.credentials(HTTP_X_CONSUL_TOKEN=secret)
    assert [e["key"] for e in results(acl_api.get("/api/kv/"))] == ["public/a"]
    assert acl_api.get("/api/kv/public/a").json()["value"] == "1"
    r = acl_api.get("/api/kv/private/b")
    assert r.status_code == 403
    assert "lacks permission 'key:read' on \"private/b\"" in r.json()["error"]
    r = acl_api.put("/api/kv/private/b", {"value": "hacked"}, format="json")
    assert r.status_code == 403
    assert acl_api.delete("/api/kv/private/b").status_code == 403
    assert acl_api.delete("/api/kv/?recurse=true").status_code == 405
    assert acl_api.put("/api/kv/public/c", {"value": "ok"}, format="json").status_code == 200
    assert kv.get("private/b")[1].value == b"2"
