"""The agent's local `/v1/agent/...` API, as a Consul client agent serves it.

A plain ASGI app (run by uvicorn on 127.0.0.1): paths, JSON field names and
status codes as Consul's (success is 200 with an empty body for writes),
errors as plain text. It reads and writes the agent's local state only;
writes reach the control plane with the next sync, which they trigger at
once.

Who may do what (as Consul's agent API with ACLs on, one local token):
- every write (PUT/POST/DELETE) and every leaf (`/v1/agent/connect/ca/leaf/`,
  which answers a private key) needs the agent's local token, made by the
  agent in `<data-dir>/agent-token` (mode 0600: readable by the agent's user
  only), sent as `X-Consul-Token`, `Authorization: Bearer` or `?token=`;
  reads need none;
- a service outside the node's scope (its join token's services) is refused
  at registration and for leaves, with the scope in the message;
- the `Host` header must name this listener (its address, `localhost`, or an
  IP literal): a page served from another name that resolves here (DNS
  rebinding) gets 421.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from agents.state import StateError, UnknownError
from meshproto import probes
from meshproto.registration import decode, rules, shapes

if TYPE_CHECKING:
    from agents.agent import Agent

MAX_BODY = 1 << 20
TOKEN_FILE = "agent-token"
LEAF_PREFIX = "/v1/agent/connect/ca/leaf/"
VERSION = shapes.VERSION
STATUS_CODE = {"passing": 200, "warning": 429, "critical": 503, "maintenance": 503}


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Request:
    def __init__(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, headers: dict
    ):
        self.method, self.path, self.query, self.body, self.headers = (
            method,
            path,
            query,
            body,
            headers,
        )

    def param(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default

    def has(self, name: str) -> bool:
        return name in self.query

    def flag(self, name: str) -> bool:
        if name not in self.query:
            return False
        return self.param(name).lower() in ("", "1", "true", "yes")

    def token(self) -> str:
        """The token the caller sent: `X-Consul-Token`, `Authorization: Bearer`, `?token=`."""
        if self.headers.get("x-consul-token"):
            return self.headers["x-consul-token"].strip()
        scheme, _, value = self.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return self.param("token").strip()

    def json(self, table: decode.Struct | None = None) -> Any:
        """The body, decoded by `table` when given (the control plane's decoder, strict)."""
        try:
            data = decode.parse_json(self.body)
            return table(data) if table is not None else data
        except decode.DecodeError as exc:
            raise HTTPError(400, f"Request decode failed: {exc}") from None


class Reply:
    def __init__(
        self,
        data: Any = None,
        status: int = 200,
        raw: bytes | None = None,
        ctype: str = "application/json",
    ):
        self.data, self.status, self.raw, self.ctype = data, status, raw, ctype

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.data, indent=None).encode()


Handler = Callable[..., Awaitable[Reply]]
ROUTES: list[tuple[str, re.Pattern, Handler]] = []


def route(method: str, pattern: str) -> Callable[[Handler], Handler]:
    def wrap(fn: Handler) -> Handler:
        ROUTES.append((method, re.compile("^" + pattern + "$"), fn))
        return fn

    return wrap


# --- shapes ---------------------------------------------------------------------------


def service_json(agent: Agent, svc) -> dict[str, Any]:
    return shapes.agent_service_from_definition(svc.definition, agent.datacenter)


def check_json(agent: Agent, c) -> dict[str, Any]:
    return shapes.check(
        node=agent.node,
        check_id=c.check_id,
        name=c.name,
        status=c.status,
        notes=c.notes,
        output=c.output,
        service_id=c.service_id,
        service_name=c.service_name,
        service_tags=c.service_tags,
        check_type=c.kind,
        definition=c.definition,
        modify_index=c.modify_index,
    )


aggregate = rules.aggregate_status


def _content_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --- agent ----------------------------------------------------------------------------


@route("GET", "/v1/agent/self")
async def self_(agent: Agent, req: Request) -> Reply:
    return Reply(
        {
            "Config": {
                "Datacenter": agent.datacenter,
                "PrimaryDatacenter": agent.datacenter,
                "NodeName": agent.node,
                "NodeID": agent.node_id,
                "Server": False,
                "Revision": "meshweb",
                "Version": VERSION,
            },
            "DebugConfig": {},
            "Coord": agent.coordinates.coordinate.to_json(),
            "Member": member(agent),
            "Stats": {"agent": {"connected": str(agent.connected).lower()}},
            "Meta": {},
            "xDS": None,
        }
    )


def member(agent: Agent) -> dict[str, Any]:
    return shapes.member(
        name=agent.node,
        addr=agent.config.bind,
        port=agent.config.http_port,
        role="node",
        datacenter=agent.datacenter,
        node_id=agent.node_id,
    )


@route("GET", "/v1/event/list")
async def event_list(agent: Agent, req: Request) -> Reply:
    """The events this agent received (its own buffer, as a Consul agent answers)."""
    return Reply(agent.events.list(req.param("name")))


@route("GET", "/v1/agent/members")
async def members(agent: Agent, req: Request) -> Reply:
    return Reply([member(agent)])


@route("PUT", "/v1/agent/reload")
async def reload(agent: Agent, req: Request) -> Reply:
    errors = agent.reload()
    if errors:
        raise HTTPError(500, "Failed reloading: " + "; ".join(errors))
    return Reply(raw=b"")


@route("PUT", "/v1/agent/maintenance")
async def node_maintenance(agent: Agent, req: Request) -> Reply:
    if not req.has("enable"):
        raise HTTPError(400, "Missing value for enable")
    agent.state.set_maintenance("", req.flag("enable"), req.param("reason"))
    agent.local_changed()
    return Reply(raw=b"")


# --- services -------------------------------------------------------------------------


@route("GET", "/v1/agent/services")
async def services(agent: Agent, req: Request) -> Reply:
    return Reply(
        {
            s.id: service_json(agent, s)
            for s in sorted(agent.state.services.values(), key=lambda s: s.id)
        }
    )


@route("GET", "/v1/agent/service/(?P<service_id>[^/]+)")
async def service(agent: Agent, req: Request, service_id: str) -> Reply:
    svc = agent.state.services.get(service_id)
    if svc is None:
        raise HTTPError(404, f"unknown service ID: {service_id}")
    data = service_json(agent, svc)
    data["ContentHash"] = _content_hash(data)
    return Reply(data)


@route("PUT", "/v1/agent/service/register")
async def service_register(agent: Agent, req: Request) -> Reply:
    spec = req.json(decode.AGENT_SERVICE)
    try:
        rules.validate_service(spec)
    except rules.RuleError as exc:
        raise HTTPError(400, str(exc)) from None
    refusal = agent.scope_refusal(spec)
    if refusal:
        raise HTTPError(403, refusal)
    agent.state.register_service(spec, replace_existing_checks=req.flag("replace-existing-checks"))
    agent.local_changed()
    return Reply(raw=b"")


@route("PUT", "/v1/agent/service/deregister/(?P<service_id>[^/]+)")
async def service_deregister(agent: Agent, req: Request, service_id: str) -> Reply:
    agent.state.deregister_service(service_id)
    agent.local_changed()
    return Reply(raw=b"")


@route("PUT", "/v1/agent/service/maintenance/(?P<service_id>[^/]+)")
async def service_maintenance(agent: Agent, req: Request, service_id: str) -> Reply:
    if not req.has("enable"):
        raise HTTPError(400, "Missing value for enable")
    agent.state.set_maintenance(service_id, req.flag("enable"), req.param("reason"))
    agent.local_changed()
    return Reply(raw=b"")


@route("GET", "/v1/agent/health/service/id/(?P<service_id>[^/]+)")
async def health_by_id(agent: Agent, req: Request, service_id: str) -> Reply:
    svc = agent.state.services.get(service_id)
    if svc is None:
        text = f"ServiceId {service_id} not found"
        return Reply(raw=text.encode(), status=404, ctype="text/plain")
    checks = sorted(agent.state.service_checks(service_id), key=lambda c: c.check_id)
    node_checks = list(agent.state.node_checks())
    status = aggregate(c.status for c in [*node_checks, *checks])
    data = {
        "AggregatedStatus": status,
        "Service": service_json(agent, svc),
        "Checks": [check_json(agent, c) for c in checks],
    }
    if req.param("format") == "text":
        return Reply(raw=status.encode(), status=STATUS_CODE.get(status, 503), ctype="text/plain")
    return Reply(data, status=STATUS_CODE.get(status, 503))


@route("GET", "/v1/agent/health/service/name/(?P<name>[^/]+)")
async def health_by_name(agent: Agent, req: Request, name: str) -> Reply:
    found = [s for s in agent.state.services.values() if s.name == name]
    if not found:
        text = f"ServiceName {name} Not Found"
        return Reply(raw=text.encode(), status=404, ctype="text/plain")
    node_checks = list(agent.state.node_checks())
    out, worst = [], "passing"
    for svc in sorted(found, key=lambda s: s.id):
        checks = sorted(agent.state.service_checks(svc.id), key=lambda c: c.check_id)
        status = aggregate(c.status for c in [*node_checks, *checks])
        worst = aggregate([worst, status])
        out.append(
            {
                "AggregatedStatus": status,
                "Service": service_json(agent, svc),
                "Checks": [check_json(agent, c) for c in checks],
            }
        )
    return Reply(out, status=STATUS_CODE.get(worst, 503))


# --- checks ---------------------------------------------------------------------------


@route("GET", "/v1/agent/checks")
async def checks(agent: Agent, req: Request) -> Reply:
    return Reply(
        {
            c.check_id: check_json(agent, c)
            for c in sorted(agent.state.checks.values(), key=lambda c: c.check_id)
        }
    )


@route("PUT", "/v1/agent/check/register")
async def check_register(agent: Agent, req: Request) -> Reply:
    spec = req.json(decode.AGENT_CHECK)
    if not spec.get("Name") and not spec.get("CheckID"):
        raise HTTPError(400, "Missing check name")
    try:
        rules.require_check_kind(spec)
        rules.check_status(spec.get("Status"))
    except rules.RuleError as exc:
        raise HTTPError(400, str(exc)) from None
    agent.state.register_check(spec)
    agent.local_changed()
    return Reply(raw=b"")


@route("PUT", "/v1/agent/check/deregister/(?P<check_id>[^/]+)")
async def check_deregister(agent: Agent, req: Request, check_id: str) -> Reply:
    agent.state.deregister_check(check_id)
    agent.local_changed()
    return Reply(raw=b"")


def _ttl(agent: Agent, check_id: str, status: str, output: str) -> Reply:
    check = agent.state.checks.get(check_id)
    if check is None:
        raise HTTPError(
            404,
            f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.',
        )
    if check.kind != "ttl":
        raise HTTPError(400, f'CheckID "{check_id}" does not have associated TTL')
    agent.checks.ttl_update(check_id, status, output)
    return Reply(raw=b"")


@route("PUT", "/v1/agent/check/pass/(?P<check_id>[^/]+)")
async def check_pass(agent: Agent, req: Request, check_id: str) -> Reply:
    return _ttl(agent, check_id, probes.PASSING, req.param("note"))


@route("PUT", "/v1/agent/check/warn/(?P<check_id>[^/]+)")
async def check_warn(agent: Agent, req: Request, check_id: str) -> Reply:
    return _ttl(agent, check_id, probes.WARNING, req.param("note"))


@route("PUT", "/v1/agent/check/fail/(?P<check_id>[^/]+)")
async def check_fail(agent: Agent, req: Request, check_id: str) -> Reply:
    return _ttl(agent, check_id, probes.CRITICAL, req.param("note"))


@route("PUT", "/v1/agent/check/update/(?P<check_id>[^/]+)")
async def check_update(agent: Agent, req: Request, check_id: str) -> Reply:
    body = req.json(decode.CHECK_UPDATE)
    status = body.get("Status") or ""
    if status not in rules.STATUSES:
        raise HTTPError(400, f"Invalid check status: {status!r}")
    return _ttl(agent, check_id, status, rules.truncate_output(body.get("Output") or ""))


# --- connect --------------------------------------------------------------------------


@route("GET", "/v1/agent/connect/ca/roots")
async def ca_roots(agent: Agent, req: Request) -> Reply:
    return Reply(agent.roots_json())


@route("GET", "/v1/agent/connect/ca/leaf/(?P<service>[^/]+)")
async def ca_leaf(agent: Agent, req: Request, service: str) -> Reply:
    try:
        return Reply(await agent.service_leaf_json(service))
    except PermissionError as exc:
        raise HTTPError(403, str(exc)) from None
    except ConnectionError as exc:
        raise HTTPError(500, str(exc)) from None


@route("GET", "/v1/agent/connect/proxy/(?P<proxy_id>[^/]+)")
async def connect_proxy(agent: Agent, req: Request, proxy_id: str) -> Reply:
    if (
        proxy_id not in agent.state.services
        or agent.state.services[proxy_id].kind != "connect-proxy"
    ):
        raise HTTPError(404, f"unknown proxy service ID: {proxy_id}")
    config = agent.proxy_config(proxy_id)
    if config is None:
        raise HTTPError(404, f"no config received yet for proxy {proxy_id}")
    return Reply(config)


# --- who may call -----------------------------------------------------------------------


def ensure_token(data_dir: Path) -> str:
    """The agent's local API token, `<data-dir>/agent-token` (mode 0600), made once.

    Local tools read it from there (`CONSUL_HTTP_TOKEN_FILE`); the file's mode
    is what keeps other users of the host out.
    """
    from agents.client import write_private

    path = data_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if token:
        os.chmod(path, 0o600)
        return token
    token = secrets.token_urlsafe(32)
    write_private(path, token + "\n")
    return token


def needs_token(method: str, path: str) -> bool:
    """Writes and leaves (a leaf answer holds the service's private key)."""
    return method not in ("GET", "HEAD") or path.startswith(LEAF_PREFIX)


def host_allowed(host_header: str | None, bind_host: str) -> bool:
    """Whether `Host` names this listener: its bind address, `localhost`, or an IP literal.

    A browser that reached us through another name (DNS rebinding: evil.example
    resolving to 127.0.0.1) sends that name; no page can make it send ours.
    """
    if host_header is None:  # HTTP/1.0 without Host: not a browser
        return True
    text = host_header.strip().lower()
    if text.startswith("["):
        name = text[1 : text.find("]")] if "]" in text else text
    else:
        name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    if name in ("localhost", (bind_host or "").strip("[]").lower()):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _refusal(req: Request, agent: Agent) -> Reply | None:
    if not host_allowed(req.headers.get("host"), agent.config.http_host):
        message = (
            f"Host {req.headers.get('host')!r} is not this agent's address "
            f"({agent.config.http_host}); refusing (DNS rebinding protection)"
        )
        return Reply({"error": message}, status=421)
    if needs_token(req.method, req.path) and not hmac.compare_digest(
        req.token().encode(), agent.local_token.encode()
    ):
        message = (
            "Permission denied: the agent's local API needs its token for writes and leaves "
            f"(X-Consul-Token or Authorization: Bearer; the token is in "
            f"{agent.config.data_dir / TOKEN_FILE})"
        )
        return Reply(raw=message.encode(), status=403, ctype="text/plain; charset=utf-8")
    return None


# --- the ASGI app ---------------------------------------------------------------------


def make_app(agent: Agent):
    """The ASGI application serving `/v1/agent/...` for `agent`."""

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > MAX_BODY:
                await _send(
                    send, Reply(raw=b"Request body too large", status=413, ctype="text/plain")
                )
                return
        method = scope["method"]
        path = unquote(scope["path"])
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        req = Request(method, path, query, body, headers)
        reply = _refusal(req, agent) or await dispatch(agent, req)
        await _send(send, reply)

    return app


async def dispatch(agent: Agent, req: Request) -> Reply:
    method = "GET" if req.method == "HEAD" else req.method
    allowed = []
    for m, pattern, fn in ROUTES:
        match = pattern.match(req.path)
        if match is None:
            continue
        # Consul accepts POST where it documents PUT.
        if m == method or (m == "PUT" and method == "POST"):
            try:
                return await fn(agent, req, **match.groupdict())
            except HTTPError as exc:
                return Reply(
                    raw=exc.message.encode(), status=exc.status, ctype="text/plain; charset=utf-8"
                )
            except UnknownError as exc:  # the state's refusals, answered as Consul does
                return Reply(raw=str(exc).encode(), status=404, ctype="text/plain; charset=utf-8")
            except StateError as exc:
                return Reply(raw=str(exc).encode(), status=400, ctype="text/plain; charset=utf-8")
            except Exception as exc:  # a bug must answer 500, not kill the server
                import logging

                logging.getLogger("mesh.agent.http").exception("handler failed")
                return Reply(raw=str(exc).encode(), status=500, ctype="text/plain; charset=utf-8")
        allowed.append(m)
    if allowed:
        return Reply(
            raw=f"method {req.method} not allowed".encode(), status=405, ctype="text/plain"
        )
    return Reply(raw=b"404 page not found", status=404, ctype="text/plain; charset=utf-8")


async def _send(send, reply: Reply) -> None:
    body = reply.body()
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": [
                (b"content-type", reply.ctype.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"x-consul-knownleader", b"true"),
                (b"x-consul-index", b"1"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
