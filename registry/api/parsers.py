"""The `/api` JSON parser: DRF's, with the body rules every request body follows.

DRF's own `JSONParser` lets a deeply nested body raise `RecursionError` (a 500)
and accepts NaN; this one parses with `meshproto.registration.decode.parse_json`,
the one home of those rules, so `/api` and `/v1` refuse the same bodies with a 400.
"""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from meshproto.registration.decode import DecodeError, parse_json


class BodyParseError(ParseError):
    """A body `parse_json` refused; `field` names where (rendered in `fields`)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"JSON parse error - {field or 'body'}: {reason}")
        self.field, self.reason = field or "body", reason


class MeshJSONParser(JSONParser):
    """`application/json` bodies, parsed by `parse_json` (depth, NaN, number range, NUL)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        raw = stream.read() if stream is not None else b""
        try:
            data = parse_json(raw)
        except DecodeError as exc:
            raise BodyParseError(exc.path, exc.message) from None
        if data is None:
            raise BodyParseError("body", "expected JSON, got an empty body")
        return data
