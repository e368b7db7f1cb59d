"""Consul ACL rules: parsing, merging across policies, and authorization answers.

Expected answers follow Consul's ``acl`` package (policy_merger.go,
policy_authorizer.go, static_authorizer.go), so clients see the same decisions
from this registry as from a Consul server.
"""

import random

import pytest

from registry.acl_rules import (
    Access,
    Authorizer,
    PolicyRules,
    Rule,
    RulesError,
    merge_rules,
    parse_rules,
)

W, R, L, D, UNSET = Access.WRITE, Access.READ, Access.LIST, Access.DENY, Access.DEFAULT


def authz(*texts: str, default: Authorizer | None = None) -> Authorizer:
    return Authorizer.from_rules([parse_rules(text) for text in texts], default)


# --------------------------------------------------------------------------- parsing

PARSE_CASES = [
    ("service", 'service "web" { policy = "write" }', PolicyRules(services=(Rule("web", W),))),
    (
        "service_prefix with an empty label",
        'service_prefix "" { policy = "read" }',
        PolicyRules(service_prefixes=(Rule("", R),)),
    ),
    (
        "service intentions",
        'service "web" {\n  policy = "read"\n  intentions = "write"\n}',
        PolicyRules(services=(Rule("web", R, W),)),
    ),
    (
        "key_prefix",
        'key_prefix "app/" { policy = "write" }',
        PolicyRules(key_prefixes=(Rule("app/", W),)),
    ),
    ("key list", 'key "app/" { policy = "list" }', PolicyRules(keys=(Rule("app/", L),))),
    (
        "node_prefix",
        'node_prefix "" { policy = "read" }',
        PolicyRules(node_prefixes=(Rule("", R),)),
    ),
    ("operator", 'operator = "read"', PolicyRules(operator=R)),
    (
        "every single-value resource",
        'acl = "write"\nkeyring = "deny"\nmesh = "read"\npeering = "write"',
        PolicyRules(acl=W, keyring=D, mesh=R, peering=W),
    ),
    (
        "every segmented resource",
        """
        node "n1" { policy = "write" }
        session "n1" { policy = "read" }
        session_prefix "" { policy = "deny" }
        agent "a1" { policy = "read" }
        agent_prefix "a" { policy = "write" }
        event "deploy" { policy = "write" }
        event_prefix "" { policy = "read" }
        query "q" { policy = "write" }
        query_prefix "" { policy = "read" }
        key "k" { policy = "deny" }
        """,
        PolicyRules(
            nodes=(Rule("n1", W),),
            sessions=(Rule("n1", R),),
            session_prefixes=(Rule("", D),),
            agents=(Rule("a1", R),),
            agent_prefixes=(Rule("a", W),),
            events=(Rule("deploy", W),),
            event_prefixes=(Rule("", R),),
            queries=(Rule("q", W),),
            query_prefixes=(Rule("", R),),
            keys=(Rule("k", D),),
        ),
    ),
    (
        "repeated blocks keep document order",
        'service "a" { policy = "read" }\nservice "b" { policy = "write" }\n'
        'service "a" { policy = "deny" }',
        PolicyRules(services=(Rule("a", R), Rule("b", W), Rule("a", D))),
    ),
    (
        "comments",
        '# hash\n// slashes\n/* block */\noperator = "write"',
        PolicyRules(operator=W),
    ),
    (
        "policy values are case-insensitive, as in Consul",
        'service "web" { policy = "WRITE" }',
        PolicyRules(services=(Rule("web", W),)),
    ),
    (
        "json",
        '{"service": {"web": {"policy": "write"}}, "operator": "read"}',
        PolicyRules(services=(Rule("web", W),), operator=R),
    ),
    (
        "json with a list of bodies and a list of blocks",
        '{"key_prefix": {"": [{"policy": "read"}]}, "node": [{"n1": {"policy": "write"}}]}',
        PolicyRules(key_prefixes=(Rule("", R),), nodes=(Rule("n1", W),)),
    ),
    (
        "json intentions",
        '{"service_prefix": {"": {"policy": "read", "intentions": "deny"}}}',
        PolicyRules(service_prefixes=(Rule("", R, D),)),
    ),
    (
        "hcl object assignment",
        'service = { web = { policy = "write" } }',
        PolicyRules(services=(Rule("web", W),)),
    ),
    ("empty text", "", PolicyRules()),
    ("whitespace only", "  \n\t", PolicyRules()),
    ("comment only", "# nothing yet\n", PolicyRules()),
    ("empty json object", "{}", PolicyRules()),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES]
)
def test_rules_text_parses_to_the_expected_policy_rules(text: str, expected: PolicyRules) -> None:
    assert parse_rules(text) == expected


BAD_RULES = [
    ("malformed hcl", 'service "web" { policy = ', "Failed to parse ACL rules"),
    ("hcl with a stray token", 'service "web" policy = "write"', "Failed to parse ACL rules"),
    ("malformed json", '{"service": {"web": }', "invalid JSON"),
    ("json list", '[{"service": {}}]', "must be an object, not a list"),
    ("json string", '"read"', "must be an object, not a string"),
    ("json number", "3", "must be an object, not a number"),
    ("unknown resource", 'namespace "x" { policy = "read" }', "Unknown ACL resource 'namespace'"),
    ("misspelt resource", 'services "x" { policy = "read" }', "Unknown ACL resource 'services'"),
    ("unknown json resource", '{"sevice": {}}', "Unknown ACL resource 'sevice'"),
    ("bad policy value", 'service "web" { policy = "admin" }', 'Invalid service "web" policy'),
    ("bad prefix policy", 'node_prefix "" { policy = "all" }', 'Invalid node_prefix "" policy'),
    (
        "list outside keys",
        'service "web" { policy = "list" }',
        "must be one of read, write or deny",
    ),
    ("list on operator", 'operator = "list"', "Invalid operator policy 'list'"),
    ("bad single value", 'acl = "manage"', "Invalid acl policy 'manage'"),
    ("non-string single value", "keyring = true", "Invalid keyring policy"),
    ("single value as block", 'operator { policy = "read" }', "Invalid operator policy"),
    ("non-string policy", 'key "k" { policy = 1 }', 'Invalid key "k" policy'),
    (
        "block without a policy",
        'service "web" { intentions = "read" }',
        'service "web" has no policy',
    ),
    ("empty block", 'key_prefix "app/" {}', 'key_prefix "app/" has no policy'),
    ("json block without a policy", '{"node": {"n1": {}}}', 'node "n1" has no policy'),
    ("bad intentions", 'service "web" { policy = "read" intentions = "all" }', "intentions 'all'"),
    ("list intentions", 'service_prefix "" { policy = "read" intentions = "list" }', "intentions"),
    ("intentions outside services", 'node "n" { policy = "read" intentions = "read" }', "unknown"),
    ("misspelt attribute", 'service "w" { policy = "read" intention = "read" }', "'intention'"),
    ("block without a label", 'service { policy = "write" }', "needs a name label"),
    ("block with two labels", 'service "a" "b" { policy = "write" }', "exactly one name label"),
    ("segmented resource as a string", 'service = "write"', "must be a block"),
    ("json body that is not an object", '{"service": {"web": "write"}}', 'service "web" must be'),
]


@pytest.mark.parametrize(
    ("text", "message"), [c[1:] for c in BAD_RULES], ids=[c[0] for c in BAD_RULES]
)
def test_invalid_rules_raise_a_rules_error_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(text)
    assert message in str(info.value)


def test_a_rules_error_is_a_value_error() -> None:
    assert issubclass(RulesError, ValueError)


def test_access_levels_are_ordered_as_consul_orders_them() -> None:
    assert Access.DENY == 0
    assert Access.DENY < Access.READ < Access.LIST < Access.WRITE
    assert Access.DEFAULT < Access.DENY
    assert [str(a) for a in (D, R, L, W, UNSET)] == ["deny", "read", "list", "write", ""]


def test_parsed_rules_are_frozen_and_hashable() -> None:
    rules = parse_rules('service "web" { policy = "write" }')
    with pytest.raises(AttributeError):
        rules.operator = Access.WRITE  # type: ignore[misc]
    assert hash(rules) == hash(parse_rules('service "web" { policy = "write" }'))


# --------------------------------------------------------------------------- merging

MERGE_CASES = [
    ("read and write merge to write", ["read", "write"], W),
    ("write and read merge to write", ["write", "read"], W),
    ("deny beats write", ["write", "deny"], D),
    ("deny beats write in either order", ["deny", "write"], D),
    ("deny beats read", ["read", "deny"], D),
    ("list beats read", ["read", "list"], L),
    ("write beats list", ["list", "write"], W),
    ("deny beats list", ["list", "deny"], D),
]


@pytest.mark.parametrize(
    ("policies", "expected"), [c[1:] for c in MERGE_CASES], ids=[c[0] for c in MERGE_CASES]
)
def test_rules_for_the_same_name_merge_as_consul_merges_them(
    policies: list[str], expected: Access
) -> None:
    exact = merge_rules(parse_rules(f'key "k" {{ policy = "{p}" }}') for p in policies)
    prefix = merge_rules(parse_rules(f'key_prefix "k" {{ policy = "{p}" }}') for p in policies)
    assert exact.keys == (Rule("k", expected),)
    assert prefix.key_prefixes == (Rule("k", expected),)


SINGLE_VALUE_MERGES = [
    ("read and write merge to write", ["read", "write"], W),
    ("deny beats write", ["write", "deny"], D),
    ("an unset value takes the other", ["", "read"], R),
    ("both unset stay unset", ["", ""], UNSET),
]


@pytest.mark.parametrize(
    ("values", "expected"),
    [c[1:] for c in SINGLE_VALUE_MERGES],
    ids=[c[0] for c in SINGLE_VALUE_MERGES],
)
def test_single_value_rules_merge_with_the_same_precedence(
    values: list[str], expected: Access
) -> None:
    texts = [f'operator = "{v}"' if v else "" for v in values]
    assert merge_rules(parse_rules(t) for t in texts).operator == expected


def test_exact_and_prefix_rules_for_the_same_name_do_not_merge() -> None:
    merged = merge_rules(
        [
            parse_rules('service "web" { policy = "read" }'),
            parse_rules('service_prefix "web" { policy = "write" }'),
        ]
    )
    assert merged.services == (Rule("web", R),)
    assert merged.service_prefixes == (Rule("web", W),)


def test_service_intentions_merge_separately_from_the_service_policy() -> None:
    merged = merge_rules(
        [
            parse_rules('service "web" { policy = "write" }'),
            parse_rules('service "web" { policy = "read" intentions = "deny" }'),
            parse_rules('service "db" { policy = "read" intentions = "write" }'),
            parse_rules('service "db" { policy = "read" intentions = "read" }'),
        ]
    )
    assert merged.services == (Rule("web", W, D), Rule("db", R, W))


def test_merging_no_policies_gives_empty_rules() -> None:
    assert merge_rules([]) == PolicyRules()


# --------------------------------------------------------------------------- decisions

ALLOW = Authorizer.allow_all()
DENY = Authorizer.deny_all()

PFX_WEB_W = 'service_prefix "web" { policy = "write" }'
PFX_ALL_IW = 'service_prefix "" { policy = "write" intentions = "write" }'
KV_ALL_W = 'key_prefix "" { policy = "write" }'
KV_LAYERS = [
    'key_prefix "" { policy = "read" }',
    'key_prefix "app/" { policy = "write" }',
    'key_prefix "app/secret/" { policy = "deny" }',
]
SERVICE_IDENTITY = ['service_prefix "" { policy = "read" }', 'service "X" { policy = "write" }']
NODES_READ = Authorizer.from_rules([parse_rules('node_prefix "" { policy = "read" }')])
OPERATOR_READ = Authorizer.from_rules([parse_rules('operator = "read"')], ALLOW)

# One row per question: (id, rules texts, default authorizer or None, method, args, expected).
# fmt: off
DECISIONS = [
    # exact vs prefix
    ("exact beats a prefix for the same name", [PFX_WEB_W, 'service "web" { policy = "deny" }'], None, "service_read", ("web",), False),
    ("the prefix still covers longer names", [PFX_WEB_W, 'service "web" { policy = "deny" }'], None, "service_write", ("web-1",), True),
    ("exact read beats a catch-all write prefix", ['service_prefix "" { policy = "write" }', 'service "web" { policy = "read" }'], None, "service_write", ("web",), False),
    ("an exact rule matches only the exact name", ['node "n1" { policy = "write" }'], None, "node_write", ("n10",), False),
    # longest prefix
    ("longest prefix wins: deepest deny", KV_LAYERS, None, "key_read", ("app/secret/db",), False),
    ("longest prefix wins: middle write", KV_LAYERS, None, "key_write", ("app/config",), True),
    ("longest prefix wins: catch-all read", KV_LAYERS, None, "key_write", ("other",), False),
    ("a longer prefix with less access wins", ['node_prefix "" { policy = "write" }', 'node_prefix "db-" { policy = "read" }'], None, "node_write", ("db-1",), False),
    ("a prefix equal to the name matches", ['agent_prefix "a1" { policy = "write" }'], None, "agent_write", ("a1",), True),
    ("a prefix longer than the name does not match", ['agent_prefix "a10" { policy = "write" }'], None, "agent_write", ("a1",), False),
    # merging across policies
    ("merged write for the same exact name", ['service "web" { policy = "read" }', 'service "web" { policy = "write" }'], None, "service_write", ("web",), True),
    ("merged deny for the same exact name", ['service "web" { policy = "write" }', 'service "web" { policy = "deny" }'], None, "service_read", ("web",), False),
    ("merged deny for the same prefix", ['key_prefix "a/" { policy = "write" }', 'key_prefix "a/" { policy = "deny" }'], ALLOW, "key_read", ("a/b",), False),
    ("merged list for the same prefix", ['key_prefix "a/" { policy = "read" }', 'key_prefix "a/" { policy = "list" }'], None, "key_list", ("a/",), True),
    ("an exact rule from another policy beats a prefix", ['service_prefix "" { policy = "write" }', 'service "x" { policy = "read" }'], None, "service_write", ("x",), False),
    # levels
    ("write implies read", ['service "web" { policy = "write" }'], None, "service_read", ("web",), True),
    ("write implies list for keys", ['key_prefix "" { policy = "write" }'], None, "key_list", ("any/",), True),
    ("list implies read", ['key_prefix "" { policy = "list" }'], None, "key_read", ("a",), True),
    ("list does not imply write", ['key_prefix "" { policy = "list" }'], ALLOW, "key_write", ("a",), False),
    ("read does not imply list", ['key_prefix "" { policy = "read" }'], ALLOW, "key_list", ("a/",), False),
    ("read does not imply write", ['session_prefix "" { policy = "read" }'], ALLOW, "session_write", ("n1",), False),
    ("an explicit deny is not overridden by allow_all", ['event "e" { policy = "deny" }'], ALLOW, "event_read", ("e",), False),
    # a service identity: read everything, write one service
    ("service write for X under a read catch-all", SERVICE_IDENTITY, None, "service_write", ("X",), True),
    ("no service write for Y under a read catch-all", SERVICE_IDENTITY, None, "service_write", ("Y",), False),
    ("service read for Y under a read catch-all", SERVICE_IDENTITY, None, "service_read", ("Y",), True),
    # intentions
    ("service write gives intentions read", ['service "web" { policy = "write" }'], None, "intention_read", ("web",), True),
    ("service write does not give intentions write", ['service "web" { policy = "write" }'], ALLOW, "intention_write", ("web",), False),
    ("service read gives intentions read", ['service_prefix "" { policy = "read" }'], None, "intention_read", ("web",), True),
    ("service deny gives intentions deny", ['service "web" { policy = "deny" }'], ALLOW, "intention_read", ("web",), False),
    ("stated intentions write", ['service "web" { policy = "read" intentions = "write" }'], None, "intention_write", ("web",), True),
    ("stated intentions deny", ['service "web" { policy = "write" intentions = "deny" }'], ALLOW, "intention_read", ("web",), False),
    ("intentions follow exact over prefix", [PFX_ALL_IW, 'service "db" { policy = "read" }'], None, "intention_write", ("db",), False),
    ("merged intentions write", ['service "web" { policy = "write" }', 'service "web" { policy = "read" intentions = "write" }'], None, "intention_write", ("web",), True),
    ("intentions * read when any rule reads", ['service "web" { policy = "read" }'], None, "intention_read", ("*",), True),
    ("intentions * read denied by a deny catch-all", ['service_prefix "" { policy = "deny" }'], ALLOW, "intention_read", ("*",), False),
    ("intentions * write needs every rule to write", [PFX_ALL_IW, 'service "db" { policy = "write" }'], None, "intention_write", ("*",), False),
    ("intentions * write with a write catch-all", [PFX_ALL_IW], None, "intention_write", ("*",), True),
    ("intentions * write defers without a catch-all", ['service "web" { policy = "write" intentions = "write" }'], None, "intention_write", ("*",), False),
    ("intentions * write defers to allow_all", ['service "web" { policy = "write" intentions = "write" }'], ALLOW, "intention_write", ("*",), True),
    # defaults
    ("no rule falls back to deny_all", ['service "web" { policy = "write" }'], None, "service_read", ("db",), False),
    ("no rule falls back to allow_all", ['service "web" { policy = "write" }'], ALLOW, "service_read", ("db",), True),
    ("no rule falls back to an explicit deny_all", [], DENY, "node_read", ("n1",), False),
    ("no policies at all fall back to the default", [], ALLOW, "key_write", ("k",), True),
    ("allow_all default does not grant acl read", [], ALLOW, "acl_read", (), False),
    ("allow_all default does not grant acl write", ['operator = "write"'], ALLOW, "acl_write", (), False),
    ("acl rule grants acl write", ['acl = "write"'], None, "acl_write", (), True),
    ("acl read does not grant acl write", ['acl = "read"'], ALLOW, "acl_write", (), False),
    ("a chained rules authorizer as default", ['node "n1" { policy = "write" }'], NODES_READ, "node_read", ("n2",), True),
    ("the chained default decides by its rules", ['node "n1" { policy = "write" }'], NODES_READ, "node_write", ("n2",), False),
    ("the chained default defers further", ['node "n1" { policy = "write" }'], OPERATOR_READ, "node_write", ("n2",), True),
    # single-value resources and their fallbacks
    ("operator read", ['operator = "read"'], None, "operator_read", (), True),
    ("operator read is not write", ['operator = "read"'], ALLOW, "operator_write", (), False),
    ("keyring write", ['keyring = "write"'], None, "keyring_write", (), True),
    ("keyring unset falls back", ['operator = "write"'], None, "keyring_read", (), False),
    ("mesh falls back to operator", ['operator = "write"'], None, "mesh_write", (), True),
    ("peering falls back to operator", ['operator = "read"'], None, "peering_read", (), True),
    ("peering read from operator is not write", ['operator = "read"'], ALLOW, "peering_write", (), False),
    ("a mesh rule overrides operator", ['operator = "write"', 'mesh = "read"'], None, "mesh_write", (), False),
    ("a peering deny overrides operator", ['operator = "write"\npeering = "deny"'], ALLOW, "peering_read", (), False),
    ("mesh with neither rule falls back", ['node "n" { policy = "read" }'], ALLOW, "mesh_write", (), True),
    # the remaining segmented kinds
    ("session read by node prefix", ['session_prefix "web-" { policy = "read" }'], None, "session_read", ("web-1",), True),
    ("event write by exact name", ['event "deploy" { policy = "write" }'], None, "event_write", ("deploy",), True),
    ("query read by prefix", ['query_prefix "" { policy = "read" }'], None, "query_read", ("q",), True),
    ("query write denied by read", ['query_prefix "" { policy = "read" }'], ALLOW, "query_write", ("q",), False),
    ("agent read by exact node", ['agent "a1" { policy = "read" }'], None, "agent_read", ("a1",), True),
    ("an empty exact name is a name", ['key "" { policy = "write" }'], None, "key_write", ("",), True),
    ("an empty exact name is not a prefix", ['key "" { policy = "write" }'], None, "key_write", ("a",), False),
    ("json rules decide like hcl rules", ['{"service": {"web": {"policy": "write"}}}'], None, "service_write", ("web",), True),
]
# fmt: on


@pytest.mark.parametrize(
    ("texts", "default", "method", "args", "expected"),
    [c[1:] for c in DECISIONS],
    ids=[c[0] for c in DECISIONS],
)
def test_authorizer_answers_as_consul_does(
    texts: list[str], default: Authorizer | None, method: str, args: tuple, expected: bool
) -> None:
    assert getattr(authz(*texts, default=default), method)(*args) is expected


def test_an_exact_rule_beats_a_longer_prefix() -> None:
    authorizer = authz(
        'key_prefix "" { policy = "deny" }',
        'key_prefix "app/" { policy = "write" }',
        'key_prefix "app/x" { policy = "write" }',
        'key "app/x" { policy = "read" }',
    )
    assert authorizer.key_read("app/x") is True
    assert authorizer.key_write("app/x") is False
    assert authorizer.key_write("app/xy") is True


# fmt: off
KEY_WRITE_PREFIX = [
    ("write prefix with nothing beneath", ['key_prefix "app/" { policy = "write" }'], None, "app/", True),
    ("write on a parent prefix", [KV_ALL_W], None, "app/", True),
    ("an exact deny beneath blocks it", ['key_prefix "app/" { policy = "write" }', 'key "app/keep" { policy = "deny" }'], ALLOW, "app/", False),
    ("a read prefix beneath blocks it", [KV_ALL_W, 'key_prefix "app/ro/" { policy = "read" }'], ALLOW, "app/", False),
    ("a list rule beneath blocks it", [KV_ALL_W, 'key "app/x" { policy = "list" }'], ALLOW, "app/", False),
    ("write rules beneath are fine", [KV_ALL_W, 'key "app/x" { policy = "write" }'], None, "app/", True),
    ("a weaker rule outside the prefix does not matter", [KV_ALL_W, 'key "other" { policy = "deny" }'], None, "app/", True),
    ("an exact rule at the prefix itself counts", [KV_ALL_W, 'key "app/" { policy = "read" }'], ALLOW, "app/", False),
    ("the governing prefix must grant write", ['key_prefix "app/" { policy = "read" }'], ALLOW, "app/x/", False),
    ("no governing prefix defers to the default", [], ALLOW, "app/", True),
    ("no governing prefix and all-write rules beneath defer", ['key "app/x" { policy = "write" }'], DENY, "app/", False),
    ("no governing prefix but a deny beneath denies", ['key "app/x" { policy = "deny" }'], ALLOW, "app/", False),
    ("an exact write on the prefix does not govern it", ['key "app/" { policy = "write" }'], DENY, "app/", False),
]
# fmt: on


@pytest.mark.parametrize(
    ("texts", "default", "prefix", "expected"),
    [c[1:] for c in KEY_WRITE_PREFIX],
    ids=[c[0] for c in KEY_WRITE_PREFIX],
)
def test_key_write_prefix_needs_write_on_the_prefix_and_everything_beneath(
    texts: list[str], default: Authorizer | None, prefix: str, expected: bool
) -> None:
    assert authz(*texts, default=default).key_write_prefix(prefix) is expected


ALL_QUESTIONS = [
    ("service_read", ("s",)),
    ("service_write", ("s",)),
    ("node_read", ("n",)),
    ("node_write", ("n",)),
    ("key_read", ("k",)),
    ("key_list", ("k/",)),
    ("key_write", ("k",)),
    ("key_write_prefix", ("k/",)),
    ("session_read", ("n",)),
    ("session_write", ("n",)),
    ("agent_read", ("n",)),
    ("agent_write", ("n",)),
    ("intention_read", ("s",)),
    ("intention_write", ("s",)),
    ("intention_read", ("*",)),
    ("intention_write", ("*",)),
    ("event_read", ("e",)),
    ("event_write", ("e",)),
    ("query_read", ("q",)),
    ("query_write", ("q",)),
    ("operator_read", ()),
    ("operator_write", ()),
    ("acl_read", ()),
    ("acl_write", ()),
    ("keyring_read", ()),
    ("keyring_write", ()),
    ("mesh_read", ()),
    ("mesh_write", ()),
    ("peering_read", ()),
    ("peering_write", ()),
]
_ACL = {"acl_read", "acl_write"}


@pytest.mark.parametrize(
    ("method", "args"), ALL_QUESTIONS, ids=[f"{m}{a}" for m, a in ALL_QUESTIONS]
)
def test_static_authorizers_answer_every_question_as_consul_does(method: str, args: tuple) -> None:
    assert getattr(Authorizer.management(), method)(*args) is True
    assert getattr(Authorizer.deny_all(), method)(*args) is False
    assert getattr(Authorizer.allow_all(), method)(*args) is (method not in _ACL)
    assert getattr(authz(), method)(*args) is False  # no rules: the deny_all default


def test_only_the_management_authorizer_is_management() -> None:
    assert Authorizer.management().is_management() is True
    assert Authorizer.allow_all().is_management() is False
    assert Authorizer.deny_all().is_management() is False
    assert authz('acl = "write"', default=Authorizer.management()).is_management() is False


def test_duplicate_blocks_in_one_policy_merge_like_separate_policies() -> None:
    one = authz('service "web" { policy = "write" }\nservice "web" { policy = "read" }')
    assert one.service_write("web") is True
    denied = authz('key "k" { policy = "deny" }\nkey "k" { policy = "write" }', default=ALLOW)
    assert denied.key_read("k") is False


# --------------------------------------------------------------------------- scale

KINDS = ["service", "node", "key", "session", "agent", "event", "query"]
ALPHABET = "ab/"


def _reference_access(rules: list[tuple[str, bool, Access]], name: str) -> Access:
    """Brute force over every merged rule: exact first, else the longest prefix."""
    exact = [a for n, is_prefix, a in rules if not is_prefix and n == name]
    if exact:
        return exact[0]
    prefixes = [(len(n), a) for n, is_prefix, a in rules if is_prefix and name.startswith(n)]
    return max(prefixes)[1] if prefixes else Access.DEFAULT


def test_trie_lookups_agree_with_a_brute_force_scan_over_many_random_rules() -> None:
    rng = random.Random(20240601)
    levels = ["read", "write", "deny"]
    texts, merged = [], {}
    for _ in range(400):
        name = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6)))
        is_prefix = rng.random() < 0.5
        level = rng.choice(levels)
        resource = "key_prefix" if is_prefix else "key"
        texts.append(f'{resource} "{name}" {{ policy = "{level}" }}')
        old = merged.get((name, is_prefix), Access.DEFAULT)
        new = Access.from_policy(level)
        merged[(name, is_prefix)] = D if D in (old, new) else max(old, new)
    rules = [(n, p, a) for (n, p), a in merged.items()]
    authorizer = authz(*texts, default=ALLOW)
    for _ in range(2000):
        name = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 8)))
        access = _reference_access(rules, name)
        expected_read = True if access is Access.DEFAULT else access in (R, W)
        expected_write = True if access is Access.DEFAULT else access is W
        assert authorizer.key_read(name) is expected_read, name
        assert authorizer.key_write(name) is expected_write, name


def test_thousands_of_rules_and_long_names_are_handled() -> None:
    long_key = "k/" * 3000
    rules = PolicyRules(
        services=tuple(Rule(f"svc-{i}", W) for i in range(5000)),
        service_prefixes=(Rule("svc-", R),),
        key_prefixes=(Rule(long_key, D), Rule("", W)),
    )
    authorizer = Authorizer.from_rules([rules])
    assert authorizer.service_write("svc-4999") is True
    assert authorizer.service_write("svc-5000") is False
    assert authorizer.service_read("svc-5000") is True
    assert authorizer.key_write(long_key + "x") is False
    assert authorizer.key_write(long_key[:-2]) is True
    assert authorizer.key_write_prefix("k/") is False
    assert authorizer.key_write_prefix("j/") is True
