"""The `/api` JSON parser: DRF's, with the body rules every request body follows.

DRF's own `JSONParser` lets a deeply nested body raise `RecursionError` (a 500)
and accepts NaN; this one parses with `registry.decode.load_json`, the one home
of those rules, so `/api` and `/v1` refuse the same bodies with a 400.
"""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from registry.decode import JSONError, load_json


class BodyParseError(ParseError):
    """A body `load_json` refused; `field` names where (rendered in `fields`)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(
            f"JSON parse error - {field}: {reason}" if field else f"JSON parse error - {reason}"
        )
        self.field, self.reason = field or "body", reason


class MeshJSONParser(JSONParser):
    """`application/json` bodies, parsed by `load_json` (depth, NaN, number range)."""

    def parse(self, stream, media_type: str | None = None, parser_context: Any = None) -> Any:
        raw = stream.read() if stream is not None else b""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError("JSON parse error - body is not valid UTF-8") from None
        try:
            return load_json(text)
        except JSONError as exc:
            raise BodyParseError(exc.field, exc.reason) from None
