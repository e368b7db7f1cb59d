"""The change hub wakes exactly the readers whose topics a write touched."""

from __future__ import annotations

import asyncio

import pytest

from registry import topics as topic
from registry.changes import ChangeHub


def run(coro):
    return asyncio.run(coro)


def test_it_wakes_a_waiter_on_its_exact_topic_with_the_change_index():
    async def scenario():
        hub = ChangeHub()
        waiter = hub.watch([topic.service("web")])
        hub.notify(42, [topic.service("api"), topic.service("web")])
        return await asyncio.wait_for(waiter.future, 1)

    assert run(scenario()) == 42


def test_it_leaves_waiters_of_other_topics_asleep():
    async def scenario():
        hub = ChangeHub()
        waiter = hub.watch([topic.service("web")])
        hub.notify(7, [topic.service("webapp"), topic.service("we")])
        await asyncio.sleep(0)
        return waiter.future.done()

    assert run(scenario()) is False


def test_a_prefix_waiter_wakes_for_any_key_below_its_prefix_only():
    async def scenario():
        hub = ChangeHub()
        app = hub.watch(prefixes=[topic.kv("app/")])
        other = hub.watch(prefixes=[topic.kv("other/")])
        hub.notify(9, [topic.kv("app/db/password")])
        await asyncio.sleep(0)
        return app.future.done(), other.future.done()

    assert run(scenario()) == (True, False)


def test_unwatch_forgets_a_waiter_entirely():
    async def scenario():
        hub = ChangeHub()
        waiter = hub.watch([topic.NODES], [topic.kv("")])
        assert hub.waiting() == 1
        hub.unwatch(waiter)
        return hub.waiting(), hub._exact, hub._prefix

    assert run(scenario()) == (0, {}, {})


def test_a_notification_from_another_thread_is_delivered_on_the_loop():
    import threading

    async def scenario():
        hub = ChangeHub()
        hub.bind(asyncio.get_running_loop())
        waiter = hub.watch([topic.ACL])
        threading.Thread(target=hub.notify_threadsafe, args=(5, [topic.ACL])).start()
        return await asyncio.wait_for(waiter.future, 1)

    assert run(scenario()) == 5


def test_every_notification_moves_the_sequence():
    hub = ChangeHub()
    before = hub.seq
    hub.notify(1, [])
    hub.notify(2, ["x"])
    assert hub.seq == before + 2


@pytest.mark.parametrize("count", [1000])
def test_a_thousand_waiters_on_one_topic_all_wake(count):
    async def scenario():
        hub = ChangeHub()
        waiters = [hub.watch([topic.service("hot")]) for _ in range(count)]
        hub.notify(3, [topic.service("hot")])
        results = await asyncio.gather(*(w.future for w in waiters))
        return set(results)

    assert run(scenario()) == {3}
