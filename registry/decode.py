"""The control plane's adapter onto `meshproto.registration.decode`.

The decoder and Consul's field tables live there (shared with the agent);
here they are only made to speak the control plane's errors: a refused
value is `BadRequest` ("Request decode failed: <field>: ..."), a 400 naming
the field on `/v1` and `/api` alike.
"""

from __future__ import annotations

from typing import Any

from meshproto.durations import format_duration, parse_duration  # noqa: F401 - re-exported
from meshproto.registration import decode as pure
from meshproto.registration.decode import (  # noqa: F401 - the field decoders, re-exported
    STRICT,
    Anything,
    Bool,
    DecodeError,
    Duration,
    Int,
    IntIn,
    Lazy,
    ListOf,
    MapOf,
    Mode,
    Seconds,
    Str,
)
from registry.errors import BadRequest


def bad_request(exc: DecodeError) -> BadRequest:
    """The 400 a refused value answers with."""
    return BadRequest(f"Request decode failed: {exc}")


class Struct(pure.Struct):
    """`meshproto`'s Struct, raising BadRequest."""

    def __call__(self, value: Any, path: str = "", mode: Mode = STRICT) -> dict:
        try:
            return super().__call__(value, path, mode)
        except DecodeError as exc:
            raise bad_request(exc) from None


def _adapted(table: pure.Struct) -> Struct:
    adapted = Struct({})
    adapted.fields, adapted._by_fold = table.fields, table._by_fold  # noqa: SLF001
    return adapted


def parse_body_json(body: bytes) -> Any:
    """A JSON body (None when empty), with a 400 for bad bytes, syntax or depth."""
    try:
        return pure.parse_json(body)
    except DecodeError as exc:
        raise bad_request(exc) from None


AGENT_SERVICE = _adapted(pure.AGENT_SERVICE)
AGENT_CHECK = _adapted(pure.AGENT_CHECK)
SYNC_CHECK = _adapted(pure.SYNC_CHECK)
CATALOG_REGISTER = _adapted(pure.CATALOG_REGISTER)
CATALOG_DEREGISTER = _adapted(pure.CATALOG_DEREGISTER)
CHECK_UPDATE = _adapted(pure.CHECK_UPDATE)
