"""The plumbing every `/v1` endpoint shares: Consul's wire habits in one place.

An endpoint is a plain sync function `(ctx, **url_kwargs) -> Reply` that runs
on the database pool; `endpoint(...)` wraps it in an async Django view that
parses Consul's query parameters, resolves the ACL token, maps errors to
Consul's status codes and plain-text messages, and implements blocking
queries:

1. register interest in the endpoint's topics with the change hub,
2. compute the answer,
3. if its index has not passed `?index=`, wait for a change (or `?wait=`)
   and go to 2.

Registering before computing means no change can slip between them.
Identical concurrent reads (1,000 watchers woken by one write) share one
computation: a result computed after a waiter's wake-up is good for it.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from registry import audit, db
from registry import topics as topic
from registry.changes import hub
from registry.decode import Struct, parse_body_json, parse_duration
from registry.errors import BadRequest, MeshError, PermissionDenied, TooLarge
from registry.filtering import DEFAULT_BUDGET, FilterError, compile_filter
from registry.txn import topics_index

MAX_INDEX = 2**63 - 1
_TRUE = {"", "true", "1", "yes", "on", "t"}
_FALSE = {"false", "0", "no", "off", "f"}


@dataclass
class Reply:
    """What an endpoint answers: JSON data (or raw bytes), its index, its status."""

    data: Any = None
    index: int | None = None
    status: int = 200
    raw: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    # Apply `?filter=` to `data` (a list, or the values of a dict).
    filterable: bool = False
    # The rendered body, kept when the reply is cached and served again.
    rendered: bytes | None = None


class Ctx:
    """One request's parsed inputs, as endpoints need them."""

    def __init__(self, request: HttpRequest) -> None:
        self.request = request
        self.method = request.method or "GET"
        self.query = request.GET
        self.token = _token(request)
        self._identity = None
        self._authz = None

    # -- query parameters -----------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.query

    def flag(self, name: str) -> bool:
        """A boolean parameter parsed by value: absent false, bare `?x` true."""
        if name not in self.query:
            return False
        value = self.query.get(name, "").strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise BadRequest(f"Invalid value for ?{name}: {value!r} is not a boolean")

    def param(self, name: str, default: str = "") -> str:
        return self.query.get(name, default)

    def int_param(self, name: str, default: int = 0) -> int:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(f"Invalid value for ?{name}: {raw!r} is not an integer") from None
        if value < 0 or value > MAX_INDEX:
            raise BadRequest(f"Invalid value for ?{name}: {raw!r} is out of range")
        return value

    @property
    def dc(self) -> str:
        return self.query.get("dc") or settings.MESH_DC

    # -- body -----------------------------------------------------------------
    def body_bytes(self) -> bytes:
        return self.request.body

    def json(self, spec: Struct | None = None, *, required: bool = True) -> Any:
        data = parse_body_json(self.request.body)
        audit.note_body(data)
        if data is None:
            if required:
                raise BadRequest("Request decode failed: empty body")
            return {} if spec is not None else None
        return spec(data) if spec is not None else data

    # -- ACL -----------------------------------------------------------------
    @property
    def identity(self):
        """The caller's resolved token (accessor and authorizer); runs on the DB pool."""
        if self._identity is None:
            from registry.domain.acl import resolve_token

            self._identity = resolve_token(self.token)
        return self._identity

    @property
    def authz(self):
        if self._authz is None:
            authz = self.identity.authorizer
            if settings.MESH_ACL_ENABLED and not authz.is_management():
                authz = _ReadsNoted(authz)
            self._authz = authz
        return self._authz

    @property
    def results_filtered(self) -> bool:
        """True when a read permission was refused while answering: results were left out."""
        return isinstance(self._authz, _ReadsNoted) and self._authz.refused

    def require_all(self, needs: Iterable[tuple[str, str]]) -> None:
        """Refuse unless the token has every `(permission, resource)` need."""
        from registry.domain.acl import allowed

        for permission, resource in needs:
            self.require(allowed(self.authz, permission, resource), permission, resource)

    def require(self, allowed: bool, permission: str = "", resource: str = "") -> None:
        """Refuse unless `allowed`, with Consul's 403 text."""
        if not allowed:
            detail = ""
            if permission:
                detail = f": token with AccessorID '{self.identity.accessor_id}' lacks permission '{permission}'"
                if resource:
                    detail += f' on "{resource}"'
            raise PermissionDenied("Permission denied" + detail)


RESULTS_FILTERED_HEADER = "X-Consul-Results-Filtered-By-ACLs"


class _ReadsNoted:
    """A token's authorizer that notes whether any `*_read` check said no.

    Reads filter what the token may not see; Consul then answers
    `X-Consul-Results-Filtered-By-ACLs: true`, so a client can tell "nothing
    there" from "nothing you may see" (the CLI says which).
    """

    def __init__(self, authz) -> None:
        self._authz = authz
        self.refused = False

    def __getattr__(self, name: str):
        attr = getattr(self._authz, name)
        if not (name.endswith("_read") and callable(attr)):
            return attr

        def check(*args, **kwargs):
            ok = attr(*args, **kwargs)
            if not ok:
                self.refused = True
            return ok

        return check


def _read(fn: Callable[..., Reply], ctx: Ctx, kwargs: dict) -> Reply:
    """Run a read endpoint; mark its reply when ACLs left results out."""
    reply = fn(ctx, **kwargs)
    if ctx.results_filtered:
        reply.headers = {**reply.headers, RESULTS_FILTERED_HEADER: "true"}
    return reply


def _token(request: HttpRequest) -> str:
    from registry.domain.acl import secret_from_request

    return secret_from_request(request)


def _blocking_params(ctx: Ctx) -> tuple[int, float]:
    raw = ctx.query.get("index")
    index = 0
    if raw not in (None, ""):
        try:
            index = int(raw)
        except ValueError:
            raise BadRequest(f"Invalid index: {raw!r} is not an integer") from None
        if index < 0 or index > MAX_INDEX:
            raise BadRequest(f"Invalid index: {raw} is out of range")
    wait = 300.0
    raw_wait = ctx.query.get("wait")
    if raw_wait not in (None, ""):
        try:
            wait = parse_duration(raw_wait if not raw_wait.isdigit() else raw_wait + "s")
        except ValueError:
            raise BadRequest(f"Invalid wait time: {raw_wait!r}") from None
        if wait < 0:
            raise BadRequest(f"Invalid wait time: {raw_wait!r}")
    wait = min(wait, float(settings.MESH_MAX_WAIT_SECONDS))
    # Consul adds up to wait/16 of jitter so that watchers don't return in lockstep.
    return index, wait + random.random() * wait / 16


Topics = Callable[..., tuple[Iterable[str], Iterable[str]]]


class _Flight:
    __slots__ = ("seq", "future")

    def __init__(self, seq: int, future: asyncio.Future) -> None:
        self.seq = seq
        self.future = future


_flights: dict[tuple, _Flight] = {}


class _ReadCache:
    """Answers of blocking-capable reads, reused while their topics are unchanged.

    An entry holds the topics' index read *before* the answer was computed;
    a later request re-reads that index (one small query) and reuses the
    answer only if it is unchanged, so a cached read is as fresh as a
    computed one. `acl` is always among the topics: a policy change must not
    leave a token looking at what it could see before.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[int, Reply]] = OrderedDict()
        self._lock = threading.Lock()

    def read(
        self, key: tuple, exact: tuple[str, ...], prefixes: tuple[str, ...], fn: Callable[[], Reply]
    ) -> Reply:
        index = topics_index(exact + (topic.ACL,), prefixes)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] == index:
                self._entries.move_to_end(key)
                return hit[1]
        reply = fn()
        if reply.status == 200:
            with self._lock:
                self._entries[key] = (index, reply)
                if len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return reply


read_cache = _ReadCache()


async def _compute(key: tuple, wake_seq: int, fn: Callable[[], Reply]) -> Reply:
    """Run `fn` on the DB pool, or share a run that started after `wake_seq`."""
    flight = _flights.get(key)
    if flight is not None and flight.seq >= wake_seq and not flight.future.done():
        return await asyncio.shield(flight.future)
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    _flights[key] = _Flight(hub.seq, future)
    try:
        reply = await db.run(fn)
    except BaseException as exc:
        if not future.done():
            future.set_exception(exc)
            future.exception()  # mark retrieved: joiners re-raise their own copy
        raise
    finally:
        if _flights.get(key) is not None and _flights[key].future is future:
            del _flights[key]
    future.set_result(reply)
    return reply


def _render(ctx: Ctx, reply: Reply) -> HttpResponse:
    if reply.rendered is not None:
        body = reply.rendered
    elif reply.raw is not None:
        body = reply.raw
    elif reply.data is None and reply.status == 404:
        body = b""
    else:
        body = json.dumps(
            reply.data,
            separators=(",", ":") if not ctx.has("pretty") else None,
            indent=4 if ctx.has("pretty") else None,
        ).encode()
        reply.rendered = body
        reply.data = None  # the bytes are what a cached reply serves again
    response = HttpResponse(body, status=reply.status, content_type=reply.content_type)
    if reply.index is not None:
        _index_headers(response, reply.index)
    for k, v in reply.headers.items():
        response[k] = v
    return response


def _filtered(ctx: Ctx, reply: Reply) -> Reply:
    """Apply `?filter=` to a filterable reply; runs on the DB pool, never on the loop.

    The filter language bounds its own work (registry.filtering), so one
    anonymous `?filter=` costs a pool thread a bounded time and the event
    loop (DNS, every other request) nothing. A bad or too costly filter is a
    400 carrying the listing's index, as Consul answers it.
    """
    expression = ctx.query.get("filter")
    if not (reply.filterable and expression) or reply.rendered is not None:
        return reply
    try:
        keep = compile_filter(expression, DEFAULT_BUDGET)
        data = reply.data
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if keep(v)}
        else:
            data = [item for item in data if keep(item)]
    except FilterError as exc:
        error = BadRequest(f"Failed to create boolean expression evaluator: {exc}")
        error.index = reply.index  # type: ignore[attr-defined]
        raise error from None
    reply.data = data
    reply.filterable = False
    return reply


def _read(fn: Callable[..., Reply], ctx: Ctx, kwargs: dict) -> Reply:
    """A read endpoint's answer, filtered: the whole of a read's work on the pool."""
    return _filtered(ctx, fn(ctx, **kwargs))


def _index_headers(response: HttpResponse, index: int) -> None:
    response["X-Consul-Index"] = str(max(index, 1))
    response["X-Consul-KnownLeader"] = "true"
    response["X-Consul-LastContact"] = "0"
    response["X-Consul-Effective-Consistency"] = "leader"


def _error(exc: MeshError, index: int | None = None) -> HttpResponse:
    response = HttpResponse(
        exc.message.encode(), status=exc.status, content_type="text/plain; charset=utf-8"
    )
    if index is not None:
        _index_headers(response, index)
    return response


def endpoint(
    *methods: str,
    topics: Topics | None = None,
    batched: bool = True,
) -> Callable[[Callable[..., Reply]], Callable[..., Any]]:
    """Wrap a sync endpoint function as an async Django view.

    `topics(ctx, **kwargs) -> (exact_topics, prefix_topics)` makes the
    endpoint blocking-query capable. Writes run on the batching writer
    (`registry.db.run_write`) unless `batched=False` (slow writes, such as a
    CA rotation that generates keys, must not hold up everyone else's).
    """
    allowed = {m.upper() for m in methods} or {"GET"}

    def decorate(fn: Callable[..., Reply]) -> Callable[..., Any]:
        async def view(request: HttpRequest, **kwargs: Any) -> HttpResponse:
            if request.method not in allowed:
                return HttpResponse(
                    f"method {request.method} not allowed".encode(),
                    status=405,
                    content_type="text/plain; charset=utf-8",
                    headers={"Allow": ", ".join(sorted(allowed))},
                )
            try:
                length = int(request.headers.get("Content-Length") or 0)
            except ValueError:
                return _error(BadRequest("Invalid Content-Length"))
            if length > settings.MESH_MAX_BODY_SIZE:
                return _error(
                    TooLarge(
                        f"Request body({length} bytes) too large, max size: {settings.MESH_MAX_BODY_SIZE} bytes"
                    )
                )
            ctx = Ctx(request)
            try:
                if request.method != "GET":
                    runner = db.run_write if batched else db.run_detached
                    reply = await runner(_audited, fn, ctx, kwargs)
                    return _render(ctx, reply)
                if topics is None:
                    reply = await db.run(_read, fn, ctx, kwargs)
                    return _render(ctx, reply)
                return await _blocking(ctx, fn, kwargs)
            except MeshError as exc:
                return _error(exc, getattr(exc, "index", None))

        view.__name__ = fn.__name__
        view.__doc__ = fn.__doc__
        view.csrf_exempt = True  # token-authenticated API, no cookies
        view.endpoint = fn
        view.methods = frozenset(allowed)
        return view

    async def _blocking(ctx: Ctx, fn: Callable[..., Reply], kwargs: dict) -> HttpResponse:
        min_index, wait = _blocking_params(ctx)
        exact, prefixes = topics(ctx, **kwargs)  # type: ignore[misc]
        exact, prefixes = tuple(exact), tuple(prefixes)
        key = (fn.__module__, fn.__name__, ctx.request.path, _query_key(ctx), ctx.token)
        deadline = time.monotonic() + wait
        wake_seq = hub.seq
        while True:
            waiter = hub.watch(exact, prefixes) if min_index else None
            try:
                try:
                    reply = await _compute(
                        key,
                        wake_seq,
                        lambda: read_cache.read(
                            key, exact, prefixes, lambda: _read(fn, ctx, kwargs)
                        ),
                    )
                except MeshError as exc:
                    idx = getattr(exc, "index", None)
                    return _error(exc, idx)
                if reply.index is not None:
                    reply.index = max(reply.index, 1)  # Consul never answers index 0
                if waiter is None or reply.index is None or reply.index > min_index:
                    return _render(ctx, reply)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return _render(ctx, reply)
                try:
                    await asyncio.wait_for(waiter.future, remaining)
                except TimeoutError:
                    wake_seq = hub.seq
                    continue_after_timeout = True
                else:
                    continue_after_timeout = False
                    wake_seq = hub.seq
            finally:
                if waiter is not None:
                    hub.unwatch(waiter)
            if continue_after_timeout:
                # Timed out: answer with the current state, whatever its index.
                min_index = 0

    return decorate


def _audited(fn: Callable[..., Reply], ctx: Ctx, kwargs: dict) -> Reply:
    """Run a write inside an audit scope naming the caller (never its secret)."""
    identity = ctx.identity
    actor = audit.Actor(identity.accessor_id or "anonymous", identity.description, "v1")
    query = "&".join(f"{k}={v}" for k, v in ctx.query.items() if k != "token")
    path = ctx.request.path + (f"?{query}" if query else "")
    action = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
    with audit.scope(actor, action, ctx.method, path):
        return fn(ctx, **kwargs)


def _query_key(ctx: Ctx) -> tuple:
    return tuple(sorted((k, tuple(v)) for k, v in ctx.query.lists() if k not in ("index", "wait")))
