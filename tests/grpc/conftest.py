"""A real control plane for the agent protocol's tests, and a minimal agent:
a real grpc.aio client with the generated stubs, its own key and CSR, no
meshweb code but `meshproto` (as the real agent)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest

from meshproto import pki, spiffe
from meshproto.proto import mesh_pb2, mesh_pb2_grpc
from tests.support.servers import MeshServer, make_server


@pytest.fixture(scope="module")
def cp(tmp_path_factory) -> MeshServer:
    """A control plane with ACLs on (its management token in `cp.token`)."""
    # Many tests here fail joins on purpose: the failed-join throttle is tested apart.
    srv = make_server(
        tmp_path_factory.mktemp("cp"), acl=True, extra_env={"MESH_JOIN_FAILURE_BURST": "1000"}
    )
    yield srv
    srv.close()
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]


def new_token(server: MeshServer, *, uses: int = 1, ttl: str = "1h", **extra) -> dict:
    """A join token; its scope allows any service unless `services=[...]` says otherwise."""
    extra.setdefault("services", ["*"])
    with server.client() as http:
        r = http.post("/api/join-tokens/", json={"uses": uses, "ttl": ttl, **extra})
    assert r.status_code == 201, r.text
    return r.json()


def roots_pem(server: MeshServer) -> str:
    with server.client() as http:
        r = http.get("/v1/connect/ca/roots", params={"pem": "true"})
    assert r.status_code == 200
    return r.text


def trust_domain(server: MeshServer) -> str:
    with server.client() as http:
        return http.get("/v1/connect/ca/roots").json()["TrustDomain"]


def unique_node(prefix: str = "host") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def acl_token(server: MeshServer, rules: str) -> str:
    """The secret of a new ACL token with one policy of `rules`."""
    with server.client() as http:
        policy = http.put(
            "/v1/acl/policy", json={"Name": f"p-{unique_node()}", "Rules": rules}
        ).json()
        token = http.put("/v1/acl/token", json={"Policies": [{"ID": policy["ID"]}]}).json()
    return token["SecretID"]


@dataclass
class Agent:
    """What a per-host agent holds: a node name, a key, the certificate Join gave it."""

    server: MeshServer
    node: str
    key: object = field(default_factory=pki.generate_key)
    cert_pem: str = ""
    roots: str = ""
    response: mesh_pb2.JoinResponse | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def csr(self, dc: str = "dc1") -> str:
        uri = spiffe.agent_id(trust_domain(self.server), self.node, dc).uri
        return pki.make_csr(self.key, uri)

    def channel(self, *, with_cert: bool = True, options=()) -> grpc.aio.Channel:
        roots = self.roots or roots_pem(self.server)
        creds = grpc.ssl_channel_credentials(
            root_certificates=roots.encode(),
            private_key=pki.key_pem(self.key).encode() if with_cert and self.cert_pem else None,
            certificate_chain=self.cert_pem.encode() if with_cert and self.cert_pem else None,
        )
        return grpc.aio.secure_channel(self.target, creds, options=list(options))

    async def join(self, token: str, **fields) -> mesh_pb2.JoinResponse:
        request = mesh_pb2.JoinRequest(
            join_token=token, node_name=self.node, csr_pem=self.csr(), address="127.0.0.1"
        )
        for k, v in fields.items():
            if k == "meta":
                request.meta.update(v)
            else:
                setattr(request, k, v)
        async with self.channel(with_cert=False) as ch:
            resp = await mesh_pb2_grpc.AgentControlStub(ch).Join(request, timeout=15)
        self.cert_pem, self.roots, self.response = resp.cert_pem, "".join(resp.roots_pem), resp
        return resp

    async def call(self, method: str, request, *, timeout: float = 15):
        async with self.channel() as ch:
            return await getattr(mesh_pb2_grpc.AgentControlStub(ch), method)(
                request, timeout=timeout
            )

    async def sync(self, services=(), checks=(), **kw) -> int:
        state = mesh_pb2.NodeState(
            address=kw.pop("address", "127.0.0.1"),
            services_json=[json.dumps(s) for s in services],
            checks_json=[json.dumps(c) for c in checks],
            **kw,
        )
        return (await self.call("SyncNode", state)).index

    async def update_checks(self, *updates: tuple[str, str, str]) -> int:
        request = mesh_pb2.CheckUpdates(
            updates=[mesh_pb2.CheckStatus(check_id=c, status=s, output=o) for c, s, o in updates]
        )
        return (await self.call("UpdateChecks", request)).index


def join_now(server: MeshServer, node: str | None = None, **token_kw) -> Agent:
    agent = Agent(server, node or unique_node())
    asyncio.run(agent.join(new_token(server, **token_kw)["token"]))
    return agent


class Stream:
    """One `StreamProxyConfigs` call: a background reader stamps every update."""

    def __init__(self, agent: Agent, proxy_ids=()) -> None:
        self.agent = agent
        self.proxy_ids = list(proxy_ids)
        self.updates: asyncio.Queue[tuple[float, mesh_pb2.ProxyConfigUpdate]] = asyncio.Queue()
        self.error: grpc.aio.AioRpcError | None = None

    async def __aenter__(self) -> Stream:
        self._channel = self.agent.channel()
        self.call = mesh_pb2_grpc.AgentControlStub(self._channel).StreamProxyConfigs()
        await self.send(subscribe=mesh_pb2.Subscribe(proxy_ids=self.proxy_ids))
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for update in self.call:
                self.updates.put_nowait((time.monotonic(), update))
        except grpc.aio.AioRpcError as exc:
            self.error = exc

    async def send(self, **kind) -> None:
        await self.call.write(mesh_pb2.StreamRequest(**kind))

    async def ack(self, update: mesh_pb2.ProxyConfigUpdate, ok: bool = True, error: str = ""):
        await self.send(
            ack=mesh_pb2.Ack(proxy_id=update.proxy_id, version=update.version, ok=ok, error=error)
        )

    async def next(self, timeout: float = 5.0) -> tuple[float, mesh_pb2.ProxyConfigUpdate]:
        return await asyncio.wait_for(self.updates.get(), timeout)

    async def quiet(self, seconds: float) -> list[mesh_pb2.ProxyConfigUpdate]:
        """What arrives within `seconds` (expected: nothing)."""
        await asyncio.sleep(seconds)
        got = []
        while not self.updates.empty():
            got.append(self.updates.get_nowait()[1])
        return got

    async def __aexit__(self, *exc) -> None:
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        await self._channel.close()


def config_of(update: mesh_pb2.ProxyConfigUpdate) -> dict:
    return json.loads(update.config_json)
