"""User events: `/v1/event` through py-consul and raw HTTP, the bounded buffer,
and delivery to real agents whose `watches` handlers run."""

from __future__ import annotations

import base64
import json
import sys
import threading
import time

import consul.exceptions
import pytest

from tests.agents.conftest import eventually
from tests.support.files import json_lines

pytestmark = pytest.mark.slow


def test_fire_and_list_through_py_consul(consul_client, unique):
    name = unique("deploy")
    fired = consul_client.event.fire(name, "v1.2.3", service="web", tag="canary")
    assert fired["Name"] == name
    index, events = consul_client.event.list(name=name)
    assert [e["ID"] for e in events] == [fired["ID"]]
    event = events[0]
    assert event["Name"] == name and event["Payload"] == b"v1.2.3"
    assert (event["ServiceFilter"], event["TagFilter"], event["NodeFilter"]) == (
        "web",
        "canary",
        "",
    )
    assert event["Version"] == 1 and event["LTime"] >= 1 and len(event["ID"]) == 36
    assert int(index) >= event["LTime"]


def test_fire_answers_the_event_and_an_empty_payload_is_null(http, unique):
    name = unique("ping")
    r = http.put(f"/v1/event/fire/{name}", params={"node": "^web-"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["Name"] == name and body["Payload"] is None and body["NodeFilter"] == "^web-"
    listed = http.get("/v1/event/list", params={"name": name}).json()
    assert [e["ID"] for e in listed] == [body["ID"]]


def test_list_blocks_until_an_event_is_fired(consul_client, unique):
    name = unique("blk")
    index, _ = consul_client.event.list(name=name)
    got: dict = {}

    def wait() -> None:
        got["answer"] = consul_client.event.list(name=name, index=index, wait="30s")

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.5)
    assert t.is_alive()  # still waiting: nothing was fired
    consul_client.event.fire(name, "now")
    t.join(30)
    assert not t.is_alive()
    new_index, events = got["answer"]
    assert int(new_index) > int(index)
    assert [e["Payload"] for e in events] == [b"now"]  # py-consul decodes it


def test_bad_events_are_refused_and_nothing_is_stored(http, unique):
    name = unique("bad")
    cases = [
        (f"/v1/event/fire/{name}", {}, b"x" * 513, 413),  # over the 512-byte payload limit
        ("/v1/event/fire/_reserved", {}, b"", 400),
        (f"/v1/event/fire/{name}", {"node": "(unclosed"}, b"", 400),
        (f"/v1/event/fire/{name}", {"tag": "v1"}, b"", 400),  # a tag filter needs a service one
        ("/v1/event/fire/", {}, b"", 400),
    ]
    for path, params, body, status in cases:
        r = http.put(path, params=params, content=body)
        assert r.status_code == status, (path, params, r.text)
        assert r.text
    assert http.get("/v1/event/list", params={"name": name}).json() == []
    assert http.get("/v1/event/fire/x").status_code == 405


def _token(acl_server, unique, rules: str) -> str:
    with acl_server.client() as admin:
        policy = admin.put("/v1/acl/policy", json={"Name": unique("pol"), "Rules": rules})
        token = admin.put("/v1/acl/token", json={"Policies": [{"ID": policy.json()["ID"]}]})
        return token.json()["SecretID"]


def test_acl_event_write_to_fire_and_event_read_to_list(acl_server, unique):
    mine, theirs = unique("mine"), unique("theirs")
    secret = _token(acl_server, unique, f'event_prefix "{mine}" {{ policy = "write" }}')
    acl_server.consul().event.fire(theirs, "hidden")
    client = acl_server.consul(token=secret)
    assert client.event.fire(mine, "ok")["Name"] == mine
    with pytest.raises(consul.exceptions.ACLPermissionDenied):
        client.event.fire(theirs, "no")
    with acl_server.client(token=secret) as http:
        r = http.get("/v1/event/list")
        assert r.headers.get("X-Consul-Results-Filtered-By-ACLs") == "true"
        assert {e["Name"] for e in r.json()} == {mine}


@pytest.mark.django_db
def test_the_buffer_keeps_the_newest_events_per_datacenter(settings):
    from registry.domain import events
    from registry.domain.acl import Authorizer

    settings.MESH_EVENT_BUFFER = 3
    fired = [events.fire("e", str(i).encode()).id for i in range(5)]
    events.fire("e", b"other dc", dc="dc2")
    _, kept, _ = events.list_events(Authorizer.allow_all())
    assert [e["ID"] for e in kept] == fired[2:]  # oldest first, the two oldest dropped
    _, other, _ = events.list_events(Authorizer.allow_all(), dc="dc2")
    assert len(other) == 1


# --- delivery to agents ---------------------------------------------------------------------


def _watch_files(out_path, name: str) -> dict[str, str]:
    handler = f"import sys; open({str(out_path)!r}, 'a').write(sys.stdin.read() + '\\n')"
    return {
        "web.json": json.dumps({"service": {"name": "web-ev", "port": 8080, "tags": ["canary"]}}),
        "watches.json": json.dumps(
            {"watches": [{"type": "event", "name": name, "args": [sys.executable, "-c", handler]}]}
        ),
    }


def test_events_reach_the_agents_they_are_for_and_run_their_handlers(
    control_plane, make_agent, tmp_path, unique
):
    name = unique("deploy")
    out_a, out_b = tmp_path / "a.out", tmp_path / "b.out"
    a = make_agent(files=_watch_files(out_a, name))
    make_agent(files=_watch_files(out_b, name))
    c = control_plane.consul()
    eventually(lambda: len(c.health.service("web-ev")[1]) == 2, timeout=60)

    c.event.fire(name, "to-all")
    c.event.fire(name, "to-a-only", node=f"^{a.node}$")
    c.event.fire(name, "to-canaries", service="^web-ev$", tag="^canary$")
    c.event.fire(name, "to-nobody", service="^web-ev$", tag="^stable$")
    c.event.fire(unique("other"), "unwatched")

    def payloads(path) -> list[bytes]:
        runs = json_lines(path)
        return [base64.b64decode(run[-1]["Payload"]) for run in runs]

    eventually(lambda: payloads(out_a) == [b"to-all", b"to-a-only", b"to-canaries"], timeout=60)
    eventually(lambda: payloads(out_b) == [b"to-all", b"to-canaries"], timeout=60)
    # the handler's stdin is the agent's list of that event name, the new one last
    assert [e["Name"] for e in json_lines(out_a)[-1]] == [name] * 3
    local = a.client().get("/v1/event/list", params={"name": name}).json()
    assert [base64.b64decode(e["Payload"]) for e in local] == [
        b"to-all",
        b"to-a-only",
        b"to-canaries",
    ]

    # a restarted agent resumes after the last event it handled: nothing runs twice
    a.stop()
    c.event.fire(name, "while-down", node=f"^{a.node}$")
    a.start()
    eventually(lambda: payloads(out_a)[-1:] == [b"while-down"], timeout=60)
    time.sleep(1)
    assert payloads(out_a) == [b"to-all", b"to-a-only", b"to-canaries", b"while-down"]
