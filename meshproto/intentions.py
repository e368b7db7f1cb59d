"""Intentions: who may call whom, decided the same way by the control plane
and by every sidecar (pure, Django-free).

An intention says `source -> destination: allow | deny`, or carries L7
`Permissions` (HTTP path / method / header rules, each allow or deny)
instead of an action. Names are exact or the whole-name wildcard `*`;
namespaces likewise (`*/*` is allowed, `*/web` is not).

Precedence is Consul's table: the more exact the destination, then the
more exact the source, the earlier an intention is considered.

    source ns / name      destination ns / name    precedence
    exact / exact         exact / exact            9
    exact / *             exact / exact            8
    *     / *             exact / exact            7
    exact / exact         exact / *                6
    exact / *             exact / *                5
    *     / *             exact / *                4
    exact / exact         *     / *                3
    exact / *             *     / *                2
    *     / *             *     / *                1

For one (source, destination) pair at most one intention can match at each
precedence (the four names of an intention are unique), so "the first match
in precedence order decides" is the whole rule: Consul's "deny wins ties"
never has a tie to break for a decision. Listings order ties as Consul does
(by source ns, source, destination ns, destination).

With no matching intention the answer is the default, which is **deny**
unless the caller passes `default_allow=True` (the `mesh` config entry's
`AllowByDefault`, meant for development clusters only).

`IntentionIndex` answers `decide()` with at most nine dictionary probes,
whatever the number of intentions: it never scans.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

WILDCARD = "*"
DEFAULT_NAMESPACE = "default"
ACTIONS = ("allow", "deny")
SOURCE_TYPES = ("consul",)
# Go's net/http method names: what Consul accepts in HTTP.Methods.
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"}
)
HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc"})
MAX_DESCRIPTION = 512  # Consul's metaValueMaxLength
MAX_META_PAIRS = 64
MAX_META_KEY = 128
MAX_META_VALUE = 512
MAX_NAME = 256  # the storage column's size


class IntentionError(ValueError):
    """Invalid intention input; the message names the field (shown as a 400)."""


# --------------------------------------------------------------------------- names


def count_exact(namespace: str, name: str) -> int:
    """How many of (namespace, name) are exact: 2, 1 (`ns/*`) or 0 (`*/*`)."""
    if namespace == WILDCARD:
        return 0
    if name == WILDCARD:
        return 1
    return 2


def precedence(source_ns: str, source_name: str, destination_ns: str, destination_name: str) -> int:
    """Consul's precedence (9 = exact to exact ... 1 = `*/*` to `*/*`)."""
    top = (3, 6, 9)[count_exact(destination_ns, destination_name)]
    return top - (2 - count_exact(source_ns, source_name))


def check_name(namespace: str, name: str, what: str) -> None:
    """Refuse empty names, partial wildcards and an exact name in a wildcard namespace."""
    if not isinstance(name, str) or not name:
        raise IntentionError(f"{what}Name is required")
    if not isinstance(namespace, str) or not namespace:
        raise IntentionError(f"{what}NS is required")
    if namespace != WILDCARD and WILDCARD in namespace:
        raise IntentionError(
            f"{what}NS: wildcard character '*' cannot be used with partial values ({namespace!r})"
        )
    if name != WILDCARD:
        if WILDCARD in name:
            raise IntentionError(
                f"{what}Name: wildcard character '*' cannot be used with partial values ({name!r})"
            )
        if namespace == WILDCARD:
            raise IntentionError(f"{what}Name: exact value cannot follow wildcard namespace")
    for label, value in ((f"{what}Name", name), (f"{what}NS", namespace)):
        if len(value) > MAX_NAME:
            raise IntentionError(f"{label} exceeds maximum length {MAX_NAME}")
        if any(ord(c) < 0x20 or c in "/ " for c in value):
            raise IntentionError(
                f"{label} {value!r} must not contain '/', spaces or control characters"
            )


def display_name(namespace: str, name: str, peer: str = "") -> str:
    """A service as Consul prints it: the bare name in the default namespace,
    `peer:<peer>/<name>` for a source in a peered cluster."""
    shown = name if namespace == DEFAULT_NAMESPACE else f"{namespace}/{name}"
    return f"peer:{peer}/{shown}" if peer else shown


_PEER = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_peer(peer: str) -> None:
    """A `SourcePeer`: a peering's name (a DNS label), or "" for this cluster."""
    if not isinstance(peer, str):
        raise IntentionError("SourcePeer must be a string")
    if peer and not _PEER.match(peer):
        raise IntentionError(f"SourcePeer {peer!r} is not a valid peer name")


# --------------------------------------------------------------------------- L7 permissions


def _fold(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _fields(raw: Any, path: str, known: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object's fields under their canonical names; unknown fields refused.

    Matching is Consul's (case-insensitive, snake_case accepted)."""
    if not isinstance(raw, Mapping):
        raise IntentionError(f"{path} must be an object")
    by_fold = {_fold(k): k for k in known}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = by_fold.get(_fold(str(key)))
        if name is None:
            raise IntentionError(f"{path}: unknown field {key!r} (known: {', '.join(known)})")
        if name in out:
            raise IntentionError(f"{path}: field {name} given twice")
        out[name] = value
    return out


def _str(value: Any, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise IntentionError(f"{path} must be a string")
    return value


def _bool(value: Any, path: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise IntentionError(f"{path} must be a boolean")
    return value


def _regex(value: str, path: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as exc:
        raise IntentionError(f"{path} is not a valid regular expression: {exc}") from None


@dataclass(frozen=True)
class HeaderMatch:
    """One header condition of an L7 permission (exactly one kind of match)."""

    name: str
    present: bool = False
    exact: str = ""
    prefix: str = ""
    suffix: str = ""
    regex: str = ""
    invert: bool = False
    # Compiled once: the request path must not compile regexes.
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, headers: Mapping[str, str]) -> bool:
        value = headers.get(self.name)
        if value is None:
            # Envoy's rule: a missing header matches nothing, except "not present".
            return self.present and self.invert
        if self.present:
            hit = True
        elif self.exact:
            hit = value == self.exact
        elif self.prefix:
            hit = value.startswith(self.prefix)
        elif self.suffix:
            hit = value.endswith(self.suffix)
        else:
            hit = self.pattern is not None and self.pattern.fullmatch(value) is not None
        return hit != self.invert

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Name": self.name}
        if self.present:
            out["Present"] = True
        for key, value in (
            ("Exact", self.exact),
            ("Prefix", self.prefix),
            ("Suffix", self.suffix),
            ("Regex", self.regex),
        ):
            if value:
                out[key] = value
        if self.invert:
            out["Invert"] = True
        return out


@dataclass(frozen=True)
class HTTPMatch:
    """The HTTP conditions of one permission; all given conditions must hold."""

    path_exact: str = ""
    path_prefix: str = ""
    path_regex: str = ""
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()
    path_pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)
    method_set: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def matches(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        if self.path_exact and path != self.path_exact:
            return False
        if self.path_prefix and not path.startswith(self.path_prefix):
            return False
        if self.path_pattern is not None and self.path_pattern.fullmatch(path) is None:
            return False
        if self.method_set and method.upper() not in self.method_set:
            return False
        return all(h.matches(headers) for h in self.headers)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.path_exact:
            out["PathExact"] = self.path_exact
        if self.path_prefix:
            out["PathPrefix"] = self.path_prefix
        if self.path_regex:
            out["PathRegex"] = self.path_regex
        if self.headers:
            out["Header"] = [h.to_json() for h in self.headers]
        if self.methods:
            out["Methods"] = list(self.methods)
        return out


@dataclass(frozen=True)
class Permission:
    """One L7 rule: if `http` matches the request, `action` decides it."""

    action: str
    http: HTTPMatch

    def to_json(self) -> dict[str, Any]:
        return {"Action": self.action, "HTTP": self.http.to_json()}


_PERMISSION_FIELDS = ("Action", "HTTP")
_HTTP_FIELDS = ("PathExact", "PathPrefix", "PathRegex", "Header", "Methods")
_HEADER_FIELDS = ("Name", "Present", "Exact", "Prefix", "Suffix", "Regex", "Invert")


def _parse_header(raw: Any, path: str) -> HeaderMatch:
    f = _fields(raw, path, _HEADER_FIELDS)
    name = _str(f.get("Name"), f"{path}.Name")
    if not name:
        raise IntentionError(f"{path} missing required Name field")
    present = _bool(f.get("Present"), f"{path}.Present")
    exact = _str(f.get("Exact"), f"{path}.Exact")
    prefix = _str(f.get("Prefix"), f"{path}.Prefix")
    suffix = _str(f.get("Suffix"), f"{path}.Suffix")
    regex = _str(f.get("Regex"), f"{path}.Regex")
    invert = _bool(f.get("Invert"), f"{path}.Invert")
    if sum(bool(x) for x in (present, exact, prefix, suffix, regex)) != 1:
        raise IntentionError(
            f"{path} should only contain one of Present, Exact, Prefix, Suffix, or Regex"
        )
    pattern = _regex(regex, f"{path}.Regex") if regex else None
    # Header names are case-insensitive: keep them lowercase, as requests are normalised.
    return HeaderMatch(name.lower(), present, exact, prefix, suffix, regex, invert, pattern)


def _parse_http(raw: Any, path: str) -> HTTPMatch:
    f = _fields(raw, path, _HTTP_FIELDS)
    path_exact = _str(f.get("PathExact"), f"{path}.PathExact")
    path_prefix = _str(f.get("PathPrefix"), f"{path}.PathPrefix")
    path_regex = _str(f.get("PathRegex"), f"{path}.PathRegex")
    if sum(bool(x) for x in (path_exact, path_prefix, path_regex)) > 1:
        raise IntentionError(
            f"{path} should only contain at most one of PathExact, PathPrefix, or PathRegex"
        )
    for label, value in (("PathExact", path_exact), ("PathPrefix", path_prefix)):
        if value and not value.startswith("/"):
            raise IntentionError(f"{path}.{label} doesn't start with '/': {value!r}")
    pattern = _regex(path_regex, f"{path}.PathRegex") if path_regex else None
    raw_headers = f.get("Header")
    if raw_headers is not None and not isinstance(raw_headers, list):
        raise IntentionError(f"{path}.Header must be a list")
    headers = tuple(
        _parse_header(h, f"{path}.Header[{i}]") for i, h in enumerate(raw_headers or [])
    )
    raw_methods = f.get("Methods")
    if raw_methods is not None and not isinstance(raw_methods, list):
        raise IntentionError(f"{path}.Methods must be a list")
    methods: list[str] = []
    for m in raw_methods or []:
        if not isinstance(m, str):
            raise IntentionError(f"{path}.Methods must be a list of strings")
        upper = m.upper()
        if upper not in HTTP_METHODS:
            raise IntentionError(f"{path}.Methods contains an invalid method {m!r}")
        if upper in methods:
            raise IntentionError(f"{path}.Methods contains {upper!r} more than once")
        methods.append(upper)
    if not (path_exact or path_prefix or path_regex or headers or methods):
        raise IntentionError(f"{path} should not be empty")
    return HTTPMatch(
        path_exact,
        path_prefix,
        path_regex,
        tuple(methods),
        headers,
        pattern,
        frozenset(methods),
    )


def parse_permissions(raw: Any, path: str = "Permissions") -> tuple[Permission, ...]:
    """Validate Consul-shaped `Permissions` JSON into permissions (IntentionError if bad)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise IntentionError(f"{path} must be a list")
    out = []
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        f = _fields(item, where, _PERMISSION_FIELDS)
        action = f.get("Action")
        if action not in ACTIONS:
            raise IntentionError(f"{where}.Action must be set to 'allow' or 'deny'")
        if f.get("HTTP") is None:
            raise IntentionError(f"{where}.HTTP is required")
        out.append(Permission(action, _parse_http(f["HTTP"], f"{where}.HTTP")))
    return tuple(out)


def permissions_json(permissions: Iterable[Permission]) -> list[dict[str, Any]]:
    """Permissions in Consul's canonical JSON (empty fields omitted)."""
    return [p.to_json() for p in permissions]


def evaluate_l7(
    permissions: Iterable[Permission], method: str, path: str, headers: Mapping[str, str]
) -> bool | None:
    """The first permission matching the request decides: True (allow) or False
    (deny); None when none matches (the caller then applies the default).

    `path` may carry a query string (ignored, as Envoy's path matchers do);
    header names are matched case-insensitively.
    """
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    lowered = {k.lower(): v for k, v in headers.items()} if headers else {}
    for permission in permissions:
        if permission.http.matches(method, path, lowered):
            return permission.action == "allow"
    return None


# --------------------------------------------------------------------------- intentions


@dataclass(frozen=True)
class Intention:
    """What the decision needs of one intention (storage keeps the rest)."""

    source_name: str
    destination_name: str
    action: str = ""  # allow | deny | "" when `permissions` are given (L7)
    permissions: tuple[Permission, ...] = ()
    id: str = ""
    source_ns: str = DEFAULT_NAMESPACE
    destination_ns: str = DEFAULT_NAMESPACE
    source_type: str = "consul"
    # The peering the source is in ("" : this cluster). A peer's services match
    # only intentions naming that peer; a `*` source here never covers them.
    source_peer: str = ""
    precedence: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "precedence",
            precedence(
                self.source_ns, self.source_name, self.destination_ns, self.destination_name
            ),
        )

    @property
    def is_l7(self) -> bool:
        return bool(self.permissions)

    def __str__(self) -> str:
        """Consul's rendering: `web => db (ID: ..., Precedence: 9, Action: ALLOW)`."""
        id_part = f"ID: {self.id}, " if self.id else ""
        detail = (
            f"Permissions: {len(self.permissions)}"
            if self.permissions
            else f"Action: {self.action.upper()}"
        )
        return (
            f"{display_name(self.source_ns, self.source_name, self.source_peer)} => "
            f"{display_name(self.destination_ns, self.destination_name)} "
            f"({id_part}Precedence: {self.precedence}, {detail})"
        )


def validate(
    *,
    source_name: str,
    destination_name: str,
    action: str = "",
    permissions: Any = None,
    source_ns: str = DEFAULT_NAMESPACE,
    destination_ns: str = DEFAULT_NAMESPACE,
    source_type: str = "consul",
    id: str = "",
    description: str = "",
    meta: Any = None,
    source_peer: str = "",
) -> Intention:
    """Check one intention as Consul does and return it (IntentionError if bad).

    Whether the destination speaks HTTP (needed for permissions) is the
    caller's check: it depends on config entries, not on the intention.
    """
    check_name(source_ns, source_name, "Source")
    check_name(destination_ns, destination_name, "Destination")
    check_peer(source_peer)
    perms = parse_permissions(permissions)
    if perms:
        if action:
            raise IntentionError("Action must be omitted if Permissions are specified")
        if destination_name == WILDCARD:
            raise IntentionError(
                "Permissions cannot be specified on intentions with wildcarded destinations"
            )
    elif action not in ACTIONS:
        shown = f" (got {action!r})" if action else ""
        raise IntentionError(f"Action must be set to 'allow' or 'deny'{shown}")
    if source_type not in SOURCE_TYPES:
        raise IntentionError(f"SourceType must be set to 'consul' (got {source_type!r})")
    if not isinstance(description, str):
        raise IntentionError("Description must be a string")
    if len(description) > MAX_DESCRIPTION:
        raise IntentionError(f"Description exceeds maximum length {MAX_DESCRIPTION}")
    check_meta(meta)
    return Intention(
        source_name=source_name,
        destination_name=destination_name,
        action=action if not perms else "",
        permissions=perms,
        id=id,
        source_ns=source_ns,
        destination_ns=destination_ns,
        source_type=source_type,
        source_peer=source_peer,
    )


def from_consul_json(
    raw: Any, *, destination_name: str = "", destination_ns: str = DEFAULT_NAMESPACE
) -> Intention:
    """One intention from Consul's JSON shape (a `/v1/connect/intentions` item, or
    an item of a proxy config's `intentions`), validated as `validate` does.

    Only what a decision needs is read (names, namespaces, Action, Permissions,
    ID, SourceType); display fields (Meta, Precedence, Hash, indexes, times) are
    ignored. A missing DestinationName/DestinationNS takes the given default, so
    a list already scoped to one destination may leave it out.
    """
    if not isinstance(raw, Mapping):
        raise IntentionError("an intention must be a JSON object")

    def text(key: str, default: str) -> str:
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise IntentionError(f"{key} must be a string")
        return value

    return validate(
        source_name=text("SourceName", ""),
        destination_name=text("DestinationName", destination_name),
        action=text("Action", ""),
        permissions=raw.get("Permissions"),
        source_ns=text("SourceNS", DEFAULT_NAMESPACE),
        destination_ns=text("DestinationNS", destination_ns),
        source_type=text("SourceType", "consul"),
        id=text("ID", ""),
        source_peer=text("SourcePeer", ""),
    )


def check_meta(meta: Any, what: str = "Meta") -> None:
    """Consul's limits on intention metadata (64 pairs, keys 128, values 512)."""
    if meta is None:
        return
    if not isinstance(meta, Mapping):
        raise IntentionError(f"{what} must be an object of strings")
    if len(meta) > MAX_META_PAIRS:
        raise IntentionError(f"{what} exceeds maximum element count {MAX_META_PAIRS}")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise IntentionError(f"{what} value for key {k!r} must be a string")
        if len(k) > MAX_META_KEY:
            raise IntentionError(f"{what} key {k!r} exceeds maximum length {MAX_META_KEY}")
        if len(v) > MAX_META_VALUE:
            raise IntentionError(
                f"{what} value for key {k!r} exceeds maximum length {MAX_META_VALUE}"
            )


def sort_key(ix: Intention) -> tuple:
    """Consul's listing order: precedence, then the four names."""
    return (
        -ix.precedence,
        ix.source_peer,
        ix.source_ns,
        ix.source_name,
        ix.destination_ns,
        ix.destination_name,
    )


def matches_source(ix: Intention, namespace: str, name: str, peer: str = "") -> bool:
    """Whether `ix`'s source covers the service `namespace/name` (of `peer`)."""
    if ix.source_peer != peer:
        return False
    if ix.source_ns == WILDCARD:
        return True
    return ix.source_ns == namespace and ix.source_name in (WILDCARD, name)


def matches_destination(ix: Intention, namespace: str, name: str) -> bool:
    """Whether `ix`'s destination covers the service `namespace/name`."""
    if ix.destination_ns == WILDCARD:
        return True
    return ix.destination_ns == namespace and ix.destination_name in (WILDCARD, name)


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """The answer for one source -> destination (and, for L7, one request).

    `allowed` is the L4 answer: an L7 intention counts as deny there, as in
    Consul's check and authorize, and `has_l7` tells a proxy to evaluate each
    request with `IntentionIndex.decide_request`.
    """

    allowed: bool
    intention_id: str | None
    reason: str
    precedence: int = 0
    has_l7: bool = False
    default: bool = False
    intention: Intention | None = field(default=None, compare=False, repr=False)


def default_reason(source: str, destination: str, default_allow: bool) -> str:
    if default_allow:
        return (
            f"DEFAULT ALLOW: no intention matches {source} => {destination}, and the mesh "
            "config entry sets AllowByDefault, so every connection no intention denies is "
            "allowed. Meant for development clusters only."
        )
    return (
        f"Default behavior: deny. No intention matches {source} => {destination}, and "
        "meshweb denies by default."
    )


class IntentionIndex:
    """Intentions indexed for decisions, built once from a list.

    Intentions are keyed by destination (ns, name) — which may be `(ns, *)`
    or `(*, *)` — then by source (ns, name) likewise. A decision probes the
    destination's three keys from most to least exact and, in each, the
    source's three keys: the first hit is the highest-precedence match.
    """

    __slots__ = ("_by_destination", "default_allow", "_all")

    def __init__(self, intentions: Iterable[Intention], *, default_allow: bool = False) -> None:
        self.default_allow = default_allow
        self._by_destination: dict[tuple[str, str], dict[tuple[str, ...], Intention]] = {}
        self._all: list[Intention] = []
        for ix in intentions:
            bucket = self._by_destination.setdefault((ix.destination_ns, ix.destination_name), {})
            # Sources of this cluster keyed (ns, name); a peer's (ns, name, peer).
            key: tuple[str, ...] = (ix.source_ns, ix.source_name)
            if ix.source_peer:
                key = (*key, ix.source_peer)
            if key in bucket:
                raise IntentionError(
                    f"duplicate intention {display_name(ix.source_ns, ix.source_name, ix.source_peer)} => "
                    f"{display_name(ix.destination_ns, ix.destination_name)}"
                )
            bucket[key] = ix
            self._all.append(ix)
        self._all.sort(key=sort_key)

    def __len__(self) -> int:
        return len(self._all)

    def find(
        self,
        source: str,
        destination: str,
        *,
        source_ns: str = DEFAULT_NAMESPACE,
        destination_ns: str = DEFAULT_NAMESPACE,
        source_peer: str = "",
    ) -> Intention | None:
        """The highest-precedence intention matching the pair, or None."""
        if source_peer:
            return self._find_peer(source, destination, source_ns, destination_ns, source_peer)
        buckets = self._by_destination
        for dkey in (
            (destination_ns, destination),
            (destination_ns, WILDCARD),
            (WILDCARD, WILDCARD),
        ):
            bucket = buckets.get(dkey)
            if bucket is None:
                continue
            ix = (
                bucket.get((source_ns, source))
                or bucket.get((source_ns, WILDCARD))
                or bucket.get((WILDCARD, WILDCARD))
            )
            if ix is not None:
                return ix
        return None

    def _find_peer(
        self, source: str, destination: str, source_ns: str, destination_ns: str, peer: str
    ) -> Intention | None:
        buckets = self._by_destination
        for dkey in (
            (destination_ns, destination),
            (destination_ns, WILDCARD),
            (WILDCARD, WILDCARD),
        ):
            bucket = buckets.get(dkey)
            if bucket is None:
                continue
            ix = (
                bucket.get((source_ns, source, peer))
                or bucket.get((source_ns, WILDCARD, peer))
                or bucket.get((WILDCARD, WILDCARD, peer))
            )
            if ix is not None:
                return ix
        return None

    def decide(
        self,
        source: str,
        destination: str,
        *,
        source_ns: str = DEFAULT_NAMESPACE,
        destination_ns: str = DEFAULT_NAMESPACE,
        source_peer: str = "",
    ) -> Decision:
        """The L4 decision for a connection from `source` (of `source_peer`,
        "" for this cluster) to `destination`."""
        ix = self.find(
            source,
            destination,
            source_ns=source_ns,
            destination_ns=destination_ns,
            source_peer=source_peer,
        )
        if ix is None:
            return Decision(
                self.default_allow and not source_peer,
                None,
                default_reason(
                    display_name(source_ns, source, source_peer),
                    display_name(destination_ns, destination),
                    self.default_allow and not source_peer,
                ),
                default=True,
            )
        if ix.permissions:
            return Decision(
                False,
                ix.id or None,
                f"Matched L7 intention: {ix}",
                ix.precedence,
                True,
                intention=ix,
            )
        return Decision(
            ix.action == "allow",
            ix.id or None,
            f"Matched L4 intention: {ix}",
            ix.precedence,
            intention=ix,
        )

    def decide_request(
        self,
        source: str,
        destination: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        source_ns: str = DEFAULT_NAMESPACE,
        destination_ns: str = DEFAULT_NAMESPACE,
        source_peer: str = "",
    ) -> Decision:
        """The decision for one HTTP request: L4 intentions decide as for a
        connection; an L7 intention's first matching permission decides, and a
        request no permission matches gets the default."""
        decision = self.decide(
            source,
            destination,
            source_ns=source_ns,
            destination_ns=destination_ns,
            source_peer=source_peer,
        )
        ix = decision.intention
        if ix is None or not ix.permissions:
            return decision
        verdict = evaluate_l7(ix.permissions, method, path, headers)
        if verdict is None:
            reason = (
                f"No permission of L7 intention {ix} matches {method} {path}; "
                + default_reason(
                    display_name(source_ns, source, source_peer),
                    display_name(destination_ns, destination),
                    self.default_allow and not source_peer,
                )
            )
            return Decision(
                self.default_allow and not source_peer,
                ix.id or None,
                reason,
                ix.precedence,
                True,
                True,
                ix,
            )
        word = "allows" if verdict else "denies"
        return Decision(
            verdict,
            ix.id or None,
            f"Matched L7 intention: {ix}; a permission {word} {method} {path}",
            ix.precedence,
            True,
            intention=ix,
        )

    def match_destination(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> list[Intention]:
        """Every intention whose destination covers `namespace/name`, in evaluation order."""
        out: list[Intention] = []
        keys = dict.fromkeys(((namespace, name), (namespace, WILDCARD), (WILDCARD, WILDCARD)))
        for dkey in keys:  # de-duplicated: `name` may itself be the wildcard
            bucket = self._by_destination.get(dkey)
            if bucket:
                out.extend(bucket.values())
        out.sort(key=sort_key)
        return out

    def match_source(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> list[Intention]:
        """Every intention whose source covers `namespace/name`, in evaluation order.

        Sources are not indexed (the hot path is by destination): this scans.
        """
        return [ix for ix in self._all if matches_source(ix, namespace, name)]

    def all(self) -> list[Intention]:
        """Every intention, in Consul's listing order."""
        return list(self._all)
