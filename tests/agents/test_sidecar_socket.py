"""The sidecar socket: JSON lines out (config + key material), acks and nacks in."""

from __future__ import annotations

import asyncio
import json
import os
import stat

from agents.sidecars import SidecarFeed


class TinySidecar:
    """Speaks the sidecar's side of the protocol, as `mesh-sidecar` does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path) -> TinySidecar:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    async def receive(self) -> dict:
        return json.loads(await asyncio.wait_for(self.reader.readline(), 5))

    async def answer(self, message: dict) -> None:
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()


def config(version: int) -> dict:
    return {"version": version, "proxy_id": "web-sidecar-proxy", "roots": ["ROOT-PEM"]}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_connecting_sidecar_gets_the_bundle_and_its_ack_is_forwarded(tmp_path):
    answers = []

    async def scenario():
        feed = SidecarFeed("web-sidecar-proxy", tmp_path / "web.sock", lambda *a: answers.append(a))
        await feed.start()
        assert stat.S_IMODE(os.stat(feed.path).st_mode) == 0o600
        feed.set_config(config(7), 7)
        feed.set_leaf("CERT-PEM", "KEY-PEM", 1234.5)
        side = await TinySidecar.connect(feed.path)
        line = await side.receive()
        assert line == {
            "config": config(7),
            "cert": "CERT-PEM",
            "key": "KEY-PEM",
            "roots": ["ROOT-PEM"],
            "cert_not_after": 1234.5,
        }
        await side.answer({"ack": 7})
        for _ in range(50):
            if answers:
                break
            await asyncio.sleep(0.02)
        # A renewed leaf alone is pushed too.
        feed.set_leaf("CERT-2", "KEY-2", 2000.0)
        line = await side.receive()
        assert (line["cert"], line["config"]["version"]) == ("CERT-2", 7)
        side.writer.close()
        await feed.close()
        assert not feed.path.exists()

    run(scenario())
    assert answers == [("web-sidecar-proxy", 7, True, "")]


def test_a_nack_is_forwarded_and_the_last_good_config_is_what_a_reconnecting_sidecar_gets(
    tmp_path,
):
    answers = []

    async def scenario():
        feed = SidecarFeed("p", tmp_path / "p.sock", lambda *a: answers.append(a))
        await feed.start()
        feed.set_leaf("CERT", "KEY", 1.0)
        side = await TinySidecar.connect(feed.path)
        feed.set_config(config(1), 1)
        assert (await side.receive())["config"]["version"] == 1
        await side.answer({"ack": 1})
        feed.set_config(config(2), 2)
        assert (await side.receive())["config"]["version"] == 2
        await side.answer({"nack": 2, "error": "upstream port taken"})
        # garbage from the sidecar is ignored, not fatal
        side.writer.write(b"not json\n")
        await asyncio.sleep(0.2)
        side.writer.close()
        again = await TinySidecar.connect(feed.path)
        assert (await again.receive())["config"]["version"] == 1
        again.writer.close()
        await feed.close()

    run(scenario())
    assert answers == [("p", 1, True, ""), ("p", 2, False, "upstream port taken")]
