"""Putting a service-layer refusal next to the form field it is about.

Validation itself is the domain's (the same validators as the API); this
only decides where on the form its message is shown.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshproto.registration.decode import DecodeError, parse_json
from registry.errors import BadRequest


def field_for(message: str, fields: Iterable[tuple[str, tuple[str, ...]]]) -> str:
    """The first form field whose hints appear in `message` ("" for the whole form)."""
    lowered = message.lower()
    for name, hints in fields:
        if any(h.lower() in lowered for h in hints):
            return name
    return ""


def json_field(text: str, what: str) -> object:
    """A JSON form field parsed as every body is (`parse_json`); BadRequest names the field."""
    if not text.strip():
        return None
    try:
        return parse_json(text, what)
    except DecodeError as err:
        raise BadRequest(f"{what}: {err}") from None
