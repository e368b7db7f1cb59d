"""Table-driven tests for Consul's ?filter= expression language (registry.filtering)."""

import time

import pytest

from registry.filtering import (
    MAX_CLAUSES,
    MAX_EXPRESSION_LENGTH,
    MAX_PATTERN_LENGTH,
    Filter,
    FilterError,
    FilterTooExpensive,
    apply_filter,
    compile_filter,
)

# A /v1/health/service entry.
HEALTH = {
    "Node": {
        "ID": "0f9e",
        "Node": "node-1",
        "Address": "10.0.0.1",
        "Datacenter": "dc1",
        "TaggedAddresses": {"lan": "10.0.0.1", "wan": "198.18.0.1"},
        "Meta": {"rack": "r1", "consul-network-segment": ""},
    },
    "Service": {
        "ID": "web-1",
        "Service": "web",
        "Tags": ["primary", "v2", "with space"],
        "Meta": {"version": "2.1", "env": "prod", "team-name": "edge"},
        "Port": 8080,
        "Address": "",
        "Weights": {"Passing": 10, "Warning": 1},
        "EnableTagOverride": False,
    },
    "Checks": [
        {"CheckID": "serfHealth", "Name": "Serf", "Status": "passing", "ServiceTags": []},
        {"CheckID": "web-http", "Name": "HTTP", "Status": "critical", "ServiceTags": ["v2"]},
    ],
}

# A /v1/catalog/service entry.
CATALOG = {
    "Node": "node-2",
    "Address": "10.0.0.2",
    "NodeMeta": {"os": "linux", "arch": "arm"},
    "ServiceName": "api",
    "ServiceTags": [],
    "ServiceMeta": {"environment": "qa"},
    "ServicePort": 9090,
    "ServiceEnableTagOverride": True,
    "ServiceWeights": {"Passing": 1, "Warning": 1},
    "TaggedAddresses": None,
}

# A /v1/agent/services value (no Kind/Proxy/Connect: Consul omits them when empty).
AGENT = {
    "ID": "redis1",
    "Service": "redis",
    "Tags": ["primary", "production"],
    "Meta": {"env": "production"},
    "Port": 1234,
    "Address": "",
}

# A /v1/health/checks entry with a float field, to exercise float coercion.
CHECK = {"CheckID": "mem", "Status": "warning", "Output": "load 1.5\nok", "Ratio": 0.25}


def keeps(expression, item):
    return compile_filter(expression)(item)


MATCHES = [
    # equality
    ("meta-value-equals", 'Service.Meta.version == "2.1"', HEALTH, True),
    ("meta-value-equals-other", 'Service.Meta.version == "2"', HEALTH, False),
    ("string-not-equals", 'Service.Service != "db"', HEALTH, True),
    ("top-level-string-equals", 'ServiceName == "api"', CATALOG, True),
    ("node-meta-equals", 'NodeMeta.os == "linux"', CATALOG, True),
    # quoting styles and bare words
    ("bare-word-value", "Service.Meta.env == prod", HEALTH, True),
    ("backtick-raw-string", "Service.Meta.env == `prod`", HEALTH, True),
    ("raw-string-keeps-backslashes", r"Output matches `load \d\.\d`", CHECK, True),
    ("double-quoted-escape", r'Output == "load 1.5\nok"', CHECK, True),
    ("double-quoted-escaped-quote", r'Service.Service != "we\"b"', HEALTH, True),
    ("number-literal-against-string", "Service.Meta.version == 2.1", HEALTH, True),
    ("bare-dotted-word-value", "Host == web.example", {"Host": "web.example"}, True),
    ("no-spaces-around-equals", "Service.Meta.env==prod", HEALTH, True),
    # map selectors and index form
    ("index-form-map-key", 'Service.Meta["team-name"] == "edge"', HEALTH, True),
    ("index-form-backtick-key", "Service.Meta[`env`] == prod", HEALTH, True),
    ("index-form-with-spaces", 'Service.Meta[ "env" ] == prod', HEALTH, True),
    ("tagged-address", 'Node.TaggedAddresses.wan == "198.18.0.1"', HEALTH, True),
    ("map-key-in", '"env" in Service.Meta', HEALTH, True),
    ("map-key-contains", "Service.Meta contains version", HEALTH, True),
    ("map-key-not-in", '"owner" not in Service.Meta', HEALTH, True),
    ("map-is-not-empty", "Service.Meta is not empty", HEALTH, True),
    # missing map keys are absent, never an error
    ("missing-meta-key-equals", 'Service.Meta.owner == "x"', HEALTH, False),
    ("missing-meta-key-not-equals", 'Service.Meta.owner != "x"', HEALTH, True),
    ("missing-meta-key-is-empty", "Service.Meta.owner is empty", HEALTH, True),
    ("missing-meta-key-is-not-empty", "Service.Meta.owner is not empty", HEALTH, False),
    ("missing-meta-key-in", '"x" in Service.Meta.owner', HEALTH, False),
    ("missing-meta-key-not-in", '"x" not in Service.Meta.owner', HEALTH, True),
    ("missing-meta-key-matches", 'Service.Meta.owner matches "."', HEALTH, False),
    ("missing-meta-key-not-matches", 'Service.Meta.owner not matches "."', HEALTH, True),
    ("null-map-is-empty", "TaggedAddresses is empty", CATALOG, True),
    ("key-under-null-map", "TaggedAddresses.lan == x", CATALOG, False),
    ("omitted-top-level-meta", "NodeMeta.os == linux", AGENT, False),
    ("omitted-optional-field", 'Kind != "connect-proxy"', AGENT, True),
    ("omitted-optional-field-equals", 'Kind == "connect-proxy"', AGENT, False),
    (
        "empty-string-meta-value-is-empty",
        'Node.Meta["consul-network-segment"] is empty',
        HEALTH,
        True,
    ),
    # lists of strings
    ("tag-in", '"primary" in Service.Tags', HEALTH, True),
    ("tag-not-in", '"canary" not in Service.Tags', HEALTH, True),
    ("tag-contains", "Service.Tags contains v2", HEALTH, True),
    ("tag-not-contains", 'Service.Tags not contains "v2"', HEALTH, False),
    ("tag-with-space", '"with space" in Service.Tags', HEALTH, True),
    ("empty-list-is-empty", "ServiceTags is empty", CATALOG, True),
    ("list-is-not-empty", "Tags is not empty", AGENT, True),
    ("bare-value-in", "primary in Tags", AGENT, True),
    # strings: substring and regex
    ("substring-in", '"edi" in Service', AGENT, True),
    ("substring-contains", 'Service contains "dis"', AGENT, True),
    ("substring-not-contains", 'Service not contains "xyz"', AGENT, True),
    ("regex-is-unanchored", 'Service.Service matches "e"', HEALTH, True),
    ("regex-anchored", 'Service.Service matches "^w.b$"', HEALTH, True),
    ("regex-no-match", 'Service.Service matches "^db"', HEALTH, False),
    ("regex-not-matches", 'Service.Service not matches "^db"', HEALTH, True),
    ("string-is-empty", "Address is empty", AGENT, True),
    # lists of objects: any element may match
    ("any-check-critical", "Checks.Status == critical", HEALTH, True),
    ("any-check-maintenance", "Checks.Status == maintenance", HEALTH, False),
    ("any-check-not-passing", "Checks.Status != passing", HEALTH, True),
    ("any-check-tag-list", '"v2" in Checks.ServiceTags', HEALTH, True),
    ("any-check-name-matches", 'Checks.Name matches "^HT"', HEALTH, True),
    ("indexed-check", "Checks.0.Status == passing", HEALTH, True),
    ("indexed-check-out-of-range", "Checks.5.Status == passing", HEALTH, False),
    ("list-of-objects-is-not-empty", "Checks is not empty", HEALTH, True),
    # numbers and booleans are coerced to the field's type
    ("int-equals-number", "Service.Port == 8080", HEALTH, True),
    ("int-equals-quoted-number", 'Service.Port == "8080"', HEALTH, True),
    ("int-not-equals", "ServicePort != 9090", CATALOG, False),
    ("int-hex-literal", 'Port == "0x4d2"', AGENT, True),
    ("nested-int", "Service.Weights.Passing == 10", HEALTH, True),
    ("float-equals", "Ratio == 0.25", CHECK, True),
    ("float-equals-int-literal", "Ratio != 1", CHECK, True),
    ("bool-false", "Service.EnableTagOverride == false", HEALTH, True),
    ("bool-true", "ServiceEnableTagOverride == true", CATALOG, True),
    ("bool-go-spelling", 'ServiceEnableTagOverride == "T"', CATALOG, True),
    ("bool-not-equals", "ServiceEnableTagOverride != 0", CATALOG, True),
    ("number-as-string-value", "Service.Meta.version != 2", HEALTH, True),
    ("negative-number", "Service.Port != -1", HEALTH, True),
    # logic, precedence, parentheses
    ("and-both", "Service.Meta.env == prod and Service.Port == 8080", HEALTH, True),
    ("and-one-false", "Service.Meta.env == prod and Service.Port == 1", HEALTH, False),
    ("or-one-true", "Service.Meta.env == qa or Service.Port == 8080", HEALTH, True),
    ("not-negates", "not Service.Meta.env == qa", HEALTH, True),
    ("double-not", "not not Service.Meta.env == prod", HEALTH, True),
    ("not-binds-tighter-than-and", "not Service.Port == 8080 and Service.Port == 1", HEALTH, False),
    ("and-binds-tighter-than-or", "Port == 1 and Port == 2 or Port == 1234", AGENT, True),
    ("and-tighter-than-or-left", "Port == 1234 or Port == 2 and Port == 3", AGENT, True),
    ("parens-override", "(Port == 1234 or Port == 2) and Port == 3", AGENT, False),
    ("not-over-parens", "not (Port == 1 or Port == 2)", AGENT, True),
    ("nested-parens", "((Port == 1234))", AGENT, True),
    ("docs-precedence-example", "Port == 1 and not Port == 2 or Service == redis", AGENT, True),
    ("keyword-prefix-is-a-bare-word", "Meta.env == production and notable in Tags", AGENT, False),
    ("value-in-then-or", '"x" in Tags or Service == redis', AGENT, True),
]


@pytest.mark.parametrize(
    ("expression", "item", "expected"),
    [row[1:] for row in MATCHES],
    ids=[row[0] for row in MATCHES],
)
def test_it_evaluates_expressions_like_consul(expression, item, expected):
    assert keeps(expression, item) is expected


SYNTAX_ERRORS = [
    ("unterminated-double-quote", 'Service == "web', "unterminated string literal"),
    ("unterminated-backtick", "Service == `web", "unterminated string literal"),
    ("dangling-equals", "Service ==", 'expected a value after "=="'),
    ("dangling-and", "Service == web and", "expected an expression, found end of expression"),
    ("dangling-or", "or Service == web", 'expected an expression, found "or"'),
    ("dangling-not", "not", "expected an expression"),
    ("missing-operator", "Service web", 'expected an operator after selector "Service"'),
    ("single-equals", "Service = web", "unexpected character '='"),
    ("empty-parens", "()", "empty parentheses"),
    ("empty-parens-inside", "Port == 1 and ()", "empty parentheses"),
    ("unclosed-paren", "(Port == 1", 'unmatched "("'),
    ("unopened-paren", "Port == 1)", 'unmatched ")"'),
    ("is-without-empty", "Tags is full", 'expected "empty" after "is"'),
    ("not-without-operator", "Tags not empty", 'expected "contains" or "matches" after "not"'),
    ("in-needs-selector", '"x" in "Tags"', 'expected a selector after "in"'),
    ("value-without-in", '"x" == Tags', 'expected "in" or "not in"'),
    ("bad-number", "Port == 12abc", "invalid number literal"),
    ("leading-zero-number", "Port == 0123", "invalid number literal"),
    ("bad-escape", r'Service == "a\qb"', "invalid escape sequence"),
    ("unquoted-index", "Meta[env] == x", "invalid index"),
    ("unclosed-index", 'Meta["env" == x', "unclosed index expression"),
    ("trailing-dot", "Meta. == x", 'expected a field name after "."'),
    ("uppercase-keyword", "Port == 1 AND Port == 2", 'found "AND"'),
    ("two-expressions", "Port == 1 Port == 2", 'expected "and", "or" or end of expression'),
    ("empty-expression", "   ", "empty"),
    ("too-deep", "(" * 200 + "Port == 1" + ")" * 200, "nested too deeply"),
]


@pytest.mark.parametrize(
    ("expression", "message"),
    [row[1:] for row in SYNTAX_ERRORS],
    ids=[row[0] for row in SYNTAX_ERRORS],
)
def test_it_rejects_syntax_errors_with_a_clear_message(expression, message):
    with pytest.raises(FilterError, match="Syntax error") as excinfo:
        compile_filter(expression)
    assert message in str(excinfo.value)


EVALUATION_ERRORS = [
    ("unknown-top-level-selector", "Servce == web", AGENT, 'Selector "Servce" is not valid'),
    ("case-sensitive-field-names", "service == web", AGENT, 'Selector "service" is not valid'),
    ("unknown-selector-under-and", "Port == 1234 and Bogus == 1", AGENT, '"Bogus" is not valid'),
    ("select-into-number", "Port.x == 1", AGENT, 'Selector "Port.x" is not valid'),
    ("select-into-string-in-list", "Tags.x == 1", AGENT, 'Selector "Tags.x" is not valid'),
    ("int-field-non-numeric", "Port == abc", AGENT, 'Failed to coerce value "abc"'),
    ("int-field-float-literal", "Port == 1.5", AGENT, "not a valid integer"),
    ("bool-field-non-bool", "ServiceEnableTagOverride == yes", CATALOG, "not a valid boolean"),
    ("float-field-non-numeric", "Ratio == high", CHECK, "not a valid number"),
    ("int-list-element-coercion", '"x" in Ports', {"Ports": [1, 2]}, "not a valid integer"),
    ("equals-on-list", "Tags == primary", AGENT, 'Invalid match operator "==" for selector "Tags"'),
    ("equals-on-map", "Meta == x", AGENT, "(value is of type object)"),
    ("contains-on-number", "Port contains 1", AGENT, 'Invalid match operator "contains"'),
    ("in-on-list-of-objects", '"x" in Checks', HEALTH, 'Invalid match operator "in"'),
    ("matches-on-number", 'Port matches "1"', AGENT, 'Invalid match operator "matches"'),
    ("is-empty-on-number", "Port is empty", AGENT, 'Invalid match operator "is empty"'),
]


@pytest.mark.parametrize(
    ("expression", "item", "message"),
    [row[1:] for row in EVALUATION_ERRORS],
    ids=[row[0] for row in EVALUATION_ERRORS],
)
def test_it_rejects_invalid_selectors_and_values_when_evaluating(expression, item, message):
    keep = compile_filter(expression)  # these are well-formed, so compiling succeeds
    with pytest.raises(FilterError) as excinfo:
        keep(item)
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    "expression",
    ['Service matches "("', "Service not matches `[a-`", 'Service matches "a**"'],
)
def test_it_rejects_a_bad_regex_at_compile_time(expression):
    with pytest.raises(FilterError, match="Failed to compile regular expression"):
        compile_filter(expression)


def test_it_decodes_go_string_escapes():
    item = {"Name": 'tab\there "quoted" \\ é 😀 A'}
    assert keeps(r'Name == "tab\there \"quoted\" \\ \u00e9 \U0001F600 \x41"', item)


def test_it_treats_keywords_after_an_operator_as_bare_values():
    assert keeps("Meta.env == empty", {"Meta": {"env": "empty"}})


def test_filter_error_is_a_value_error_for_callers_that_map_it_to_400():
    assert issubclass(FilterError, ValueError)


def test_it_returns_every_item_when_there_is_no_filter():
    items = [AGENT, CATALOG]
    assert apply_filter(None, iter(items)) == items
    assert apply_filter("", items) == items


def test_it_keeps_only_matching_items_in_order():
    services = [
        {"ID": "redis1", "Tags": ["primary"], "Meta": {"env": "production"}},
        {"ID": "redis2", "Tags": ["secondary"], "Meta": {"env": "production"}},
        {"ID": "redis3", "Tags": ["primary"], "Meta": {"env": "qa"}},
    ]
    kept = apply_filter('Meta.env == production and "primary" in Tags or ID == redis3', services)
    assert [s["ID"] for s in kept] == ["redis1", "redis3"]


def test_it_does_not_fail_on_an_unknown_selector_when_there_are_no_items():
    assert apply_filter("Bogus == 1", []) == []


def test_compile_filter_returns_a_reusable_filter():
    keep = compile_filter("Port == 1234")
    assert isinstance(keep, Filter)
    assert keep(AGENT) and not keep({**AGENT, "Port": 1})
    assert "Port == 1234" in repr(keep)


def test_it_filters_ten_thousand_items_quickly():
    items = [
        {
            "Service": {"Service": f"svc-{i}", "Tags": ["a", "b"], "Meta": {"shard": str(i % 10)}},
            "Checks": [{"Status": "passing"}, {"Status": "critical" if i % 3 else "passing"}],
        }
        for i in range(10_000)
    ]
    expression = (
        'Service.Meta.shard == "3" and "b" in Service.Tags and '
        'Service.Service matches "svc-[0-9]*3$" and not Checks.Status == critical'
    )
    started = time.perf_counter()
    kept = apply_filter(expression, items)
    elapsed = time.perf_counter() - started
    assert [item["Service"]["Service"] for item in kept][:2] == ["svc-3", "svc-33"]
    assert elapsed < 1.0


# --- hostile filters: linear-time matching and bounded work (issue 12, finding 1) ---------


@pytest.mark.parametrize(
    "expression, item",
    [
        (
            'Output matches "^(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)Z"',
            {"Output": "x" * 20_000},
        ),
        ('Meta.x matches "(a+)+$"', {"Meta": {"x": "a" * 28 + "!"}}),
        ('Meta.x matches "(a|aa)*c"', {"Meta": {"x": "a" * 5_000}}),
    ],
)
def test_catastrophic_patterns_run_in_linear_time(expression, item):
    started = time.perf_counter()
    assert apply_filter(expression, [item] * 50) == []
    # Python's backtracking `re` takes many seconds on each of these; RE2 microseconds.
    assert time.perf_counter() - started < 2.0


def test_matches_uses_go_regexp_syntax_and_semantics():
    # `$` is the end of the text (Go), not "before a final newline" (Python's re).
    assert apply_filter('Output matches "ok$"', [{"Output": "ok\n"}]) == []
    assert apply_filter(r"Output matches `\pL+\d`", [{"Output": "é1"}]) == [{"Output": "é1"}]
    assert apply_filter('Output matches "(?i)^OK"', [{"Output": "ok"}]) == [{"Output": "ok"}]


@pytest.mark.parametrize("pattern", [r"(a)\1", "(?=a)", r"a\Z", "(?<=a)b"])
def test_perl_only_constructs_are_refused_as_consul_does(pattern):
    with pytest.raises(FilterError, match="Failed to compile regular expression"):
        compile_filter(f"Output matches `{pattern}`")


def test_a_pattern_past_its_length_bound_is_refused():
    compile_filter(f'Output matches "{"a" * MAX_PATTERN_LENGTH}"')
    with pytest.raises(FilterTooExpensive, match=f"at most {MAX_PATTERN_LENGTH}"):
        compile_filter(f'Output matches "{"a" * (MAX_PATTERN_LENGTH + 1)}"')


def test_an_expression_past_its_size_bounds_is_refused():
    clauses = " or ".join(["Port == 1"] * (MAX_CLAUSES + 1))
    with pytest.raises(FilterTooExpensive, match=f"more than {MAX_CLAUSES} match expressions"):
        compile_filter(clauses)
    compile_filter(" or ".join(["Port == 1"] * MAX_CLAUSES))
    with pytest.raises(FilterTooExpensive, match=f"at most {MAX_EXPRESSION_LENGTH}"):
        compile_filter("Port == " + "1" * MAX_EXPRESSION_LENGTH)


def test_evaluation_stops_at_its_budget_with_a_clear_error():
    items = [{"Checks": [{"Output": "x" * 1000} for _ in range(20)]} for _ in range(100)]
    expression = 'Checks.Output matches "y"'
    assert apply_filter(expression, items, budget=None) == []
    with pytest.raises(FilterTooExpensive, match="more than 500 evaluation steps"):
        apply_filter(expression, items, budget=500)


def test_a_compiled_filter_without_a_budget_is_unbounded():
    keep = compile_filter("Port == 1")
    assert all(not keep({"Port": 2}) for _ in range(10_000))
