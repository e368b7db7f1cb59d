"""`/api`'s JSON body parser: the registration decoder's `parse_json`.

So `/api` bodies have the bounds `/v1` bodies have (nesting depth, no NaN or
Infinity) and a refused body is a JSON 400 (`ParseError`), never a
`RecursionError` 500.
"""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from meshproto.registration.decode import DecodeError, parse_json


class BoundedJSONParser(JSONParser):
    """DRF's JSONParser, parsing with `meshproto.registration.decode.parse_json`."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        body = stream.read() if stream is not None else b""
        try:
            data = parse_json(body)
        except DecodeError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        if data is None:
            raise ParseError("body: expected JSON, got an empty body")
        return data
