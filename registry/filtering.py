"""Consul's ``?filter=`` expression language (HashiCorp go-bexpr, as Consul uses it).

Consul clients send filters such as ``Service.Meta.version == "2" and "primary" in
Service.Tags``; we must accept the same text and select the same items, so this module
follows go-bexpr's grammar and evaluation rules. It is pure Python so that every
registry endpoint (and tests) can use it without Django.

Grammar (``not`` binds tighter than ``and``, which binds tighter than ``or``)::

    expression := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | "(" or ")" | match
    match      := selector ("==" | "!=") value
                | selector ["not"] ("contains" | "matches") value
                | selector "is" ["not"] "empty"
                | value ["not"] "in" selector
    selector   := ident ("." ident | "." digits | "[" string "]")*
    ident      := [A-Za-z][A-Za-z0-9_]*
    value      := string | number | bare word (a selector-shaped word, taken literally)
    string     := '"' chars with Go escapes '"' | '`' raw chars '`'
    number     := ["-"] ("0" | [1-9][0-9]*) ["." digits]

Evaluation rules (go-bexpr's, adapted to JSON-shaped dicts):

* A literal is kept as text and converted to the type of the value it is compared with:
  ``Port == "8080"`` and ``Port == 8080`` are the same; ``Port == abc`` is a FilterError.
  Booleans accept Go's spellings (``true``, ``True``, ``t``, ``1``, ``false``, ...).
* ``x in Sel`` and ``Sel contains x`` are the same test: substring for a string, element
  equality for a list, key membership for an object (map).
* ``matches`` is an unanchored regular-expression search (Go's ``regexp.Match``) with
  RE2 syntax, as Go's ``regexp`` (``google-re2``): matching runs in time linear in the
  text whatever the pattern, so ``(a+)+$`` cannot take a server down. The pattern is
  compiled once, when the filter is compiled; a construct RE2 lacks (backreferences,
  lookaround) is a FilterError, as it is in Consul.
* When a selector walks through a list and still has names left (``Checks.Status``), the
  rest of the match is tried on every element and is true if any element matches; an
  empty list matches nothing. A numeric part (``Checks.0.Status``) indexes the list.
* Missing keys. A missing top-level key is a FilterError (``Selector "X" is not valid``,
  Consul's message for a field the type does not have) unless the name ends in ``Meta``
  or is in ``_MAY_BE_OMITTED`` (fields Consul leaves out of its JSON when empty). Below
  the top level, a missing key (a map key such as ``Meta.env``, or an omitted nested
  field) and a JSON ``null`` mean "absent": ``==``, ``in``, ``contains``, ``matches`` and
  ``is not empty`` are false; ``!=``, ``not in``, ``not contains``, ``not matches`` and
  ``is empty`` are true.
* Selecting into a scalar (``Port.x``), or using an operator the value's type does not
  support (``Tags == "x"``, ``Port contains 1``), is a FilterError.
* Unknown selectors are found while evaluating, so filtering an empty list never fails,
  and a branch skipped by ``and``/``or`` short-circuiting is not checked.

Deviations from go-bexpr: ``\\"`` is accepted inside double-quoted strings; JSON-pointer
selectors (``"/a/b"``) and ``<``/``>`` comparisons of newer go-bexpr are not supported.

Bounds. ``?filter=`` is open to anonymous callers, so one request's filter work is
bounded: the expression's length (``MAX_EXPRESSION_LENGTH``), its number of match
clauses (``MAX_CLAUSES``), its nesting (``MAX_NESTING``), each pattern's length
(``MAX_PATTERN_LENGTH``), and the work of evaluating it over a listing (``Budget``: one
step per match test, plus one per ``REGEX_BYTES_PER_STEP`` bytes a pattern scans).
Past any bound the filter is refused with a FilterError naming the bound (a 400).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import re2

__all__ = [
    "Budget",
    "Filter",
    "FilterError",
    "FilterTooExpensive",
    "apply_filter",
    "compile_filter",
]

Predicate = Callable[[Mapping[str, Any]], bool]

# Top-level fields Consul omits from its JSON when empty (Go `json:",omitempty"`), so an
# item lacking one is not evidence of a typo. Names ending in "Meta" are always allowed.
_MAY_BE_OMITTED = frozenset(
    {
        "TaggedAddresses",
        "ServiceTaggedAddresses",
        "Kind",
        "Proxy",
        "Connect",
        "Namespace",
        "Partition",
        "PeerName",
        "Locality",
        "ServiceLocality",
        "SocketPath",
        "Datacenter",
        "Weights",
        "ContentHash",
        "Definition",
        "ExposedPort",
        "Type",
        "Interval",
        "Timeout",
        "CreateIndex",
        "ModifyIndex",
    }
)

# strconv.ParseBool's accepted spellings.
_GO_BOOLS = {
    "1": True,
    "t": True,
    "T": True,
    "TRUE": True,
    "true": True,
    "True": True,
    "0": False,
    "f": False,
    "F": False,
    "FALSE": False,
    "false": False,
    "False": False,
}

_KEYWORDS = frozenset({"and", "or", "not", "in", "contains", "matches", "is", "empty"})
MAX_NESTING = 32  # parentheses and `not`s; also keeps the parser far from Python's recursion limit
MAX_EXPRESSION_LENGTH = 4096  # characters
MAX_CLAUSES = 64  # match expressions (`Sel == v`, `Sel matches "re"`, ...) in one filter
MAX_PATTERN_LENGTH = 1024  # characters of one `matches` pattern
DEFAULT_BUDGET = 2_000_000  # steps one request's filter may take over a whole listing
REGEX_BYTES_PER_STEP = 256  # a regex search costs one step, plus one per this many bytes
_REGEX_MAX_MEM = 8 << 20  # RE2's compiled-program memory cap for one pattern

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.never_capture = True  # a yes/no search needs no submatches: RE2's fastest path
_RE2_OPTIONS.log_errors = False  # a bad pattern is the caller's 400, not a line on stderr
_RE2_OPTIONS.max_mem = _REGEX_MAX_MEM

_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_DIGITS = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_SPACE = " \t\r\n"

_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
}


class FilterError(ValueError):
    """Raised for a syntax error or an invalid selector; str(e) is a clear message naming the problem (shown to API users as a 400)."""


class FilterTooExpensive(FilterError):
    """The filter passed one of the bounds above (size, nesting, pattern, budget)."""


class Budget:
    """The steps a filter may still take; shared by every test of one compiled filter.

    A compiled ``Filter`` serves one request, so a plain counter is enough (no lock).
    """

    __slots__ = ("left", "total")

    def __init__(self, steps: int | None) -> None:
        self.total = steps
        self.left = steps if steps is not None else -1

    def spend(self, steps: int) -> None:
        """Take ``steps``; raises FilterTooExpensive once the budget is gone."""
        if self.total is None:
            return
        self.left -= steps
        if self.left < 0:
            raise FilterTooExpensive(
                f"the filter needs more than {self.total} evaluation steps over this listing; "
                "use a narrower expression or fewer `matches` clauses"
            )


# --------------------------------------------------------------------------- tokenizer


class _Token:
    """One lexical unit; ``value`` is the decoded string, path tuple or number text."""

    __slots__ = ("kind", "value", "pos")

    def __init__(self, kind: str, value: Any, pos: int) -> None:
        self.kind = kind  # "(", ")", "==", "!=", "string", "number", "selector", "keyword", "end"
        self.value = value
        self.pos = pos

    def describe(self) -> str:
        """Name the token the way an error message should show it."""
        if self.kind == "end":
            return "end of expression"
        if self.kind == "string":
            return f"string {_quote(self.value)}"
        if self.kind == "number":
            return f"number {self.value}"
        if self.kind == "selector":
            return f'"{_join(self.value)}"'
        if self.kind == "keyword":
            return f'"{self.value}"'
        return f'"{self.kind}"'


def _syntax_error(message: str, pos: int) -> FilterError:
    return FilterError(f"Syntax error at character {pos + 1}: {message}")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _join(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _tokenize(source: str) -> list[_Token]:
    """Split the expression into tokens, rejecting anything go-bexpr would not lex."""
    tokens: list[_Token] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        if ch in _SPACE:
            i += 1
        elif ch in "()":
            tokens.append(_Token(ch, ch, i))
            i += 1
        elif source.startswith("==", i) or source.startswith("!=", i):
            tokens.append(_Token(source[i : i + 2], source[i : i + 2], i))
            i += 2
        elif ch in '"`':
            text, end = _lex_string(source, i)
            tokens.append(_Token("string", text, i))
            i = end
        elif ch == "-" or ch.isdigit():
            match = _NUMBER.match(source, i)
            end = match.end() if match else i + 1
            if not match or (end < n and source[end] not in _SPACE + ")"):
                raise _syntax_error("invalid number literal", i)
            tokens.append(_Token("number", match.group(), i))
            i = end
        elif _IDENT.match(source, i):
            path, end = _lex_selector(source, i)
            if len(path) == 1 and path[0] in _KEYWORDS:
                tokens.append(_Token("keyword", path[0], i))
            else:
                tokens.append(_Token("selector", path, i))
            i = end
        else:
            raise _syntax_error(f"unexpected character {ch!r}", i)
    tokens.append(_Token("end", None, n))
    return tokens


def _lex_selector(source: str, start: int) -> tuple[tuple[str, ...], int]:
    """Read ``a.b.0["key"]``; bracketed keys allow map keys that are not identifiers."""
    match = _IDENT.match(source, start)
    assert match is not None
    path = [match.group()]
    i = match.end()
    while i < len(source):
        if source[i] == ".":
            part = _IDENT.match(source, i + 1) or _DIGITS.match(source, i + 1)
            if not part:
                raise _syntax_error('expected a field name after "."', i + 1)
            path.append(part.group())
            i = part.end()
        elif source[i] == "[":
            j = _skip_space(source, i + 1)
            if j >= len(source) or source[j] not in '"`':
                raise _syntax_error('invalid index: expected a quoted key after "["', j)
            key, j = _lex_string(source, j)
            j = _skip_space(source, j)
            if j >= len(source) or source[j] != "]":
                raise _syntax_error('unclosed index expression: expected "]"', j)
            path.append(key)
            i = j + 1
        else:
            break
    return tuple(path), i


def _skip_space(source: str, i: int) -> int:
    while i < len(source) and source[i] in _SPACE:
        i += 1
    return i


def _lex_string(source: str, start: int) -> tuple[str, int]:
    """Decode a quoted string starting at ``start``; returns (text, index after it)."""
    quote = source[start]
    if quote == "`":
        end = source.find("`", start + 1)
        if end < 0:
            raise _syntax_error("unterminated string literal", start)
        return source[start + 1 : end].replace("\r", ""), end + 1  # Go drops \r in raw strings

    out: list[str] = []
    i = start + 1
    while i < len(source):
        ch = source[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\n":
            raise _syntax_error("newline in string literal", i)
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        text, i = _lex_escape(source, i)
        out.append(text)
    raise _syntax_error("unterminated string literal", start)


def _lex_escape(source: str, i: int) -> tuple[str, int]:
    """Decode the Go escape sequence at ``source[i] == "\\"``."""
    kind = source[i + 1] if i + 1 < len(source) else ""
    if kind in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[kind], i + 2
    digits_needed = {"x": 2, "u": 4, "U": 8}.get(kind)
    if digits_needed:
        digits = source[i + 2 : i + 2 + digits_needed]
        if len(digits) == digits_needed and all(c in "0123456789abcdefABCDEF" for c in digits):
            code = int(digits, 16)
            if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF:
                return chr(code), i + 2 + digits_needed
    elif kind and kind in "01234567":
        digits = source[i + 1 : i + 4]
        if len(digits) == 3 and all(c in "01234567" for c in digits) and int(digits, 8) < 256:
            return chr(int(digits, 8)), i + 4
    raise _syntax_error(f"invalid escape sequence {source[i : i + 2]!r} in string literal", i)


# ---------------------------------------------------------------------------- literals

_INVALID = object()
_MISSING = object()


def _parse_int(raw: str) -> Any:
    if raw != raw.strip():
        return _INVALID
    try:
        return int(raw, 0)  # like strconv.ParseInt(raw, 0, 64): 0x.., 0o.., 0b.. prefixes
    except ValueError:
        return _INVALID


def _parse_float(raw: str) -> Any:
    if raw != raw.strip():
        return _INVALID
    try:
        return float(raw)
    except ValueError:
        return _INVALID


class _Literal:
    """The raw text of a value plus its conversions, worked out once at compile time."""

    __slots__ = ("raw", "as_bool", "as_int", "as_float")

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self.as_bool = _GO_BOOLS.get(raw, _INVALID)
        self.as_int = _parse_int(raw)
        self.as_float = _parse_float(raw)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


# ------------------------------------------------------------------------ match tests
# Each builder returns a test for a value that is present; absence is handled by _bind.


def _equals(selector: str, op: str, literal: _Literal) -> Callable[[Any], bool]:
    raw = literal.raw

    def convert(converted: Any, kind: str) -> Any:
        if converted is _INVALID:
            raise FilterError(
                f"Failed to coerce value {_quote(raw)} for selector {_quote(selector)}: "
                f"not a valid {kind}"
            )
        return converted

    def test(value: Any) -> bool:
        if isinstance(value, str):
            return value == raw
        if isinstance(value, bool):
            return value == convert(literal.as_bool, "boolean")
        if isinstance(value, int):
            return value == convert(literal.as_int, "integer")
        if isinstance(value, float):
            return value == convert(literal.as_float, "number")
        raise _unsupported(op, selector, value)

    return test


def _contains(selector: str, op: str, literal: _Literal) -> Callable[[Any], bool]:
    raw = literal.raw
    element_equals = _equals(selector, op, literal)

    def test(value: Any) -> bool:
        if isinstance(value, str | Mapping):
            return raw in value  # substring, or key membership for a map
        if isinstance(value, list | tuple):
            return any(element is not None and element_equals(element) for element in value)
        raise _unsupported(op, selector, value)

    return test


def _is_empty(selector: str, op: str) -> Callable[[Any], bool]:
    def test(value: Any) -> bool:
        if isinstance(value, str | Mapping | list | tuple):
            return len(value) == 0
        raise _unsupported(op, selector, value)

    return test


def _matches(selector: str, op: str, pattern: Any, budget: Budget) -> Callable[[Any], bool]:
    search = pattern.search
    spend = budget.spend

    def test(value: Any) -> bool:
        if isinstance(value, str):
            spend(len(value) // REGEX_BYTES_PER_STEP)  # the step of the test itself: _bind
            return search(value) is not None
        raise _unsupported(op, selector, value)

    return test


def _unsupported(op: str, selector: str, value: Any) -> FilterError:
    return FilterError(
        f'Invalid match operator "{op}" for selector {_quote(selector)} '
        f"(value is of type {_type_name(value)})"
    )


def _negate(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: not test(value)


def _compile_regex(raw: str) -> Any:
    """Compile with RE2 (Go's syntax and linear-time matching)."""
    if len(raw) > MAX_PATTERN_LENGTH:
        raise FilterTooExpensive(
            f"regular expression is {len(raw)} characters long; at most {MAX_PATTERN_LENGTH} "
            "are allowed"
        )
    try:
        return re2.compile(raw, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise FilterError(f"Failed to compile regular expression {_quote(raw)}: {reason}") from None


def _build_match(
    path: tuple[str, ...], op: str, literal: _Literal | None, budget: Budget
) -> Predicate:
    """Turn one match expression into a predicate over an item."""
    selector = _join(path)
    if op in ("is empty", "is not empty"):
        test = _is_empty(selector, op)
        when_absent = True  # an absent value is empty, like a nil map or slice in Go
    else:
        assert literal is not None
        if op in ("==", "!="):
            test = _equals(selector, op, literal)
        elif op.endswith("matches"):
            test = _matches(selector, op, _compile_regex(literal.raw), budget)
        else:  # in, not in, contains, not contains
            test = _contains(selector, op, literal)
        when_absent = False
    if op in ("!=", "is not empty") or op.startswith("not "):
        test = _negate(test)
        when_absent = not when_absent
    return _bind(path, test, when_absent, budget)


def _bind(
    path: tuple[str, ...], test: Callable[[Any], bool], when_absent: bool, budget: Budget
) -> Predicate:
    """Walk ``path`` into an item and apply ``test``; see the module docstring for rules."""
    root = path[0]
    root_may_be_missing = root.endswith("Meta") or root in _MAY_BE_OMITTED
    rest = path[1:]
    indexes = tuple(int(part) if part.isascii() and part.isdigit() else None for part in rest)
    selector = _join(path)
    spend = budget.spend

    def walk(value: Any, depth: int) -> bool:
        spend(1)
        while depth < len(rest):
            if value is None:
                return when_absent
            if isinstance(value, Mapping):
                value = value.get(rest[depth], _MISSING)
                if value is _MISSING:
                    return when_absent
            elif isinstance(value, list | tuple):
                index = indexes[depth]
                if index is None:  # any element may match the rest of the selector
                    return any(walk(element, depth) for element in value)
                if index >= len(value):
                    return when_absent
                value = value[index]
            else:
                walked = _join((root, *rest[:depth]))
                raise FilterError(
                    f"Selector {_quote(selector)} is not valid: {_quote(walked)} holds a "
                    f"{_type_name(value)}, which has no fields"
                )
            depth += 1
        if value is None:
            return when_absent
        return test(value)

    def predicate(item: Mapping[str, Any]) -> bool:
        value = item.get(root, _MISSING)
        if value is _MISSING:
            if root_may_be_missing:
                return when_absent
            raise FilterError(f"Selector {_quote(root)} is not valid")
        return walk(value, 0)

    return predicate


def _all_of(predicates: list[Predicate]) -> Predicate:
    def predicate(item: Mapping[str, Any]) -> bool:
        return all(each(item) for each in predicates)

    return predicate


def _any_of(predicates: list[Predicate]) -> Predicate:
    def predicate(item: Mapping[str, Any]) -> bool:
        return any(each(item) for each in predicates)

    return predicate


def _not(inner: Predicate) -> Predicate:
    return lambda item: not inner(item)


# ------------------------------------------------------------------------------ parser


class _Parser:
    """Recursive-descent parser that returns closures instead of an AST."""

    def __init__(self, tokens: list[_Token], budget: Budget) -> None:
        self.tokens = tokens
        self.index = 0
        self.nesting = 0
        self.clauses = 0
        self.budget = budget

    def match(
        self, path: tuple[str, ...], op: str, literal: _Literal | None, at: _Token
    ) -> Predicate:
        """One match expression, counted against MAX_CLAUSES."""
        self.clauses += 1
        if self.clauses > MAX_CLAUSES:
            raise FilterTooExpensive(
                f"the filter has more than {MAX_CLAUSES} match expressions "
                f"(the one at character {at.pos + 1} is one too many)"
            )
        return _build_match(path, op, literal, self.budget)

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]

    def advance(self) -> _Token:
        token = self.peek()
        self.index += 1
        return token

    def at_keyword(self, word: str, ahead: int = 0) -> bool:
        token = self.peek(ahead)
        return token.kind == "keyword" and token.value == word

    def parse(self) -> Predicate:
        predicate = self.parse_or()
        token = self.peek()
        if token.kind != "end":
            if token.kind == ")":
                raise _syntax_error('unmatched ")"', token.pos)
            raise _syntax_error(
                f'expected "and", "or" or end of expression, found {token.describe()}', token.pos
            )
        return predicate

    def parse_or(self) -> Predicate:
        operands = [self.parse_and()]
        while self.at_keyword("or"):
            self.advance()
            operands.append(self.parse_and())
        return operands[0] if len(operands) == 1 else _any_of(operands)

    def parse_and(self) -> Predicate:
        operands = [self.parse_not()]
        while self.at_keyword("and"):
            self.advance()
            operands.append(self.parse_not())
        return operands[0] if len(operands) == 1 else _all_of(operands)

    def parse_not(self) -> Predicate:
        token = self.peek()
        if token.kind == "keyword" and token.value == "not":
            self.advance()
            return _not(self.nested(self.parse_not, token))
        if token.kind == "(":
            self.advance()
            if self.peek().kind == ")":
                raise _syntax_error("empty parentheses: expected an expression inside", token.pos)
            inner = self.nested(self.parse_or, token)
            closing = self.peek()
            if closing.kind != ")":
                raise _syntax_error(
                    f'unmatched "(": expected ")", found {closing.describe()}', closing.pos
                )
            self.advance()
            return inner
        return self.parse_match()

    def nested(self, parse: Callable[[], Predicate], opener: _Token) -> Predicate:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise _syntax_error("expression is nested too deeply", opener.pos)
        try:
            return parse()
        finally:
            self.nesting -= 1

    def parse_match(self) -> Predicate:
        token = self.peek()
        if token.kind == "selector" and not self.starts_in_operator(1):
            return self.parse_selector_first()
        if token.kind in ("selector", "string", "number"):
            literal = self.parse_value("the start of the expression")
            op_token = self.peek()
            if self.at_keyword("not") and self.at_keyword("in", 1):
                self.advance()
                self.advance()
                op = "not in"
            elif self.at_keyword("in"):
                self.advance()
                op = "in"
            else:
                raise _syntax_error(
                    f'expected "in" or "not in" after a value, found {op_token.describe()}',
                    op_token.pos,
                )
            selector = self.peek()
            if selector.kind != "selector":
                raise _syntax_error(
                    f'expected a selector after "{op}", found {selector.describe()}', selector.pos
                )
            self.advance()
            return self.match(selector.value, op, literal, selector)
        raise _syntax_error(f"expected an expression, found {token.describe()}", token.pos)

    def starts_in_operator(self, ahead: int) -> bool:
        return self.at_keyword("in", ahead) or (
            self.at_keyword("not", ahead) and self.at_keyword("in", ahead + 1)
        )

    def parse_selector_first(self) -> Predicate:
        path = self.advance().value
        token = self.peek()
        if token.kind in ("==", "!="):
            self.advance()
            return self.match(path, token.kind, self.parse_value(f'"{token.kind}"'), token)
        if token.kind == "keyword":
            if token.value in ("contains", "matches"):
                self.advance()
                return self.match(path, token.value, self.parse_value(f'"{token.value}"'), token)
            if token.value == "not":
                self.advance()
                word = self.peek()
                if word.kind == "keyword" and word.value in ("contains", "matches"):
                    self.advance()
                    op = f"not {word.value}"
                    return self.match(path, op, self.parse_value(f'"{op}"'), word)
                raise _syntax_error(
                    f'expected "contains" or "matches" after "not", found {word.describe()}',
                    word.pos,
                )
            if token.value == "is":
                self.advance()
                op = "is empty"
                if self.at_keyword("not"):
                    self.advance()
                    op = "is not empty"
                word = self.peek()
                if word.kind != "keyword" or word.value != "empty":
                    raise _syntax_error(
                        f'expected "empty" after "{op[:-6]}", found {word.describe()}', word.pos
                    )
                self.advance()
                return self.match(path, op, None, token)
        raise _syntax_error(
            f'expected an operator after selector "{_join(path)}", found {token.describe()}',
            token.pos,
        )

    def parse_value(self, after: str) -> _Literal:
        token = self.peek()
        if token.kind in ("string", "number", "keyword"):
            self.advance()
            return _Literal(token.value)
        if token.kind == "selector":  # a bare word such as `passing` or `a.b`
            self.advance()
            return _Literal(_join(token.value))
        raise _syntax_error(f"expected a value after {after}, found {token.describe()}", token.pos)


# -------------------------------------------------------------------------- public API


class Filter:
    """A compiled filter: call it on an item to learn whether the item is kept."""

    __slots__ = ("expression", "budget", "_predicate")

    def __init__(self, expression: str, predicate: Predicate, budget: Budget) -> None:
        self.expression = expression
        self.budget = budget
        self._predicate = predicate

    def __call__(self, item: Mapping[str, Any]) -> bool:
        return self._predicate(item)

    def __repr__(self) -> str:
        return f"Filter({self.expression!r})"


def compile_filter(expression: str, budget: int | None = None) -> Filter:
    """Parse ``expression`` once so it can be applied to many items cheaply.

    ``budget`` bounds the steps all calls of the returned filter may take together
    (None: unbounded, for operator-written filters such as a resolver's subset).
    Raises FilterError (FilterTooExpensive past a size bound).
    """
    if not expression.strip():
        raise FilterError("Syntax error: the filter expression is empty")
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise FilterTooExpensive(
            f"the filter is {len(expression)} characters long; at most "
            f"{MAX_EXPRESSION_LENGTH} are allowed"
        )
    meter = Budget(budget)
    return Filter(expression, _Parser(_tokenize(expression), meter).parse(), meter)


def apply_filter(
    expression: str | None, items: Iterable[Mapping], budget: int | None = DEFAULT_BUDGET
) -> list:
    """Return the items the filter keeps; no filter (None or "") keeps them all.

    The whole evaluation is bounded by ``budget`` steps (see the module docstring).
    """
    if not expression:
        return list(items)
    keep = compile_filter(expression, budget)
    return [item for item in items if keep(item)]
