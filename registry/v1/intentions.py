"""`/v1/connect/intentions/...` and `/v1/agent/connect/authorize`, as Consul's.

Reads are blocking-capable: the list, match and check on the `intentions`
topic, the exact read on `intentions:<destination>`. ACLs as Consul:
intentions:read on either end to read an intention, intentions:write on the
destination to write one, service:read on the destination to `check`,
service:write on the target to `authorize`.
"""

from __future__ import annotations

from django.urls import path

from registry.decode import Anything, MapOf, Str, Struct
from registry.domain import intentions, reads
from registry.errors import MeshError, NotFound
from registry.v1.base import RESULTS_FILTERED_HEADER, Ctx, Reply, endpoint

INTENTION = Struct(
    {
        "ID": Str,
        "Description": Str,
        "SourceNS": Str,
        "SourceName": Str,
        "DestinationNS": Str,
        "DestinationName": Str,
        "SourceType": Str,
        "SourcePeer": Str,
        "Action": Str,
        "Permissions": Anything,  # validated field by field in meshproto.intentions
        "Meta": MapOf(Str),
    }
)
AUTHORIZE = Struct({"Target": Str, "ClientCertURI": Str, "ClientCertSerial": Str})


def _check_dc(ctx: Ctx) -> None:
    if ctx.has("dc"):
        reads.check_datacenter(ctx.dc)


def _accessor(ctx: Ctx) -> str:
    return ctx.identity.accessor_id


def _pair(ctx: Ctx) -> tuple[tuple[str, str], tuple[str, str]]:
    return (
        intentions.parse_service_ref(ctx.param("source"), "source"),
        intentions.parse_service_ref(ctx.param("destination"), "destination"),
    )


def _with_index(exc: MeshError, index: int) -> MeshError:
    exc.index = index  # type: ignore[attr-defined]  # read by base._blocking for X-Consul-Index
    return exc


# --- list and legacy create ------------------------------------------------------------


@endpoint("GET", "POST", topics=lambda ctx: ([intentions.TOPIC], []))
def collection(ctx: Ctx) -> Reply:
    _check_dc(ctx)
    if ctx.method == "POST":
        row = intentions.create(ctx.authz, ctx.json(INTENTION), _accessor(ctx))
        return Reply({"ID": row.id})
    listing = intentions.list_intentions(ctx.authz)
    headers = {RESULTS_FILTERED_HEADER: "true"} if listing.filtered else {}
    data = [intentions.intention_json(r) for r in listing.rows]
    return Reply(data, listing.index, headers=headers, filterable=True)


# --- by source and destination -----------------------------------------------------------


def _exact_topics(ctx: Ctx):
    destination = intentions.parse_service_ref(ctx.param("destination"), "destination")
    return [intentions.destination_topic(destination[1])], []


@endpoint("GET", "PUT", "DELETE", topics=_exact_topics)
def exact(ctx: Ctx) -> Reply:
    _check_dc(ctx)
    source, destination = _pair(ctx)
    if ctx.method == "PUT":
        spec = ctx.json(INTENTION, required=False)
        intentions.upsert_exact(ctx.authz, source, destination, spec, _accessor(ctx))
        return Reply(True)
    if ctx.method == "DELETE":
        return Reply(intentions.delete_exact(ctx.authz, source, destination, _accessor(ctx)))
    authz = ctx.authz
    ctx.require(
        authz.intention_read(source[1]) or authz.intention_read(destination[1]),
        "intentions:read",
        destination[1],
    )
    index, row = intentions.get_exact(source, destination)
    if row is None:
        raise _with_index(NotFound("Intention not found"), index)
    return Reply(intentions.intention_json(row), index)


# --- match and check ---------------------------------------------------------------------


@endpoint("GET", topics=lambda ctx: ([intentions.TOPIC], []))
def match(ctx: Ctx) -> Reply:
    _check_dc(ctx)
    names = ctx.query.getlist("name")
    index, found = intentions.match(ctx.authz, ctx.param("by"), names, _accessor(ctx))
    data = {name: [intentions.intention_json(r) for r in rows] for name, rows in found.items()}
    return Reply(data, index)


@endpoint("GET", topics=lambda ctx: ([intentions.TOPIC, *intentions.MESH_TOPICS], []))
def check(ctx: Ctx) -> Reply:
    _check_dc(ctx)
    source, destination = _pair(ctx)
    index, allowed = intentions.check(
        ctx.authz, source, destination, ctx.param("source-type", "consul"), _accessor(ctx)
    )
    return Reply({"Allowed": allowed}, index)


# --- legacy by ID ------------------------------------------------------------------------


@endpoint("GET", "PUT", "DELETE", topics=lambda ctx, intention_id: ([intentions.TOPIC], []))
def by_id(ctx: Ctx, intention_id: str) -> Reply:
    _check_dc(ctx)
    if ctx.method == "PUT":
        intentions.update_by_id(ctx.authz, intention_id, ctx.json(INTENTION), _accessor(ctx))
        return Reply(True)
    if ctx.method == "DELETE":
        return Reply(intentions.delete_by_id(ctx.authz, intention_id, _accessor(ctx)))
    index = intentions.current_index()
    try:
        row = intentions.get_by_id(intention_id)
    except NotFound as exc:
        raise _with_index(exc, index) from None
    intentions.require_read(ctx.authz, row, _accessor(ctx))
    return Reply(intentions.intention_json(row), index)


# --- agent authorize ---------------------------------------------------------------------


@endpoint("POST", "PUT", batched=False)  # Consul's method is POST; py-consul 1.8 sends PUT
def authorize(ctx: Ctx) -> Reply:
    spec = ctx.json(AUTHORIZE)
    decision = intentions.authorize(
        ctx.authz,
        spec.get("Target", ""),
        spec.get("ClientCertURI", ""),
        spec.get("ClientCertSerial", ""),
        _accessor(ctx),
    )
    return Reply({"Authorized": decision.allowed, "Reason": decision.reason})


urlpatterns = [
    path("connect/intentions", collection),
    path("connect/intentions/", collection),
    path("connect/intentions/exact", exact),
    path("connect/intentions/match", match),
    path("connect/intentions/check", check),
    path("connect/intentions/<str:intention_id>", by_id),
    path("agent/connect/authorize", authorize),
]
