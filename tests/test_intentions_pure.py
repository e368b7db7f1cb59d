"""Intention decisions without a database (meshproto.intentions): Consul's
precedence table, first-match decisions, default deny, L7 permission matching
and validation. The sidecar runs this same code."""

from __future__ import annotations

import pytest

from meshproto.intentions import (
    Intention,
    IntentionError,
    IntentionIndex,
    evaluate_l7,
    parse_permissions,
    precedence,
    validate,
)

# Consul's "Intention precedence" table: (source ns, source, dest ns, dest) -> precedence.
PRECEDENCE_TABLE = [
    (("default", "web"), ("default", "db"), 9),
    (("default", "*"), ("default", "db"), 8),
    (("*", "*"), ("default", "db"), 7),
    (("default", "web"), ("default", "*"), 6),
    (("default", "*"), ("default", "*"), 5),
    (("*", "*"), ("default", "*"), 4),
    (("default", "web"), ("*", "*"), 3),
    (("default", "*"), ("*", "*"), 2),
    (("*", "*"), ("*", "*"), 1),
]


def ix(src, dst, action="allow", *, id="", permissions=()):
    return Intention(
        source_ns=src[0],
        source_name=src[1],
        destination_ns=dst[0],
        destination_name=dst[1],
        action=action if not permissions else "",
        permissions=permissions,
        id=id,
    )


@pytest.mark.parametrize(("source", "destination", "expected"), PRECEDENCE_TABLE)
def test_precedence_follows_every_row_of_consuls_table(source, destination, expected):
    assert precedence(*source, *destination) == expected
    assert ix(source, destination).precedence == expected


@pytest.mark.parametrize("row", range(len(PRECEDENCE_TABLE)))
def test_the_highest_precedence_match_decides_whatever_the_others_say(row):
    """Load every row of the table with alternating actions; each row's
    intention must decide when it is the most precise one left."""
    rows = PRECEDENCE_TABLE[row:]
    loaded = [
        ix(src, dst, "allow" if i % 2 == 0 else "deny", id=f"id-{i}")
        for i, (src, dst, _) in enumerate(rows)
    ]
    decision = IntentionIndex(loaded).decide("web", "db")
    assert decision.intention_id == "id-0"
    assert decision.precedence == rows[0][2]
    assert decision.allowed is True
    # Flip the winner: the answer flips, whatever lower rows say.
    loaded[0] = ix(rows[0][0], rows[0][1], "deny", id="id-0")
    assert IntentionIndex(loaded).decide("web", "db").allowed is False


def test_an_exact_intention_beats_a_wildcard_deny_and_a_wildcard_deny_beats_defaults():
    index = IntentionIndex(
        [
            ix(("default", "*"), ("default", "db"), "deny", id="wild"),
            ix(("default", "web"), ("default", "db"), "allow", id="exact"),
            ix(("*", "*"), ("*", "*"), "allow", id="all"),
        ]
    )
    assert index.decide("web", "db").intention_id == "exact"
    assert index.decide("api", "db").intention_id == "wild"
    assert index.decide("api", "db").allowed is False
    assert index.decide("api", "cache").intention_id == "all"


def test_with_no_match_the_default_is_deny_and_says_so():
    decision = IntentionIndex([ix(("default", "web"), ("default", "db"))]).decide("api", "db")
    assert (decision.allowed, decision.intention_id, decision.default) == (False, None, True)
    assert decision.reason == (
        "Default behavior: deny. No intention matches api => db, and meshweb denies by default."
    )


def test_default_allow_is_opt_in_and_loud():
    decision = IntentionIndex([], default_allow=True).decide("api", "db")
    assert decision.allowed is True
    assert decision.reason.startswith("DEFAULT ALLOW:")
    assert "AllowByDefault" in decision.reason


def test_reasons_render_intentions_as_consul_does():
    decision = IntentionIndex([ix(("default", "web"), ("default", "db"), "deny", id="abc")]).decide(
        "web", "db"
    )
    assert (
        decision.reason == "Matched L4 intention: web => db (ID: abc, Precedence: 9, Action: DENY)"
    )
    other_ns = ix(("team", "web"), ("default", "db"), id="n1")
    assert str(other_ns) == "team/web => db (ID: n1, Precedence: 9, Action: ALLOW)"


def test_namespaces_are_matched_exactly_unless_wildcarded():
    index = IntentionIndex(
        [
            ix(("team", "web"), ("default", "db"), "allow", id="team"),
            ix(("team", "*"), ("default", "db"), "deny", id="team-any"),
        ]
    )
    assert index.decide("web", "db", source_ns="team").intention_id == "team"
    assert index.decide("api", "db", source_ns="team").intention_id == "team-any"
    assert index.decide("web", "db").default  # default/web is another service


def test_an_l7_intention_denies_at_l4_and_decides_each_request():
    perms = parse_permissions(
        [
            {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
            {"Action": "allow", "HTTP": {"PathPrefix": "/", "Methods": ["GET"]}},
        ]
    )
    index = IntentionIndex([ix(("default", "web"), ("default", "db"), id="l7", permissions=perms)])
    l4 = index.decide("web", "db")
    assert (l4.allowed, l4.has_l7) == (False, True)
    assert l4.reason == "Matched L7 intention: web => db (ID: l7, Precedence: 9, Permissions: 2)"
    assert index.decide_request("web", "db", "GET", "/orders", {}).allowed is True
    assert index.decide_request("web", "db", "GET", "/admin/x", {}).allowed is False
    unmatched = index.decide_request("web", "db", "POST", "/orders", {})
    assert (unmatched.allowed, unmatched.default) == (False, True)


L7_TABLE = [
    # (permission HTTP, method, path, headers, matches?)
    ({"PathExact": "/a"}, "GET", "/a", {}, True),
    ({"PathExact": "/a"}, "GET", "/a/", {}, False),
    ({"PathExact": "/a"}, "GET", "/a?x=1", {}, True),  # the query string is not the path
    ({"PathPrefix": "/api/"}, "GET", "/api/v1", {}, True),
    ({"PathPrefix": "/api/"}, "GET", "/apiv1", {}, False),
    ({"PathRegex": "/v[0-9]+/.*"}, "GET", "/v2/users", {}, True),
    ({"PathRegex": "/v[0-9]+"}, "GET", "/v2/users", {}, False),  # the whole path must match
    ({"Methods": ["GET", "HEAD"]}, "HEAD", "/", {}, True),
    ({"Methods": ["GET", "HEAD"]}, "post", "/", {}, False),
    ({"Methods": ["post"]}, "POST", "/", {}, True),  # methods are case-insensitive
    ({"Header": [{"Name": "X-Env", "Present": True}]}, "GET", "/", {"x-env": ""}, True),
    ({"Header": [{"Name": "X-Env", "Present": True}]}, "GET", "/", {}, False),
    ({"Header": [{"Name": "X-Env", "Present": True, "Invert": True}]}, "GET", "/", {}, True),
    ({"Header": [{"Name": "X-Env", "Exact": "prod"}]}, "GET", "/", {"X-ENV": "prod"}, True),
    ({"Header": [{"Name": "X-Env", "Exact": "prod"}]}, "GET", "/", {"x-env": "production"}, False),
    (
        {"Header": [{"Name": "X-Env", "Exact": "prod", "Invert": True}]},
        "GET",
        "/",
        {"x-env": "dev"},
        True,
    ),
    ({"Header": [{"Name": "X-Env", "Exact": "prod", "Invert": True}]}, "GET", "/", {}, False),
    ({"Header": [{"Name": "ua", "Prefix": "curl/"}]}, "GET", "/", {"ua": "curl/8.0"}, True),
    (
        {"Header": [{"Name": "host", "Suffix": ".internal"}]},
        "GET",
        "/",
        {"host": "a.internal"},
        True,
    ),
    ({"Header": [{"Name": "host", "Suffix": ".internal"}]}, "GET", "/", {"host": "a.com"}, False),
    ({"Header": [{"Name": "v", "Regex": "[0-9]+"}]}, "GET", "/", {"v": "42"}, True),
    ({"Header": [{"Name": "v", "Regex": "[0-9]+"}]}, "GET", "/", {"v": "42a"}, False),
    (
        {"PathPrefix": "/x", "Methods": ["PUT"], "Header": [{"Name": "a", "Exact": "1"}]},
        "PUT",
        "/x/y",
        {"a": "1"},
        True,
    ),
    (
        {"PathPrefix": "/x", "Methods": ["PUT"], "Header": [{"Name": "a", "Exact": "1"}]},
        "PUT",
        "/x/y",
        {"a": "2"},
        False,
    ),
]


@pytest.mark.parametrize(("http", "method", "path", "headers", "expected"), L7_TABLE)
def test_l7_permission_matching(http, method, path, headers, expected):
    allow = parse_permissions([{"Action": "allow", "HTTP": http}])
    deny = parse_permissions([{"Action": "deny", "HTTP": http}])
    assert evaluate_l7(allow, method, path, headers) is (True if expected else None)
    assert evaluate_l7(deny, method, path, headers) is (False if expected else None)


def test_the_first_matching_permission_is_terminal():
    perms = parse_permissions(
        [
            {"Action": "allow", "HTTP": {"PathExact": "/admin/health"}},
            {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
            {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
        ]
    )
    assert evaluate_l7(perms, "GET", "/admin/health", {}) is True
    assert evaluate_l7(perms, "GET", "/admin/users", {}) is False
    assert evaluate_l7(perms, "GET", "/shop", {}) is True


def test_permissions_round_trip_to_consuls_canonical_json():
    from meshproto.intentions import permissions_json

    raw = [
        {
            "action": "allow",
            "http": {
                "path_prefix": "/api",
                "methods": ["get"],
                "header": [{"name": "X-A", "present": True, "invert": True}],
            },
        }
    ]
    assert permissions_json(parse_permissions(raw)) == [
        {
            "Action": "allow",
            "HTTP": {
                "PathPrefix": "/api",
                "Header": [{"Name": "x-a", "Present": True, "Invert": True}],
                "Methods": ["GET"],
            },
        }
    ]


BAD_INTENTIONS = [
    ({"action": "maybe"}, "Action must be set to 'allow' or 'deny'"),
    (
        {"source_name": "web*"},
        "SourceName: wildcard character '*' cannot be used with partial values",
    ),
    ({"destination_name": "*db"}, "DestinationName: wildcard character '*' cannot be used"),
    ({"source_ns": "te*m"}, "SourceNS: wildcard character '*' cannot be used with partial values"),
    ({"source_ns": "*"}, "SourceName: exact value cannot follow wildcard namespace"),
    ({"source_name": ""}, "SourceName is required"),
    ({"destination_name": ""}, "DestinationName is required"),
    ({"source_type": "aws"}, "SourceType must be set to 'consul'"),
    ({"meta": {"k" * 129: "v"}}, "exceeds maximum length 128"),
    ({"meta": {str(i): "v" for i in range(65)}}, "maximum element count 64"),
    ({"action": "", "permissions": [{"Action": "allow"}]}, "Permissions[0].HTTP is required"),
    (
        {"action": "", "permissions": [{"Action": "yes", "HTTP": {"PathExact": "/"}}]},
        "Permissions[0].Action",
    ),
    (
        {"action": "", "permissions": [{"Action": "allow", "HTTP": {"PathExact": "x"}}]},
        "doesn't start with '/'",
    ),
    (
        {
            "action": "",
            "permissions": [{"Action": "allow", "HTTP": {"PathExact": "/", "PathPrefix": "/a"}}],
        },
        "at most one of PathExact, PathPrefix, or PathRegex",
    ),
    (
        {"action": "", "permissions": [{"Action": "allow", "HTTP": {"Header": [{"Exact": "x"}]}}]},
        "Header[0] missing required Name field",
    ),
    (
        {
            "action": "",
            "permissions": [
                {
                    "Action": "allow",
                    "HTTP": {"Header": [{"Name": "a", "Exact": "x", "Prefix": "y"}]},
                }
            ],
        },
        "should only contain one of Present, Exact, Prefix, Suffix, or Regex",
    ),
    (
        {"action": "", "permissions": [{"Action": "allow", "HTTP": {"Methods": ["GET", "get"]}}]},
        "Methods contains 'GET' more than once",
    ),
    (
        {"action": "", "permissions": [{"Action": "allow", "HTTP": {"PathRegex": "a(b"}}]},
        "PathRegex is not a valid regular expression",
    ),
    (
        {"action": "", "permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}, "JWT": {}}]},
        "unknown field 'JWT'",
    ),
    (
        {
            "action": "",
            "destination_name": "*",
            "permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}}],
        },
        "wildcarded destinations",
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_INTENTIONS)
def test_bad_intentions_are_refused_with_a_message_naming_the_field(override, message):
    spec = {"source_name": "web", "destination_name": "db", "action": "allow", **override}
    with pytest.raises(IntentionError) as err:
        validate(**spec)
    assert message in str(err.value)


class _Probes(dict):
    """A dict that counts lookups and refuses to be iterated (a scan)."""

    gets = 0

    def get(self, key, default=None):
        _Probes.gets += 1
        return super().get(key, default)

    def __iter__(self):
        raise AssertionError("decide() iterated over intentions")

    def values(self):
        raise AssertionError("decide() iterated over intentions")

    def items(self):
        raise AssertionError("decide() iterated over intentions")


def test_decide_with_10000_intentions_does_at_most_twelve_lookups_and_no_scan():
    index = IntentionIndex(
        [ix(("default", f"src-{i}"), ("default", "db"), id=str(i)) for i in range(9_999)]
        + [ix(("*", "*"), ("*", "*"), "deny", id="last")]
    )
    assert len(index) == 10_000
    index._by_destination = _Probes({k: _Probes(v) for k, v in dict.items(index._by_destination)})
    _Probes.gets = 0
    assert index.decide("src-4242", "db").intention_id == "4242"
    assert _Probes.gets == 2  # the destination's bucket, then the exact source
    _Probes.gets = 0
    assert index.decide("nobody", "cache").intention_id == "last"  # the worst case
    assert _Probes.gets <= 12
