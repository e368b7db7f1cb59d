"""The writer (registry.db.Writer) in-process, on the test database: whatever a write
raises, its batch's other writes commit, every caller learns its outcome, and the
thread lives on (or is started again)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from registry import db
from registry.domain import kv
from registry.models import KVEntry

pytestmark = pytest.mark.django_db(transaction=True)


class Boom(BaseException):
    """Not an Exception: what `except Exception` never catches."""


def _put(key: str) -> str:
    kv.put(key, b"v")
    return key


def _put_then(key: str, exc: BaseException) -> None:
    kv.put(key, b"v")
    raise exc


@pytest.fixture
def writer():
    w = db.Writer(max_batch=64)
    yield w
    w.stop()


def _batch(writer: db.Writer, calls: list[tuple]) -> list:
    """Submit `calls` as one batch: hold the writer busy until all are queued."""
    gate = threading.Event()
    blocker = writer.submit(gate.wait, (10,), {})
    futures = [writer.submit(fn, args, {}) for fn, *args in calls]
    gate.set()
    blocker.result(10)
    return futures


@pytest.mark.parametrize("exc", [Boom("boom"), SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
def test_a_write_raising_any_base_exception_rolls_back_alone_and_the_writer_lives_on(writer, exc):
    before, bad, after = _batch(
        writer, [(_put, "w/before"), (_put_then, "w/bad", exc), (_put, "w/after")]
    )
    assert before.result(10) == "w/before"
    assert after.result(10) == "w/after"
    with pytest.raises(db.WriteAborted) as raised:
        bad.result(10)
    assert raised.value.__cause__ is exc
    assert set(KVEntry.objects.values_list("key", flat=True)) == {"w/before", "w/after"}
    assert writer.alive and writer.stats.restarts == 0
    assert writer.submit(_put, ("w/later",), {}).result(10) == "w/later"


def test_an_exception_is_handed_to_its_caller_and_counted(writer):
    ok, bad = _batch(writer, [(_put, "e/ok"), (_put_then, "e/bad", ValueError("no"))])
    assert ok.result(10) == "e/ok"
    with pytest.raises(ValueError, match="no"):
        bad.result(10)
    assert writer.stats.writes_failed == 1
    assert writer.stats.writes_committed >= 2  # the gate and e/ok


def _refuse(key: str) -> None:
    raise ValueError(f"{key} refused before touching the database")


def test_a_batch_runs_without_savepoints_until_a_write_fails_after_writing(writer):
    # A write refused before it sent a statement is dropped from the batch as it is.
    ok1, refused, ok2 = _batch(writer, [(_put, "s/ok1"), (_refuse, "s/refused"), (_put, "s/ok2")])
    assert [ok1.result(10), ok2.result(10)] == ["s/ok1", "s/ok2"]
    with pytest.raises(ValueError, match="refused before"):
        refused.result(10)
    assert writer.stats.batch_redos == 0
    # One that fails after writing makes the batch run again, each write in a
    # savepoint: its rows are gone, the others' are kept, once each.
    ok3, bad, ok4 = _batch(
        writer, [(_put, "s/ok3"), (_put_then, "s/bad", ValueError("late")), (_put, "s/ok4")]
    )
    assert [ok3.result(10), ok4.result(10)] == ["s/ok3", "s/ok4"]
    with pytest.raises(ValueError, match="late"):
        bad.result(10)
    assert writer.stats.batch_redos == 1
    keys = sorted(KVEntry.objects.filter(key__startswith="s/").values_list("key", flat=True))
    assert keys == ["s/ok1", "s/ok2", "s/ok3", "s/ok4"]


def test_a_write_whose_caller_is_cancelled_still_commits_and_the_next_write_answers(writer):
    async def scenario() -> str:
        gate = threading.Event()
        held = writer.submit(gate.wait, (10,), {})
        orig, db.writer = db.writer, writer
        try:
            task = asyncio.create_task(db.run_write(_put, "c/gone"))
            await asyncio.sleep(0.05)
            task.cancel()  # the client hung up while its write was queued
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.set()
            await asyncio.wrap_future(held)
            return await asyncio.wait_for(db.run_write(_put, "c/next"), 10)
        finally:
            db.writer = orig

    assert asyncio.run(scenario()) == "c/next"
    assert KVEntry.objects.filter(key="c/gone").exists()
    assert writer.alive and writer.stats.restarts == 0


def test_a_stopped_writer_is_started_again_by_the_next_write_and_counted(writer):
    assert writer.submit(_put, ("s/one",), {}).result(10) == "s/one"
    writer.stop()
    assert not writer.alive
    assert writer.submit(_put, ("s/two",), {}).result(10) == "s/two"
    assert writer.alive and writer.stats.restarts == 1


def test_the_watchdog_starts_a_stopped_writer_without_a_write(writer):
    writer.submit(_put, ("d/one",), {}).result(10)
    writer.stop()
    assert writer.ensure_running() is True
    assert writer.alive and writer.stats.restarts == 1
    assert writer.ensure_running() is False
