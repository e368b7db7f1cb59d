"""User events on the agent: received over the event stream, handed to watch handlers.

As Consul's `watches` of `"type": "event"`, declared in the config dir next
to services (JSON, YAML or HCL)::

    {"watches": [{"type": "event", "name": "deploy",
                  "handler_type": "script", "args": ["/usr/local/bin/on-deploy"]}]}

(`"handler": "cmd ..."`, Consul's older spelling, runs through `/bin/sh -c`.)
A handler runs once per event whose name matches (no `name`: every event),
with the JSON list of the recent events of that name on its standard input,
the new one last, exactly as `GET /v1/event/list?name=` shows them (Consul's
shape, `Payload` base64), and `CONSUL_INDEX` set to the event's `LTime`. A
handler gets `HANDLER_TIMEOUT` seconds; its exit status is logged.

The agent keeps the last `BUFFER` events it received (its `/v1/event/list`)
and the `LTime` of the last one in `<data-dir>/events.json`, so a restart or
a reconnect resumes after it: no event is run twice, none is skipped while
the control plane still holds it. A first start gets the events fired since
its node entered the catalog.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from meshproto.proto import mesh_pb2
from meshproto.servicedefs import DefinitionError, config_dir_files, field, load_file

log = logging.getLogger("meshweb.agent.events")

BUFFER = 256
HANDLER_TIMEOUT = 30.0
STATE_FILE = "events.json"


@dataclass(frozen=True)
class EventWatch:
    """One `watches` entry of type `event`."""

    name: str  # "" watches every event
    args: tuple[str, ...]  # the command (`args`, or `/bin/sh -c <handler>`)

    def wants(self, event_name: str) -> bool:
        return not self.name or self.name == event_name


def read_watches(dirs) -> tuple[list[EventWatch], list[str]]:
    """The event watches of the config dir(s), and an error per malformed entry."""
    watches: list[EventWatch] = []
    errors: list[str] = []
    for d in dirs:
        try:
            files = config_dir_files(d)
        except OSError:
            continue
        for path in files:
            try:
                data = load_file(path)
            except DefinitionError as exc:
                errors.append(str(exc))
                continue
            if not isinstance(data, dict):
                continue
            raw = field(data, "watches")
            for i, entry in enumerate(raw if isinstance(raw, list) else [raw] if raw else []):
                where = f"{path}: watches[{i}]"
                if not isinstance(entry, dict):
                    errors.append(f"{where}: expected an object")
                    continue
                kind = field(entry, "type")
                if kind != "event":
                    errors.append(f"{where}: type {kind!r} is not supported (only 'event')")
                    continue
                handler_type = field(entry, "handler_type") or "script"
                if handler_type != "script":
                    errors.append(f"{where}: handler_type {handler_type!r} is not supported")
                    continue
                args = field(entry, "args")
                handler = field(entry, "handler")
                if isinstance(args, list) and args and all(isinstance(a, str) for a in args):
                    command = tuple(args)
                elif isinstance(handler, str) and handler.strip():
                    command = ("/bin/sh", "-c", handler)
                else:
                    errors.append(f"{where}: needs args (a list of strings) or handler")
                    continue
                name = field(entry, "name") or ""
                if not isinstance(name, str):
                    errors.append(f"{where}: name must be a string")
                    continue
                watches.append(EventWatch(name, command))
    return watches, errors


def event_json(event: mesh_pb2.UserEvent) -> dict[str, Any]:
    """An event in Consul's shape (as the control plane's `/v1/event/list`)."""
    return {
        "ID": event.id,
        "Name": event.name,
        "Payload": base64.b64encode(event.payload).decode("ascii") if event.payload else None,
        "NodeFilter": event.node_filter,
        "ServiceFilter": event.service_filter,
        "TagFilter": event.tag_filter,
        "Version": 1,
        "LTime": event.ltime,
    }


class EventRunner:
    """Receives this node's events and runs the watches' handlers, in order."""

    def __init__(self, config_dirs, data_dir: Path) -> None:
        self.config_dirs = tuple(config_dirs)
        self.state_path = Path(data_dir) / STATE_FILE
        self.buffer: deque[dict[str, Any]] = deque(maxlen=BUFFER)
        self.last_ltime = self._load()
        self.handled = 0  # handler runs (for metrics and tests)
        self.watches: list[EventWatch] = []
        self.reload()

    def reload(self) -> list[str]:
        """Re-read the watches (start, SIGHUP); a bad entry is logged and left out."""
        self.watches, errors = read_watches(self.config_dirs)
        for e in errors:
            log.error("bad watch definition", extra={"error": e})
        return errors

    def _load(self) -> int:
        try:
            return int(json.loads(self.state_path.read_text())["LastLTime"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"LastLTime": self.last_ltime}))
        os.replace(tmp, self.state_path)

    def list(self, name: str = "") -> list[dict[str, Any]]:
        return [e for e in self.buffer if not name or e["Name"] == name]

    async def stream(self, stub) -> None:
        """Follow the control plane's event stream until it fails (the caller reconnects)."""
        call = stub.StreamEvents(mesh_pb2.EventSubscribe(after_ltime=self.last_ltime))
        try:
            async for event in call:
                await self.deliver(event)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.warning("the control plane does not stream events")
                await asyncio.Event().wait()  # the other streams decide the connection
            raise
        raise ConnectionError("the control plane closed the event stream")

    async def deliver(self, event: mesh_pb2.UserEvent) -> None:
        if event.ltime and event.ltime <= self.last_ltime:
            return  # already handled (a resumed stream)
        shaped = event_json(event)
        self.buffer.append(shaped)
        log.info("user event", extra={"event": event.name, "id": event.id, "ltime": event.ltime})
        for watch in self.watches:
            if watch.wants(event.name):
                await self._run(watch, event)
        self.last_ltime = max(self.last_ltime, event.ltime)
        try:
            self._save()
        except OSError as exc:
            log.warning("could not record the last event", extra={"error": str(exc)})

    async def _run(self, watch: EventWatch, event: mesh_pb2.UserEvent) -> None:
        stdin = json.dumps(self.list(event.name)).encode()
        env = {**os.environ, "CONSUL_INDEX": str(event.ltime)}
        try:
            proc = await asyncio.create_subprocess_exec(
                *watch.args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            log.error("event handler did not start", extra={"args": watch.args, "error": str(exc)})
            return
        try:
            _, err = await asyncio.wait_for(proc.communicate(stdin), HANDLER_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            log.error("event handler timed out", extra={"args": watch.args})
            return
        self.handled += 1
        level = logging.INFO if proc.returncode == 0 else logging.ERROR
        log.log(
            level,
            "event handler ran",
            extra={
                "event": event.name,
                "exit": proc.returncode,
                "stderr": err.decode(errors="replace")[-500:],
            },
        )
