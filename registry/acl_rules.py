"""Consul ACL policy rules: parsing, merging and authorization decisions.

The registry speaks Consul's HTTP API, so tokens carry policies whose rules are
written in Consul's rule language (HCL or JSON).  This module parses those rules
and answers "may this token do X?" with the same results Consul's ``acl``
package gives:

* Rules for the same resource kind and the same exact name (or the same prefix)
  coming from several policies are merged first: ``deny`` beats everything,
  otherwise the more permissive of ``read`` < ``list`` < ``write`` wins.
* A lookup then prefers an exact rule for the name, else the longest matching
  prefix rule.  ``write`` grants ``list`` and ``read``; ``list`` grants ``read``.
* When no rule matches, the question is passed to the default authorizer (the
  agent's ``default_policy``), which is ``deny_all`` unless given.

Pure Python on purpose (no Django): it is used by request handlers and by tests.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import hcl2

from meshproto.registration.decode import DecodeError, parse_json

__all__ = [
    "Access",
    "Authorizer",
    "PolicyRules",
    "Rule",
    "RulesError",
    "merge_rules",
    "parse_rules",
]


class RulesError(ValueError):
    """Invalid rules text; message names the problem (shown as HTTP 400)."""


class Access(enum.IntEnum):
    """Access level of one rule, ordered as Consul orders them.

    ``DEFAULT`` means "no rule here": the decision is deferred to the next
    authorizer in the chain.  ``READ < LIST < WRITE`` so that a granted level
    covers every lower one; ``DENY`` is handled apart because it always wins.
    """

    DEFAULT = -1
    DENY = 0
    READ = 1
    LIST = 2
    WRITE = 3

    @classmethod
    def from_policy(cls, value: str) -> Access:
        """Map a policy string (case-insensitive, as Consul) to a level."""
        try:
            return _POLICY_NAMES[value.lower()]
        except (KeyError, AttributeError):
            raise ValueError(f"{value!r} is not a valid access level") from None

    def __str__(self) -> str:
        return "" if self is Access.DEFAULT else self.name.lower()


_POLICY_NAMES = {
    "deny": Access.DENY,
    "read": Access.READ,
    "list": Access.LIST,
    "write": Access.WRITE,
}


def _merge_access(a: Access, b: Access) -> Access:
    """Consul's takesPrecedenceOver: deny wins, else the more permissive level."""
    if a is Access.DENY or b is Access.DENY:
        return Access.DENY
    return max(a, b)


@dataclass(frozen=True)
class Rule:
    """One segmented rule: ``<resource> "<name>" { policy = ... }``.

    ``intentions`` is only meaningful for service rules; ``DEFAULT`` there means
    "not stated", and the effective level is derived from ``access`` later.
    """

    name: str
    access: Access
    intentions: Access = Access.DEFAULT


@dataclass(frozen=True)
class PolicyRules:
    """Parsed form of one policy's rules (or of several, once merged)."""

    services: tuple[Rule, ...] = ()
    service_prefixes: tuple[Rule, ...] = ()
    nodes: tuple[Rule, ...] = ()
    node_prefixes: tuple[Rule, ...] = ()
    keys: tuple[Rule, ...] = ()
    key_prefixes: tuple[Rule, ...] = ()
    sessions: tuple[Rule, ...] = ()
    session_prefixes: tuple[Rule, ...] = ()
    agents: tuple[Rule, ...] = ()
    agent_prefixes: tuple[Rule, ...] = ()
    events: tuple[Rule, ...] = ()
    event_prefixes: tuple[Rule, ...] = ()
    queries: tuple[Rule, ...] = ()
    query_prefixes: tuple[Rule, ...] = ()
    acl: Access = Access.DEFAULT
    operator: Access = Access.DEFAULT
    keyring: Access = Access.DEFAULT
    mesh: Access = Access.DEFAULT
    peering: Access = Access.DEFAULT


# resource keyword -> (PolicyRules field, whether "list" is a valid policy)
_SEGMENTED: dict[str, tuple[str, bool]] = {
    "service": ("services", False),
    "service_prefix": ("service_prefixes", False),
    "node": ("nodes", False),
    "node_prefix": ("node_prefixes", False),
    "key": ("keys", True),
    "key_prefix": ("key_prefixes", True),
    "session": ("sessions", False),
    "session_prefix": ("session_prefixes", False),
    "agent": ("agents", False),
    "agent_prefix": ("agent_prefixes", False),
    "event": ("events", False),
    "event_prefix": ("event_prefixes", False),
    "query": ("queries", False),
    "query_prefix": ("query_prefixes", False),
}
_SINGLE = ("acl", "operator", "keyring", "mesh", "peering")
_SEGMENTED_FIELDS = tuple(field for field, _ in _SEGMENTED.values())
# Bookkeeping keys python-hcl2 may add to its output; never rule content.
_HCL_META_KEYS = frozenset(
    {"__is_block__", "__comments__", "__inline_comments__", "__start_line__", "__end_line__"}
)


# --------------------------------------------------------------------------- parsing


def parse_rules(text: str) -> PolicyRules:
    """Parse rules as ``consul acl policy create -rules`` accepts (HCL or JSON).

    Empty (or comment-only) text means no rules.  Bad syntax and bad policy
    values raise :class:`RulesError` as in Consul; unknown resources and unknown
    block attributes are refused too (Consul ignores them), so typos surface
    instead of silently granting nothing.  One gap: python-hcl2 keeps the last
    of a repeated attribute (``operator`` twice), where recent Consul refuses.
    """
    if not isinstance(text, str):
        raise RulesError("ACL rules must be a string")
    if not text.strip():
        return PolicyRules()
    data, quoted = _load(text)
    return _build(data, quoted)


def _load(text: str) -> tuple[dict[str, Any], bool]:
    """Decode JSON or HCL; the flag says whether HCL strings still carry quotes."""
    try:
        data = parse_json(text)  # the registration decoder's: bounded depth, no NaN
    except DecodeError as exc:
        if text.lstrip().startswith(("{", "[")):
            raise RulesError(f"Failed to parse ACL rules: {exc.message}") from None
    else:
        if not isinstance(data, dict):
            raise RulesError(
                f"Failed to parse ACL rules: JSON rules must be an object, not {_kind(data)}"
            )
        return data, False
    return _load_hcl(text)


def _load_hcl(text: str) -> tuple[dict[str, Any], bool]:
    options_cls = getattr(hcl2, "SerializationOptions", None)
    kwargs: dict[str, Any] = {}
    quoted = False
    if options_cls is not None:
        # python-hcl2 8.x keeps quotes and comments unless told otherwise.
        known = {f.name for f in dataclasses.fields(options_cls)}
        wanted = {"strip_string_quotes": True, "with_comments": False, "preserve_heredocs": False}
        kwargs["serialization_options"] = options_cls(
            **{k: v for k, v in wanted.items() if k in known}
        )
        quoted = "strip_string_quotes" not in known
    try:
        data = hcl2.loads(text, **kwargs)
    except Exception as exc:  # lark raises many types; all mean "not valid HCL"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RulesError(f"Failed to parse ACL rules: {detail}") from None
    if not isinstance(data, dict):  # pragma: no cover - hcl2 always returns a dict
        raise RulesError("Failed to parse ACL rules: top level must be a body")
    return data, quoted


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


def _unquote(value: Any, quoted: bool) -> Any:
    if quoted and isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _build(data: dict[str, Any], quoted: bool) -> PolicyRules:
    segmented: dict[str, list[Rule]] = {field: [] for field in _SEGMENTED_FIELDS}
    single: dict[str, Access] = {}
    for resource, value in data.items():
        if resource in _HCL_META_KEYS:
            continue
        if resource in _SINGLE:
            single[resource] = _single_value(resource, _unquote(value, quoted))
        elif resource in _SEGMENTED:
            field, allow_list = _SEGMENTED[resource]
            for label, body in _blocks(resource, value):
                segmented[field].append(
                    _segment_rule(resource, _unquote(label, quoted), body, allow_list, quoted)
                )
        else:
            known = ", ".join(sorted([*_SEGMENTED, *_SINGLE]))
            raise RulesError(f"Unknown ACL resource {resource!r} (expected one of: {known})")
    return PolicyRules(**{k: tuple(v) for k, v in segmented.items()}, **single)


def _single_value(resource: str, value: Any) -> Access:
    if not isinstance(value, str):
        raise RulesError(
            f'Invalid {resource} policy: expected a string like {resource} = "read", '
            f"got {_kind(value)}"
        )
    return _access(value, f"Invalid {resource} policy {value!r}", allow_list=False)


def _access(value: Any, what: str, *, allow_list: bool) -> Access:
    allowed = "read, list, write or deny" if allow_list else "read, write or deny"
    if not isinstance(value, str):
        raise RulesError(f"{what}: must be one of {allowed}")
    try:
        access = Access.from_policy(value)
    except ValueError:
        raise RulesError(f"{what}: must be one of {allowed}") from None
    if access is Access.LIST and not allow_list:
        raise RulesError(f"{what}: must be one of {allowed}")
    return access


def _blocks(resource: str, value: Any) -> Iterator[tuple[Any, Any]]:
    """Yield (label, body) pairs from any shape HCL or JSON gives a resource.

    HCL blocks come back as a list of ``{label: body}`` dicts; JSON (and HCL
    object assignment) as one ``{label: body}`` dict, where a body may also be
    a list of bodies.
    """
    if isinstance(value, dict):
        if value.get("__is_block__") is True:
            raise RulesError(f'{resource} block needs a name label, e.g. {resource} "name" {{ }}')
        for label, body in value.items():
            if label in _HCL_META_KEYS:
                continue
            if isinstance(body, list):
                for item in body:
                    yield label, item
            else:
                yield label, body
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, dict):
                raise RulesError(f'{resource} must be a block like {resource} "name" {{ ... }}')
            yield from _blocks(resource, item)
    else:
        raise RulesError(
            f'{resource} must be a block like {resource} "name" {{ policy = "read" }}, '
            f"got {_kind(value)}"
        )


def _segment_rule(resource: str, label: Any, body: Any, allow_list: bool, quoted: bool) -> Rule:
    if not isinstance(label, str):
        raise RulesError(f"{resource} name must be a string, got {_kind(label)}")
    where = f"{resource} {json.dumps(label)}"
    if not isinstance(body, dict):
        raise RulesError(f'{where} must be a block like {{ policy = "read" }}, got {_kind(body)}')
    if any(isinstance(v, dict) and v.get("__is_block__") for v in body.values()):
        raise RulesError(f"{where}: a rule takes exactly one name label")
    fields = {k: _unquote(v, quoted) for k, v in body.items() if k not in _HCL_META_KEYS}
    allowed_fields = {"policy", "intentions"} if resource.startswith("service") else {"policy"}
    unknown = sorted(set(fields) - allowed_fields)
    if unknown:
        raise RulesError(f"{where}: unknown attribute {unknown[0]!r}")
    if "policy" not in fields:
        raise RulesError(f"{where} has no policy")
    access = _access(
        fields["policy"], f"Invalid {where} policy {fields['policy']!r}", allow_list=allow_list
    )
    intentions = Access.DEFAULT
    if "intentions" in fields:
        value = fields["intentions"]
        intentions = _access(value, f"Invalid {where} intentions {value!r}", allow_list=False)
    return Rule(label, access, intentions)


# --------------------------------------------------------------------------- merging


def merge_rules(rules: Iterable[PolicyRules]) -> PolicyRules:
    """Merge several policies into one, as Consul's ``MergePolicies`` does.

    Rules meet only when kind, exactness and name are all equal; an exact rule
    and a prefix rule for the same name stay separate (the exact one is then
    preferred at lookup time).  Duplicates inside one policy merge the same way.
    """
    segmented: dict[str, dict[str, Rule]] = {field: {} for field in _SEGMENTED_FIELDS}
    single = dict.fromkeys(_SINGLE, Access.DEFAULT)
    for policy in rules:
        for field in _SEGMENTED_FIELDS:
            merged = segmented[field]
            for rule in getattr(policy, field):
                old = merged.get(rule.name)
                if old is None:
                    merged[rule.name] = rule
                else:
                    merged[rule.name] = Rule(
                        rule.name,
                        _merge_access(old.access, rule.access),
                        _merge_access(old.intentions, rule.intentions),
                    )
        for name in _SINGLE:
            single[name] = _merge_access(single[name], getattr(policy, name))
    return PolicyRules(**{k: tuple(v.values()) for k, v in segmented.items()}, **single)


# --------------------------------------------------------------------------- lookups


def _enforce(rule: Access, need: Access) -> bool | None:
    """Decision of one rule for a needed level; ``None`` defers to the default."""
    if rule is Access.DEFAULT:
        return None
    if rule is Access.DENY:
        return False
    return rule >= need  # write covers list and read; list covers read


class _Node:
    __slots__ = ("children", "exact", "prefix", "all_write")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.exact = Access.DEFAULT
        self.prefix = Access.DEFAULT
        self.all_write = True  # every rule at or below this node grants write

    def has_rule(self) -> bool:
        return self.exact is not Access.DEFAULT or self.prefix is not Access.DEFAULT


class _RuleTrie:
    """Exact and prefix rules of one kind in a character trie.

    A lookup walks the name once, so it costs O(len(name)) whatever the number
    of rules, and the rules under a prefix form one subtree (for KeyWritePrefix).
    """

    __slots__ = ("_root", "_any_cache", "_all_cache")

    def __init__(self, exact: Iterable[tuple[str, Access]], prefix: Iterable[tuple[str, Access]]):
        self._root = _Node()
        self._any_cache: dict[Access, bool | None] = {}
        self._all_cache: dict[Access, bool | None] = {}
        for name, access in exact:
            self._node_for(name).exact = access
        for name, access in prefix:
            self._node_for(name).prefix = access
        self._compute_all_write()

    def _node_for(self, name: str) -> _Node:
        node = self._root
        for char in name:
            child = node.children.get(char)
            if child is None:
                child = node.children[char] = _Node()
            node = child
        return node

    def _nodes(self) -> Iterator[_Node]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _compute_all_write(self) -> None:
        # Pre-order list reversed visits children before parents (no recursion:
        # keys may be far longer than Python's recursion limit).
        for node in reversed(list(self._nodes())):
            node.all_write = (
                node.exact in (Access.DEFAULT, Access.WRITE)
                and node.prefix in (Access.DEFAULT, Access.WRITE)
                and all(child.all_write for child in node.children.values())
            )

    def lookup(self, name: str) -> Access:
        """Exact rule for ``name`` if any, else the longest matching prefix rule."""
        node = self._root
        best = Access.DEFAULT
        for char in name:
            if node.prefix is not Access.DEFAULT:
                best = node.prefix
            node = node.children.get(char)
            if node is None:
                return best
        if node.exact is not Access.DEFAULT:
            return node.exact
        if node.prefix is not Access.DEFAULT:
            return node.prefix
        return best

    def check(self, name: str, need: Access) -> bool | None:
        return _enforce(self.lookup(name), need)

    def write_prefix(self, prefix: str) -> bool | None:
        """Consul's KeyWritePrefix: write on the prefix and on every rule below it."""
        node: _Node | None = self._root
        base: bool | None = None
        for char in prefix:
            if node.prefix is not Access.DEFAULT:
                base = node.prefix is Access.WRITE
            node = node.children.get(char)
            if node is None:
                break
        if node is not None and node.prefix is not Access.DEFAULT:
            base = node.prefix is Access.WRITE
        if base is False:
            return False
        if node is not None and not node.all_write:
            return False
        return base

    def any_allowed(self, need: Access) -> bool | None:
        """Whether some rule grants ``need`` (Consul's anyAllowed)."""
        if need not in self._any_cache:
            decision = None
            if self._root.has_rule():
                decision = _enforce(self._root.prefix, need)
            if decision is not True:
                for node in self._nodes():
                    if _enforce(node.prefix, need) or _enforce(node.exact, need):
                        decision = True
                        break
            self._any_cache[need] = decision
        return self._any_cache[need]

    def all_allowed(self, need: Access) -> bool | None:
        """Whether every rule grants ``need`` (Consul's allAllowed)."""
        if need not in self._all_cache:
            decision = None
            if self._root.has_rule():
                decision = _enforce(self._root.prefix, need)
            if decision is not False:
                for node in self._nodes():
                    prefix_decision = _enforce(node.prefix, need)
                    leaf = prefix_decision
                    if prefix_decision is not False and node.exact is not Access.DEFAULT:
                        exact_decision = _enforce(node.exact, need)
                        leaf = prefix_decision if exact_decision is None else exact_decision
                    if leaf is False:
                        decision = False
                        break
            self._all_cache[need] = decision
        return self._all_cache[need]


def _pairs(rules: Iterable[Rule]) -> Iterator[tuple[str, Access]]:
    return ((rule.name, rule.access) for rule in rules)


def _intention_pairs(rules: Iterable[Rule]) -> Iterator[tuple[str, Access]]:
    # Consul: unstated intentions are read when the service policy is read or
    # write, and deny when the service policy is deny.
    for rule in rules:
        access = rule.intentions
        if access is Access.DEFAULT:
            access = Access.READ if rule.access in (Access.READ, Access.WRITE) else Access.DENY
        yield rule.name, access


class _Tables:
    """One merged policy, indexed for lookups."""

    __slots__ = (
        "service",
        "intention",
        "node",
        "key",
        "session",
        "agent",
        "event",
        "query",
        "acl",
        "operator",
        "keyring",
        "mesh",
        "peering",
    )

    def __init__(self, rules: PolicyRules) -> None:
        self.service = _RuleTrie(_pairs(rules.services), _pairs(rules.service_prefixes))
        self.intention = _RuleTrie(
            _intention_pairs(rules.services), _intention_pairs(rules.service_prefixes)
        )
        self.node = _RuleTrie(_pairs(rules.nodes), _pairs(rules.node_prefixes))
        self.key = _RuleTrie(_pairs(rules.keys), _pairs(rules.key_prefixes))
        self.session = _RuleTrie(_pairs(rules.sessions), _pairs(rules.session_prefixes))
        self.agent = _RuleTrie(_pairs(rules.agents), _pairs(rules.agent_prefixes))
        self.event = _RuleTrie(_pairs(rules.events), _pairs(rules.event_prefixes))
        self.query = _RuleTrie(_pairs(rules.queries), _pairs(rules.query_prefixes))
        self.acl = rules.acl
        self.operator = rules.operator
        self.keyring = rules.keyring
        self.mesh = rules.mesh
        self.peering = rules.peering

    def operator_scoped(self, own: Access, need: Access) -> bool | None:
        """Mesh and peering rules fall back to the operator rule when unset."""
        return _enforce(self.operator if own is Access.DEFAULT else own, need)


_Check = Callable[[_Tables], "bool | None"]


class Authorizer:
    """Answers authorization questions for one token.

    Built from the token's policies (``from_rules``) chained to a default
    authorizer, or one of the static authorizers Consul uses for
    ``default_policy`` and for global management.  Immutable once built.
    """

    __slots__ = ("_tables", "_default", "_allow", "_manage")

    def __init__(
        self,
        *,
        tables: _Tables | None = None,
        default: Authorizer | None = None,
        allow: bool = False,
        manage: bool = False,
    ) -> None:
        self._tables = tables
        self._default = default
        self._allow = allow
        self._manage = manage

    @classmethod
    def from_rules(
        cls, rules: Iterable[PolicyRules], default: Authorizer | None = None
    ) -> Authorizer:
        """Merge the policies and chain them to ``default`` (``deny_all`` if None)."""
        if default is None:
            default = _DENY_ALL
        return cls(tables=_Tables(merge_rules(rules)), default=default)

    @staticmethod
    def allow_all() -> Authorizer:
        """Consul's ``default_policy = "allow"``: everything but ACL management."""
        return _ALLOW_ALL

    @staticmethod
    def deny_all() -> Authorizer:
        """Consul's ``default_policy = "deny"``."""
        return _DENY_ALL

    @staticmethod
    def management() -> Authorizer:
        """A global-management token: everything allowed, ACLs included."""
        return _MANAGE_ALL

    def __repr__(self) -> str:
        if self._tables is not None:
            return f"<Authorizer rules, default={self._default!r}>"
        if self._manage:
            return "<Authorizer management>"
        return "<Authorizer allow_all>" if self._allow else "<Authorizer deny_all>"

    def _resolve(self, check: _Check, *, acl: bool = False) -> bool:
        """Ask each authorizer in the chain until one decides."""
        authz = self
        while authz._tables is not None:
            decision = check(authz._tables)
            if decision is not None:
                return decision
            authz = authz._default or _DENY_ALL
        return authz._manage if acl else authz._allow

    def is_management(self) -> bool:
        """True only for the global-management authorizer."""
        return self._tables is None and self._manage

    # -- services, intentions, nodes

    def service_read(self, name: str) -> bool:
        return self._resolve(lambda t: t.service.check(name, Access.READ))

    def service_write(self, name: str) -> bool:
        return self._resolve(lambda t: t.service.check(name, Access.WRITE))

    def intention_read(self, name: str) -> bool:
        """Read intentions whose destination is ``name``; ``"*"``: read any."""
        if name == "*":
            return self._resolve(lambda t: t.intention.any_allowed(Access.READ))
        return self._resolve(lambda t: t.intention.check(name, Access.READ))

    def intention_write(self, name: str) -> bool:
        """Write intentions whose destination is ``name``; ``"*"``: write all."""
        if name == "*":
            return self._resolve(lambda t: t.intention.all_allowed(Access.WRITE))
        return self._resolve(lambda t: t.intention.check(name, Access.WRITE))

    def node_read(self, name: str) -> bool:
        return self._resolve(lambda t: t.node.check(name, Access.READ))

    def node_write(self, name: str) -> bool:
        return self._resolve(lambda t: t.node.check(name, Access.WRITE))

    # -- key/value store

    def key_read(self, key: str) -> bool:
        return self._resolve(lambda t: t.key.check(key, Access.READ))

    def key_list(self, prefix: str) -> bool:
        return self._resolve(lambda t: t.key.check(prefix, Access.LIST))

    def key_write(self, key: str) -> bool:
        return self._resolve(lambda t: t.key.check(key, Access.WRITE))

    def key_write_prefix(self, prefix: str) -> bool:
        """Recursive delete: write on ``prefix`` and no weaker rule beneath it."""
        return self._resolve(lambda t: t.key.write_prefix(prefix))

    # -- sessions, agents, events, prepared queries (segmented by name)

    def session_read(self, node: str) -> bool:
        return self._resolve(lambda t: t.session.check(node, Access.READ))

    def session_write(self, node: str) -> bool:
        return self._resolve(lambda t: t.session.check(node, Access.WRITE))

    def agent_read(self, node: str) -> bool:
        return self._resolve(lambda t: t.agent.check(node, Access.READ))

    def agent_write(self, node: str) -> bool:
        return self._resolve(lambda t: t.agent.check(node, Access.WRITE))

    def event_read(self, name: str) -> bool:
        return self._resolve(lambda t: t.event.check(name, Access.READ))

    def event_write(self, name: str) -> bool:
        return self._resolve(lambda t: t.event.check(name, Access.WRITE))

    def query_read(self, name: str) -> bool:
        return self._resolve(lambda t: t.query.check(name, Access.READ))

    def query_write(self, name: str) -> bool:
        return self._resolve(lambda t: t.query.check(name, Access.WRITE))

    # -- single-value resources

    def operator_read(self) -> bool:
        return self._resolve(lambda t: _enforce(t.operator, Access.READ))

    def operator_write(self) -> bool:
        return self._resolve(lambda t: _enforce(t.operator, Access.WRITE))

    def acl_read(self) -> bool:
        """Static allow_all does not grant ACL access; only management does."""
        return self._resolve(lambda t: _enforce(t.acl, Access.READ), acl=True)

    def acl_write(self) -> bool:
        return self._resolve(lambda t: _enforce(t.acl, Access.WRITE), acl=True)

    def keyring_read(self) -> bool:
        return self._resolve(lambda t: _enforce(t.keyring, Access.READ))

    def keyring_write(self) -> bool:
        return self._resolve(lambda t: _enforce(t.keyring, Access.WRITE))

    def mesh_read(self) -> bool:
        return self._resolve(lambda t: t.operator_scoped(t.mesh, Access.READ))

    def mesh_write(self) -> bool:
        return self._resolve(lambda t: t.operator_scoped(t.mesh, Access.WRITE))

    def peering_read(self) -> bool:
        return self._resolve(lambda t: t.operator_scoped(t.peering, Access.READ))

    def peering_write(self) -> bool:
        return self._resolve(lambda t: t.operator_scoped(t.peering, Access.WRITE))


_ALLOW_ALL = Authorizer(allow=True)
_DENY_ALL = Authorizer()
_MANAGE_ALL = Authorizer(allow=True, manage=True)
