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

Within a batch the writer also shares what every write would otherwise pay
for alone (see `Batch`): one `UPDATE` reserves the global indexes for the
whole batch, the audit rows and topic indexes of all its writes are stored
with one statement each at the end, and one announcement of the changed
topics goes out after the commit. Should that deferred storing fail, the
batch is rolled back and run again write by write, each storing its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
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
_local = threading.local()

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


class Batch:
    """What the writes of one writer batch share, stored once at its end.

    `registry.txn.Change` asks `current_batch()`: inside a batch it takes its
    index from the batch's reservation and hands its audit rows and topics
    here instead of storing them itself. A write that fails has what it
    handed over dropped (`mark` / `undo`), as its savepoint drops its rows.
    """

    def __init__(self, size: int) -> None:
        self.remaining = size  # writes not yet started, this one included
        self._next = 1
        self._last = 0
        self.audit_rows: list[tuple] = []
        self.changes: list[tuple[int, list[str]]] = []
        self.depth = 0  # Changes open in the current write

    def take_index(self) -> int:
        """The next global index, reserving one per remaining write when out."""
        if self._next > self._last:
            from registry.txn import reserve_indexes

            count = max(1, self.remaining)
            self._last = reserve_indexes(count)
            self._next = self._last - count + 1
        index = self._next
        self._next += 1
        return index

    def mark(self) -> tuple[int, int]:
        return len(self.audit_rows), len(self.changes)

    def undo(self, mark: tuple[int, int]) -> None:
        del self.audit_rows[mark[0] :]
        del self.changes[mark[1] :]

    def store(self) -> None:
        """Store the batch's audit rows and topic indexes (inside its transaction)."""
        from registry.txn import store_topics, write_audit_rows

        if self.audit_rows:
            write_audit_rows(self.audit_rows)
        latest: dict[str, int] = {}
        for index, topics in self.changes:
            for t in topics:
                if latest.get(t, 0) < index:
                    latest[t] = index
        store_topics(latest)

    def announce(self) -> None:
        """After the commit: one announcement for every topic the batch changed."""
        from registry import changes

        if not self.changes:
            return
        topics = sorted({t for _, ts in self.changes for t in ts})
        changes.publish(max(index for index, _ in self.changes), topics)


def current_batch() -> Batch | None:
    """The writer batch the calling code runs in, if any."""
    return getattr(_local, "batch", None)


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
                try:
                    results = self._commit(batch, shared=True)
                except (OperationalError, InterfaceError):
                    raise
                except Exception:  # noqa: BLE001 - storing the shared rows failed
                    log.warning("write batch failed as a whole; running it write by write")
                    _reset_audit_scopes(batch)
                    results = self._commit(batch, shared=False)
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
    def _commit(
        batch: list[_Write], shared: bool = False
    ) -> list[tuple[Any, BaseException | None]]:
        results: list[tuple[Any, BaseException | None]] = []
        state = Batch(len(batch)) if shared else None
        _local.batch = state
        try:
            with transaction.atomic():
                for n, item in enumerate(batch):
                    mark = None
                    if state is not None:
                        state.remaining = len(batch) - n
                        mark = state.mark()
                    try:
                        with _savepoint():  # a failing write rolls back alone
                            value = item.context.run(item.fn, *item.args, **item.kwargs)
                        results.append((value, None))
                    except (OperationalError, InterfaceError):
                        raise
                    except Exception as exc:  # noqa: BLE001 - returned to its caller
                        if state is not None:
                            state.undo(mark)
                        results.append((None, exc))
                if state is not None:
                    state.store()
        finally:
            _local.batch = None
        if state is not None:
            state.announce()
        return results


@contextlib.contextmanager
def _savepoint() -> Iterator[None]:
    """One write's savepoint in the batch's transaction, never released.

    Like a nested `transaction.atomic()` (which it stands in for because a
    batch runs one per write), except that a write which succeeds leaves its
    savepoint open instead of paying a statement to release it: the commit
    ends them all. A write that fails is rolled back to it, with the
    `on_commit` callbacks it registered.
    """
    conn = connections["default"]
    sid = conn.savepoint()
    conn.savepoint_ids.append(sid)
    try:
        yield
        if conn.needs_rollback:  # a failed inner block was caught and ignored
            raise RuntimeError("a write went on after a failed change")
    except BaseException:
        conn.needs_rollback = False  # (as Atomic does) or the rollback itself is refused
        try:
            conn.savepoint_rollback(sid)
        except Exception:  # noqa: BLE001 - the connection broke: the batch fails as a whole
            conn.needs_rollback = True
        raise
    finally:
        conn.savepoint_ids.pop()


def _reset_audit_scopes(batch: list[_Write]) -> None:
    """Before a batch runs again: nothing of its first run was stored."""
    from registry import audit

    def reset() -> None:
        scope = audit.current()
        if scope is not None:
            scope.recorded = False

    for item in batch:
        item.context.run(reset)


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
