"""Run ORM code from async views: reads on a small pool, writes on one writer.

Django's default for async code (one thread per request context) would hold
one thread and one database connection per waiting blocking query; a fixed
pool keeps a thousand waiters at a handful of connections.

Writes go to a single writer thread that commits them in batches (group
commit): every write takes the global index row lock, so concurrent writers
on several threads would only queue on that lock (PostgreSQL) or on the
database file lock (SQLite) while each paid for its own commit. One writer
takes whatever writes are waiting and commits them together. A batch first
runs without savepoints (each one is a round trip to the database): a write
that fails before it sent any statement just drops what it handed over; one
that fails after, or leaves the transaction needing a rollback, rolls the
whole batch back, and the batch runs again with each write in its own
savepoint, so that a failing write rolls back alone.

Within a batch the writer also shares what every write would otherwise pay
for alone (see `Batch`): one `UPDATE` reserves the global indexes for the
whole batch, the audit rows and topic indexes of all its writes are stored
with one statement each at the end, and one announcement of the changed
topics goes out after the commit. Should that deferred storing fail, the
batch is rolled back and run again write by write, each storing its own.

No request can stop the writer: a caller that goes away (a client hung up or
timed out) leaves its write to commit or roll back with its batch; whatever a
write raises is handed to its caller and the thread carries on; a batch that
loses its connection (a database restart) runs once more on a new one; and a
writer thread that ended anyway is started again by the next write or by the
server's watchdog. `/v1/agent/metrics` and `/v1/agent/health` show its state.
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
from dataclasses import dataclass
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


class WriteAborted(RuntimeError):
    """A write raised a BaseException that is not an Exception (SystemExit, KeyboardInterrupt, ...).

    Handed to its caller instead of the original, which would stop the event loop
    that awaits it; the original is the `__cause__`.
    """


class WriterDied(RuntimeError):
    """The writer thread ended while this write was in its batch; the outcome is unknown."""


class _Write:
    __slots__ = ("fn", "args", "kwargs", "context", "future")

    def __init__(self, fn, args, kwargs, context) -> None:
        self.fn, self.args, self.kwargs, self.context = fn, args, kwargs, context
        self.future: Future = Future()


_STOP = object()  # a queue item that ends the writer thread (server shutdown)


@dataclass
class WriterStats:
    """What the writer has done since the process started (read by the metrics endpoint).

    Plain integers written by the writer thread only (and `restarts` under the
    writer's lock): a reader on another thread sees a recent value, which is
    all a metric needs.
    """

    restarts: int = 0
    batches_committed: int = 0
    batches_failed: int = 0
    writes_committed: int = 0
    writes_failed: int = 0
    batch_retries: int = 0
    batch_redos: int = 0  # batches run again with savepoints after a failed write


class Writer:
    """The one thread that runs writes, committing each batch once.

    Promises: every submitted write's future is settled (a value, the write's
    own exception, `WriteAborted` or `WriterDied`), whatever the write
    function raises and whether or not its caller is still waiting; a write
    whose caller left is committed or rolled back with its batch like any
    other. The thread survives any exception; if it ends anyway, the next
    `submit` (or the server's watchdog, `ensure_running`) starts a new one and
    counts a restart.
    """

    def __init__(self, max_batch: int = 64) -> None:
        self.max_batch = max_batch
        self.stats = WriterStats()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._inflight: list[_Write] = []

    # -- state, for metrics and the health endpoint ---------------------------
    @property
    def alive(self) -> bool:
        """True while the writer thread runs (or before the first write starts it)."""
        thread = self._thread
        return thread is None or thread.is_alive()

    def queue_depth(self) -> int:
        """Writes waiting for the writer (not counting the batch in flight)."""
        return self._queue.qsize()

    # -- lifecycle -------------------------------------------------------------
    def submit(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> Future:
        item = _Write(fn, args, kwargs, contextvars.copy_context())
        self._queue.put(item)
        self.ensure_running()
        return item.future

    def ensure_running(self) -> bool:
        """Start the writer thread if it is not running; True if one was (re)started.

        A thread that ended (it should not: `_loop` catches everything) leaves
        its batch behind: those writes are settled with `WriterDied`, the
        queued ones are taken by the new thread.
        """
        thread = self._thread
        if thread is not None and thread.is_alive():
            return False
        with self._lock:
            thread = self._thread
            if thread is not None and thread.is_alive():
                return False
            if thread is not None:
                self.stats.restarts += 1
                log.error("the writer thread had stopped; starting a new one")
                lost, self._inflight = self._inflight, []
                for item in lost:
                    _settle(item.future, None, WriterDied("the writer stopped during this write"))
            self._thread = threading.Thread(target=self._loop, name="mesh-writer", daemon=True)
            self._thread.start()
            return True

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the queued writes, then end the thread (server shutdown)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._queue.put(_STOP)
        thread.join(timeout)

    # -- the thread --------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                if not self._run_once():
                    _close_connections()  # this thread's; it ends now
                    return
            except BaseException:  # noqa: BLE001 - the writer must outlive anything
                log.exception("writer loop error (the writer carries on)")

    def _run_once(self) -> bool:
        """Take and commit one batch; False when told to stop."""
        first = self._queue.get()
        if first is _STOP:
            return False
        batch = [first]
        stop = False
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        self._inflight = batch
        results: list[tuple[Any, BaseException | None]] | None = None
        try:
            results = self._commit_with_retry(batch)
        finally:
            if results is None:  # something escaped: nobody may wait forever
                results = [(None, WriterDied("the write batch failed unexpectedly"))] * len(batch)
            self._inflight = []
            for item, (value, exc) in zip(batch, results, strict=True):
                _settle(item.future, value, exc)
        return not stop

    def _commit_with_retry(self, batch: list[_Write]) -> list[tuple[Any, BaseException | None]]:
        try:
            try:
                results = self._commit_shared(batch)
            except (OperationalError, InterfaceError) as exc:
                # The connection died (a database restart, a terminated backend):
                # the batch rolled back; run it again once on a new connection.
                log.warning("write batch lost its database connection (%s); retrying once", exc)
                self.stats.batch_retries += 1
                _close_connections()
                _reset_audit_scopes(batch)
                results = self._commit_shared(batch)
        except BaseException as exc:  # noqa: BLE001 - every waiter learns why
            log.exception("write batch failed")
            self.stats.batches_failed += 1
            self.stats.writes_failed += len(batch)
            _close_connections()
            return [(None, _for_caller(exc))] * len(batch)
        finally:
            close_old_connections_if_broken()
        self.stats.batches_committed += 1
        failed = sum(1 for _value, exc in results if exc is not None)
        self.stats.writes_failed += failed
        self.stats.writes_committed += len(results) - failed
        return results

    def _commit_shared(self, batch: list[_Write]) -> list[tuple[Any, BaseException | None]]:
        """Commit `batch` sharing its index reservation, audit rows and topics;
        should storing those fail, run it again write by write."""
        try:
            if len(batch) > 1:
                try:
                    return self._commit(batch, shared=True, savepoints=False)
                except _RedoWithSavepoints:
                    self.stats.batch_redos += 1
                    _reset_audit_scopes(batch)
            return self._commit(batch, shared=True)
        except (OperationalError, InterfaceError):
            raise
        except Exception:  # noqa: BLE001 - storing the shared rows failed
            log.warning("write batch failed as a whole; running it write by write")
            _reset_audit_scopes(batch)
            return self._commit(batch, shared=False)

    @staticmethod
    def _commit(
        batch: list[_Write], shared: bool = False, savepoints: bool = True
    ) -> list[tuple[Any, BaseException | None]]:
        """Run `batch` in one transaction; each write in a savepoint, or (with
        `savepoints` off) none, raising `_RedoWithSavepoints` when a write that
        fails may have changed something."""
        results: list[tuple[Any, BaseException | None]] = []
        state = Batch(len(batch)) if shared else None
        _local.batch = state
        _local.statements = 0
        conn = connections["default"]
        try:
            with transaction.atomic(), conn.execute_wrapper(_count_statement):
                for n, item in enumerate(batch):
                    mark = None
                    if state is not None:
                        state.remaining = len(batch) - n
                        mark = state.mark()
                    sent, callbacks = _local.statements, len(conn.run_on_commit)
                    try:
                        if savepoints:
                            with _savepoint():  # a failing write rolls back alone
                                value = item.context.run(item.fn, *item.args, **item.kwargs)
                        else:
                            value = item.context.run(item.fn, *item.args, **item.kwargs)
                            if conn.needs_rollback:
                                raise _RedoWithSavepoints
                        results.append((value, None))
                    except (OperationalError, InterfaceError, _RedoWithSavepoints):
                        raise
                    except BaseException as exc:  # noqa: BLE001 - returned to its caller
                        if not savepoints:
                            if _local.statements != sent or conn.needs_rollback:
                                raise _RedoWithSavepoints from exc
                            del conn.run_on_commit[callbacks:]
                        if state is not None:
                            state.undo(mark)
                        results.append((None, _for_caller(exc)))
                if state is not None:
                    state.store()
        finally:
            _local.batch = None
            _local.statements = None
        if state is not None:
            state.announce()
        return results


class _RedoWithSavepoints(Exception):
    """A write failed after it may have changed something in a batch run
    without savepoints: roll the batch back and run it with them."""


def note_statement() -> None:
    """Count a statement sent on the writer's connection (see `Writer._commit`).

    Django's cursors are counted by an execute wrapper; code that talks to
    the driver directly (`registry.domain.rows`) calls this.
    """
    if getattr(_local, "statements", None) is not None:
        _local.statements += 1


def _count_statement(execute, sql, params, many, context):
    note_statement()
    return execute(sql, params, many, context)


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


def _for_caller(exc: BaseException) -> BaseException:
    """What a write's caller receives for `exc`: never a bare BaseException."""
    if isinstance(exc, Exception):
        return exc
    wrapped = WriteAborted(f"the write raised {type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def _close_connections() -> None:
    for conn in connections.all(initialized_only=True):
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a dead connection may fail to close; it is gone anyway
            log.debug("closing a broken connection failed", exc_info=True)


def _settle(future: Future, value: Any, exc: BaseException | None) -> None:
    """Hand a write's outcome to its caller, unless the caller has gone.

    A caller that hung up may have cancelled its future; the write itself was
    committed or rolled back with its batch all the same.
    """
    if future.done():
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


async def run_detached(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Like `run`, but a caller that is cancelled leaves `fn` to run to its end.

    For writes that bypass the writer (slow ones): cancelling a pool job that
    has not started would drop the write, so whether a hung-up client's write
    happened would depend on how busy the pool was.
    """
    done = asyncio.ensure_future(run(fn, *args, **kwargs))
    done.add_done_callback(_retrieved)
    return await asyncio.shield(done)


async def watch_writer(interval: float = 1.0) -> None:
    """Restart the writer if its thread has ended, even when no write comes to do it."""
    while True:
        await asyncio.sleep(interval)
        writer.ensure_running()


def _retrieved(future: asyncio.Future) -> None:
    """Mark an outcome as seen, so a gone caller's failure is not logged as lost."""
    if not future.cancelled():
        future.exception()


__all__ = [
    "run",
    "run_write",
    "run_detached",
    "executor",
    "close_old_connections",
    "writer",
    "WriteAborted",
    "WriterDied",
]
