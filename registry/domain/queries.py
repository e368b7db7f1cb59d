"""Prepared queries: stored service lookups with filters, failover and templates.

A query names a service and how to pick its instances (`Tags`, with `!tag`
to exclude; `NodeMeta`; `ServiceMeta`; `OnlyPassing`, else anything but
critical; `IgnoreCheckIDs`; `Connect`), how to sort them (`Near` a node or
`_agent`, by network coordinates; otherwise shuffled, as Consul does) and
where to look when the local datacenter has no healthy instance
(`Failover`: the `NearestN` nearest datacenters by coordinates, then the
listed `Datacenters` in order). Datacenters are those the catalog's nodes
belong to: executing in `dc2` means choosing among the instances on nodes
of `dc2`.

Templates (`Template.Type` `name_prefix_match`) answer every name that
starts with the query's name: the longest such prefix wins, an exact name
beats a template, and a template with an empty name catches all. Before
running, every string in the query's `Service` is interpolated:
`${name.full}`, `${name.prefix}`, `${name.suffix}`, `${match(N)}` (the Nth
group of `Template.Regexp`, RE2 syntax, matched against the full name) and
`${agent.segment}`. A malformed template is refused when it is written.

ACL: writing a query needs `query:write` on its name, reading one
`query:read`; executing needs none on the query, but the instances it
returns are those its `Token` (else the caller's) may read.
"""

from __future__ import annotations

import random
import re
import uuid
from typing import Any

import re2
from django.conf import settings

from meshproto.durations import parse_duration
from registry import decode
from registry import topics as topic
from registry.domain import acl, coordinates, reads
from registry.errors import BadRequest, NotFound
from registry.models import Check, PreparedQuery, Session
from registry.txn import Change, topic_index

TEMPLATE_TYPES = ("name_prefix_match",)
HIDDEN = "<hidden>"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_VAR = re.compile(r"\$\{([^}]*)\}")
_MATCH = re.compile(r"^match\((\d+)\)$")
_RE2 = re2.Options()
_RE2.log_errors = False

SERVICE = decode.Struct(
    {
        "Service": decode.Str,
        "Failover": decode.Struct(
            {"NearestN": decode.IntIn(0, 1 << 20), "Datacenters": decode.ListOf(decode.Str)}
        ),
        "IgnoreCheckIDs": decode.ListOf(decode.Str),
        "OnlyPassing": decode.Bool,
        "Near": decode.Str,
        "Tags": decode.ListOf(decode.Str),
        "NodeMeta": decode.MapOf(decode.Str),
        "ServiceMeta": decode.MapOf(decode.Str),
        "Connect": decode.Struct({"Enabled": decode.Bool}),
    }
)
QUERY = decode.Struct(
    {
        "ID": decode.Str,
        "Name": decode.Str,
        "Session": decode.Str,
        "Token": decode.Str,
        "Service": SERVICE,
        "DNS": decode.Struct({"TTL": decode.Str}),
        "Template": decode.Struct(
            {"Type": decode.Str, "Regexp": decode.Str, "RemoveEmptyTags": decode.Bool}
        ),
    }
)


# --- shapes ------------------------------------------------------------------------------


def _service_shape(svc: dict[str, Any]) -> dict[str, Any]:
    failover = svc.get("Failover") or {}
    return {
        "Service": svc.get("Service", ""),
        "Failover": {
            "NearestN": failover.get("NearestN", 0),
            "Datacenters": failover.get("Datacenters") or None,
        },
        "IgnoreCheckIDs": svc.get("IgnoreCheckIDs") or None,
        "OnlyPassing": bool(svc.get("OnlyPassing")),
        "Near": svc.get("Near", ""),
        "Tags": svc.get("Tags") or None,
        "NodeMeta": svc.get("NodeMeta") or None,
        "ServiceMeta": svc.get("ServiceMeta") or None,
        "Connect": {"Enabled": bool((svc.get("Connect") or {}).get("Enabled"))},
    }


def query_json(q: PreparedQuery, *, show_token: bool = False, service: dict | None = None) -> dict:
    """A query as Consul shows it (`Token` hidden unless `show_token`)."""
    d = q.definition
    template = d.get("Template") or {}
    token = ""
    if q.token_accessor:
        token = q.token_accessor if show_token else HIDDEN
    return {
        "ID": q.id,
        "Name": q.name,
        "Session": q.session_id or "",
        "Token": token,
        "Template": {
            "Type": template.get("Type", ""),
            "Regexp": template.get("Regexp", ""),
            "RemoveEmptyTags": bool(template.get("RemoveEmptyTags")),
        },
        "Service": _service_shape(service if service is not None else d.get("Service") or {}),
        "DNS": {"TTL": (d.get("DNS") or {}).get("TTL", "")},
        "CreateIndex": q.create_index,
        "ModifyIndex": q.modify_index,
    }


# --- templates -------------------------------------------------------------------------------


def _compile(regexp: str):
    try:
        return re2.compile(regexp, _RE2)
    except re2.error as exc:
        raise BadRequest(f"Invalid Template.Regexp {regexp!r}: {exc}") from None


def _interpolate(text: str, env: dict[str, str], groups: list[str]) -> str:
    if "${" not in text:
        return text
    if text.count("${") != len(_VAR.findall(text)):
        raise BadRequest(f"Bad template: unclosed '${{' in {text!r}")

    def one(m: re.Match) -> str:
        var = m.group(1).strip()
        if var in env:
            return env[var]
        n = _MATCH.match(var)
        if n:
            i = int(n.group(1))
            return groups[i] if i < len(groups) else ""
        raise BadRequest(f"Bad template: unknown variable '{var}' in {text!r}")

    return _VAR.sub(one, text)


def _walk(value: Any, env: dict[str, str], groups: list[str]) -> Any:
    if isinstance(value, str):
        return _interpolate(value, env, groups)
    if isinstance(value, list):
        return [_walk(v, env, groups) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, env, groups) for k, v in value.items()}
    return value


def render(q: PreparedQuery, full_name: str) -> dict[str, Any]:
    """The query's `Service` for `full_name`: interpolated when the query is a template."""
    d = q.definition
    svc = dict(d.get("Service") or {})
    template = d.get("Template") or {}
    if not template.get("Type"):
        return svc
    groups: list[str] = []
    if template.get("Regexp"):
        m = _compile(template["Regexp"]).search(full_name)
        if m is not None:
            groups = [g or "" for g in (m.group(0), *m.groups())]
    env = {
        "name.full": full_name,
        "name.prefix": q.name,
        "name.suffix": full_name[len(q.name) :] if full_name.startswith(q.name) else "",
        "agent.segment": "",
    }
    out = _walk(svc, env, groups)
    if template.get("RemoveEmptyTags") and out.get("Tags"):
        out["Tags"] = [t for t in out["Tags"] if t]
    return out


# --- writes ------------------------------------------------------------------------------------


def parse(body: Any) -> dict[str, Any]:
    """A query definition from a request body, checked; 400 naming what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("Request decode failed: a prepared query is a JSON object")
    spec = QUERY(body)
    svc = spec.get("Service") or {}
    template = spec.get("Template") or {}
    name = spec.get("Name", "")
    if template:
        kind = template.get("Type", "")
        if kind not in TEMPLATE_TYPES:
            raise BadRequest(f"Bad Template.Type '{kind}'")
        if template.get("Regexp"):
            _compile(template["Regexp"])
    elif template.get("Regexp"):
        raise BadRequest("Template.Regexp needs a Template.Type")
    if not svc.get("Service"):
        raise BadRequest("Must provide a Service name to query")
    if _UUID.match(name):
        raise BadRequest("Query names cannot be UUIDs")
    ttl = (spec.get("DNS") or {}).get("TTL", "")
    if ttl:
        try:
            if parse_duration(ttl) < 0:
                raise ValueError
        except ValueError:
            raise BadRequest(f"Bad DNS TTL '{ttl}'") from None
    near = svc.get("Near", "")
    if near.startswith("_") and near != "_agent":
        raise BadRequest(f"Bad Near '{near}': a node name or _agent")
    if template:
        # Render once now so that a bad interpolation is refused, not found at run time.
        probe = PreparedQuery(name=name, definition={"Service": svc, "Template": template})
        render(probe, name + "probe")
    return spec


def _apply(q: PreparedQuery, spec: dict[str, Any], change: Change) -> None:
    name = spec.get("Name", "")
    if name:
        clash = PreparedQuery.objects.filter(name=name).exclude(id=q.id).exists()
        if clash:
            raise BadRequest(f"name '{name}' aliases an existing query name")
    session_id = (spec.get("Session") or "").lower()
    if session_id and not Session.objects.filter(id=session_id).exists():
        raise BadRequest(f"invalid session '{session_id}'")
    token = spec.get("Token", "")
    q.token_accessor = ""
    if token and token != HIDDEN:
        try:
            q.token_accessor = acl.get_token_by_secret(token).accessor_id
        except Exception:  # unknown token: refused like Consul ("ACL not found")
            raise BadRequest("Invalid Token: ACL not found") from None
    q.name = name
    q.session_id = session_id or None
    q.definition = {k: spec[k] for k in ("Service", "DNS", "Template") if spec.get(k)}
    q.modify_index = change.index
    q.save()
    change.touch(topic.QUERIES)
    change.audit("query.write", "query", q.id, None, query_json(q))


def create(spec: dict[str, Any]) -> PreparedQuery:
    with Change() as change:
        q = PreparedQuery(id=str(uuid.uuid4()), create_index=change.index)
        _apply(q, spec, change)
        return q


def update(query_id: str, spec: dict[str, Any]) -> PreparedQuery:
    with Change() as change:
        q = PreparedQuery.objects.select_for_update().filter(id=query_id).first()
        if q is None:
            raise NotFound(f"Query '{query_id}' not found")
        if spec.get("Token") == HIDDEN:
            spec = {**spec, "Token": ""}
            keep = q.token_accessor
            _apply(q, spec, change)
            if keep:
                q.token_accessor = keep
                q.save(update_fields=["token_accessor"])
        else:
            _apply(q, spec, change)
        return q


def delete(query_id: str) -> None:
    with Change() as change:
        q = PreparedQuery.objects.filter(id=query_id).first()
        if q is None:
            raise NotFound(f"Query '{query_id}' not found")
        change.audit("query.delete", "query", q.id, query_json(q), None)
        q.delete()
        change.touch(topic.QUERIES)


# --- reads ------------------------------------------------------------------------------------


def get(query_id: str) -> PreparedQuery:
    q = PreparedQuery.objects.filter(id=query_id).first()
    if q is None:
        raise NotFound(f"Query '{query_id}' not found")
    return q


def list_all() -> list[PreparedQuery]:
    return list(PreparedQuery.objects.order_by("name", "id"))


def queries_index() -> int:
    return max(topic_index(topic.QUERIES), 1)


def resolve(id_or_name: str) -> PreparedQuery:
    """By ID, else by exact name, else the template whose name is the longest prefix."""
    q = (
        PreparedQuery.objects.filter(id=id_or_name.lower()).first()
        if _UUID.match(id_or_name)
        else None
    )
    if q is not None:
        return q
    q = PreparedQuery.objects.filter(name=id_or_name).first()
    if q is not None:
        return q
    best = None
    for t in PreparedQuery.objects.order_by("name"):
        is_template = bool((t.definition.get("Template") or {}).get("Type"))
        if (
            is_template
            and id_or_name.startswith(t.name)
            and (best is None or len(t.name) > len(best.name))
        ):
            best = t
    if best is None:
        raise NotFound(f"Query '{id_or_name}' not found")
    return best


# --- execution --------------------------------------------------------------------------------


def _tags_ok(tags: list[str], wanted: list[str]) -> bool:
    have = {t.lower() for t in tags}
    for w in wanted:
        if w.startswith("!"):
            if w[1:].lower() in have:
                return False
        elif w.lower() not in have:
            return False
    return True


def _healthy(checks: list[dict], only_passing: bool, ignore: set[str]) -> bool:
    statuses = [c["Status"] for c in checks if c["CheckID"] not in ignore]
    if only_passing:
        return all(s == Check.PASSING for s in statuses)
    return all(s != Check.CRITICAL for s in statuses)


def instances(authz, svc: dict[str, Any], dc: str) -> list[dict[str, Any]]:
    """The instances `svc` selects in `dc`, as `/v1/health/service` shows them."""
    _, found = reads.health_service(
        authz,
        svc.get("Service", ""),
        dc,
        connect=bool((svc.get("Connect") or {}).get("Enabled")),
        node_meta=svc.get("NodeMeta") or None,
    )
    tags = svc.get("Tags") or []
    meta = svc.get("ServiceMeta") or {}
    ignore = set(svc.get("IgnoreCheckIDs") or ())
    return [
        e
        for e in found
        if _tags_ok(e["Service"]["Tags"] or [], tags)
        and reads.meta_match(e["Service"]["Meta"], meta)
        and _healthy(e["Checks"], bool(svc.get("OnlyPassing")), ignore)
    ]


def failover_order(svc: dict[str, Any], local: str) -> list[str]:
    """Where to look after `local`: the NearestN nearest, then the listed datacenters."""
    known = reads.datacenters()
    failover = svc.get("Failover") or {}
    order: list[str] = []
    n = int(failover.get("NearestN") or 0)
    if n:
        order += coordinates.ranked_datacenters(local, known)[:n]
    for dc in failover.get("Datacenters") or []:
        if dc in known and dc != local and dc not in order:
            order.append(dc)
    return order


def runner_authz(q: PreparedQuery, caller_authz):
    """Whose permissions filter the results: the query's token, else the caller's."""
    if not q.token_accessor or not settings.MESH_ACL_ENABLED:
        return caller_authz
    from registry.models import ACLToken

    token = ACLToken.objects.filter(accessor_id=q.token_accessor).first()
    if token is None or acl._expired(token):
        return acl.default_authorizer()
    return acl.token_authorizer(token)


def execute(
    caller_authz,
    id_or_name: str,
    *,
    dc: str | None = None,
    near: str = "",
    limit: int = 0,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """Run a query: Consul's `PreparedQueryExecuteResponse`."""
    q = resolve(id_or_name)
    svc = render(q, id_or_name)
    authz = runner_authz(q, caller_authz)
    local = dc or settings.MESH_DC
    tried = [local, *failover_order(svc, local)]
    found: list[dict[str, Any]] = []
    served, failovers = local, 0
    for i, where in enumerate(tried):
        found = instances(authz, svc, where)
        served, failovers = where, i
        if found:
            break
    near = near or svc.get("Near", "")
    if near:
        found = coordinates.sort_near(near, found, lambda e: e["Node"]["Node"])
    else:
        (rng or random).shuffle(found)
    if limit:
        found = found[:limit]
    return {
        "Service": svc.get("Service", ""),
        "Namespace": "default",
        "Nodes": found,
        "DNS": {"TTL": (q.definition.get("DNS") or {}).get("TTL", "")},
        "Datacenter": served if found else local,
        "Failovers": failovers,
    }


def explain(id_or_name: str) -> dict[str, Any]:
    """The query that would run for `id_or_name` (templates rendered)."""
    q = resolve(id_or_name)
    return {"Query": query_json(q, service=render(q, id_or_name))}
