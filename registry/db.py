"""Run ORM code from async views: reads on a small pool, writes on one writer.

Django's default for async code (one thread per request context) would hold
one thread and one database connection per waiting blocking query; a fixed
pool keeps a thousand waiters at a handful of connections.

Writes go to a single writer thread that commits them in batches (group
commit): every write takes the global index row lock, so concurrent writers
on several threads would only queue on that lock (PostgreSQL) or on the
database file lock (SQLite) while each paid for its own commit. One writer
takes whatever writes are waiting, runs each in its own savepoint (a failing
write rolls back alone) and commits them together.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any, TypeVar

from django.conf import settings
from django.db import (
    InterfaceError,
    OperationalError,
    close_old_connections,
    connections,
    transaction,
)

log = logging.getLogger(__name__)

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


class _Write:
    __slots__ = ("fn", "args", "kwargs", "context", "future")

    def __init__(self, fn, args, kwargs, context) -> None:
        self.fn, self.args, self.kwargs, self.context = fn, args, kwargs, context
        self.future: Future = Future()


class Writer:
    """The one thread that runs writes, committing each batch once."""

    def __init__(self, max_batch: int = 64) -> None:
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Write] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> Future:
        item = _Write(fn, args, kwargs, contextvars.copy_context())
        self._queue.put(item)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name="mesh-writer", daemon=True
                    )
                    self._thread.start()
        return item.future

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self._commit(batch)
            except (OperationalError, InterfaceError):
                # The connection died (database restart): retry once on a new one.
                for conn in connections.all(initialized_only=True):
                    conn.close()
                try:
                    results = self._commit(batch)
                except Exception as exc:  # noqa: BLE001 - every waiter learns why
                    results = [(None, exc)] * len(batch)
            except Exception as exc:  # noqa: BLE001 - the commit itself failed
                log.exception("write batch failed")
                results = [(None, exc)] * len(batch)
            finally:
                close_old_connections_if_broken()
            for item, (value, exc) in zip(batch, results, strict=True):
                _settle(item.future, value, exc)

    @staticmethod
    def _commit(batch: list[_Write]) -> list[tuple[Any, BaseException | None]]:
        results: list[tuple[Any, BaseException | None]] = []
        with transaction.atomic():
            for item in batch:
                try:
                    with transaction.atomic():  # a savepoint: a failing write rolls back alone
                        value = item.context.run(item.fn, *item.args, **item.kwargs)
                    results.append((value, None))
                except (OperationalError, InterfaceError):
                    raise
                except Exception as exc:  # noqa: BLE001 - returned to its caller
                    results.append((None, exc))
        return results


def _settle(future: Future, value: Any, exc: BaseException | None) -> None:
    """Hand a write's outcome to its caller, unless the caller has gone.

    A caller that hung up may have cancelled its future; the write itself was
    committed or rolled back with its batch all the same.
    """
    if future.cancelled():
        return
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass


writer = Writer()


async def run_write(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Await `fn(*args, **kwargs)` run by the writer, committed with its batch."""
    # Shielded: a caller that is cancelled (a client hung up) leaves the write
    # to commit or roll back with its batch instead of cancelling it under
    # the writer's feet.
    done = asyncio.wrap_future(writer.submit(fn, args, kwargs))
    done.add_done_callback(_retrieved)
    return await asyncio.shield(done)


def _retrieved(future: asyncio.Future) -> None:
    """Mark an outcome as seen, so a gone caller's failure is not logged as lost."""
    if not future.cancelled():
        future.exception()


__all__ = ["run", "run_write", "executor", "close_old_connections"]
