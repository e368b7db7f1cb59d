"""Run ORM code from async views on a small, bounded pool of threads.

Django's default for async code (one thread per request context) would hold
one thread and one database connection per waiting blocking query; a fixed
pool keeps a thousand waiters at a handful of connections.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connections

T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None


def executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(settings.MESH_DB_THREADS, thread_name_prefix="mesh-db")
    return _executor


def _call(fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    try:
        return fn(*args, **kwargs)
    except (OperationalError, InterfaceError):
        # A pooled connection may have died (database restart): drop it and
        # retry once on a fresh one; a second failure is real.
        if connections["default"].in_atomic_block:
            raise
        for conn in connections.all(initialized_only=True):
            conn.close()
        return fn(*args, **kwargs)
    finally:
        close_old_connections_if_broken()


def close_old_connections_if_broken() -> None:
    for conn in connections.all(initialized_only=True):
        if conn.errors_occurred and not conn.in_atomic_block:
            conn.close_if_unusable_or_obsolete()


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Await `fn(*args, **kwargs)` run on the database pool."""
    loop = asyncio.get_running_loop()
    # Carry context variables (the audit scope) into the pool thread.
    context = contextvars.copy_context()
    return await loop.run_in_executor(
        executor(), functools.partial(context.run, _call, fn, args, kwargs)
    )


__all__ = ["run", "executor", "close_old_connections"]
