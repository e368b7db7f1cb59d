"""The agent's event watches: what the config dir declares, and handlers run once per event."""

from __future__ import annotations

import asyncio
import json
import sys

from agents.events import EventRunner, read_watches
from meshproto.proto import mesh_pb2


def test_watches_are_read_and_bad_ones_named(tmp_path):
    (tmp_path / "a.json").write_text(
        json.dumps(
            {
                "watches": [
                    {"type": "event", "name": "deploy", "args": ["/bin/true"]},
                    {"type": "event", "handler": "echo hi"},
                    {"type": "key", "key": "x", "args": ["/bin/true"]},
                    {"type": "event", "name": "x"},
                    {"type": "event", "handler_type": "http", "args": ["/bin/true"]},
                ]
            }
        )
    )
    (tmp_path / "b.yaml").write_text("watches:\n  - type: event\n    args: [/bin/false]\n")
    watches, errors = read_watches([tmp_path])
    assert [(w.name, w.args) for w in watches] == [
        ("deploy", ("/bin/true",)),
        ("", ("/bin/sh", "-c", "echo hi")),
        ("", ("/bin/false",)),
    ]
    assert len(errors) == 3
    assert "type 'key' is not supported" in errors[0]
    assert "needs args" in errors[1] and "handler_type 'http'" in errors[2]


def _event(ltime: int, name: str = "deploy", payload: bytes = b"v1") -> mesh_pb2.UserEvent:
    return mesh_pb2.UserEvent(id=f"id-{ltime}", name=name, payload=payload, ltime=ltime)


def test_handlers_run_once_per_event_and_resume_after_the_last(tmp_path):
    out = tmp_path / "out"
    handler = f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')"
    config = tmp_path / "config"
    config.mkdir()
    (config / "w.json").write_text(
        json.dumps(
            {
                "watches": [
                    {"type": "event", "name": "deploy", "args": [sys.executable, "-c", handler]}
                ]
            }
        )
    )
    data = tmp_path / "data"
    data.mkdir()
    runner = EventRunner([config], data)

    async def deliver(r: EventRunner, *events) -> None:
        for e in events:
            await r.deliver(e)

    asyncio.run(deliver(runner, _event(5), _event(6, "other"), _event(7, payload=b"v2"), _event(7)))
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(runs) == 2  # "other" is not watched; ltime 7 came twice, ran once
    assert [e["LTime"] for e in runs[1]] == [5, 7]  # the recent events of that name, new last
    assert runs[1][-1]["Payload"] == "djI="  # base64 of v2, as Consul shows it
    # a new runner on the same data dir resumes after LTime 7
    again = EventRunner([config], data)
    assert again.last_ltime == 7
    asyncio.run(deliver(again, _event(7), _event(9)))
    assert len(out.read_text().splitlines()) == 3
