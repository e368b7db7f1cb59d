"""Errors the service layer raises; the HTTP layers map them to status codes.

Messages are written for API users: they name the field or the thing that
is wrong, and are returned as-is (plain text on /v1 as Consul does, JSON on /api).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from meshproto.registration.decode import DecodeError
from meshproto.registration.rules import RuleError


class MeshError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(MeshError):
    status = 400


class PermissionDenied(MeshError):
    status = 403

    def __init__(self, message: str = "Permission denied") -> None:
        super().__init__(message)


class NotFound(MeshError):
    status = 404


class Conflict(MeshError):
    status = 409


class TooLarge(MeshError):
    status = 413


class TooManyRequests(MeshError):
    status = 429


@contextmanager
def rule_errors() -> Iterator[None]:
    """Map the pure registration code's refusals (`meshproto.registration`) to 400s."""
    try:
        yield
    except RuleError as exc:
        raise BadRequest(str(exc)) from None
    except DecodeError as exc:
        raise BadRequest(f"Request decode failed: {exc}") from None
