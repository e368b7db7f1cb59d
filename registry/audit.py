"""Who is making the current write, carried to the service layer.

API entry points (`/v1` endpoints, `/api` views, the UI) open an audit scope
with the caller's identity; every `Change` committed inside it writes its
audit entries in the same transaction as the data. Writes made by background
work (check results, expiries) run outside any scope and are not audited.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Actor:
    id: str  # an ACL token accessor ID, or "user:<name>" for UI users
    name: str = ""
    via: str = "v1"  # v1 | api | ui | cli


@dataclass
class Scope:
    actor: Actor
    action: str
    method: str = ""
    path: str = ""
    body: Any = None
    recorded: bool = field(default=False)


_current: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("mesh_audit", default=None)


def current() -> Scope | None:
    return _current.get()


@contextlib.contextmanager
def scope(actor: Actor, action: str, method: str = "", path: str = "") -> Iterator[Scope]:
    s = Scope(actor, action, method, path)
    token = _current.set(s)
    try:
        yield s
    finally:
        _current.reset(token)


def note_body(body: Any) -> None:
    """Remember the decoded request body for entries that carry no explicit state."""
    s = _current.get()
    if s is not None and s.body is None:
        s.body = body


def jsonable(value: Any) -> Any:
    """Audit state must be JSON: bytes become a note of their size."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
