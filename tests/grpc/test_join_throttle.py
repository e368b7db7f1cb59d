"""The failed-join token bucket, on a fake clock."""

from __future__ import annotations

from registry.grpc.throttle import JoinThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_address_gets_its_burst_then_waits_for_the_refill():
    clock = Clock()
    throttle = JoinThrottle(burst=3, refill_seconds=10, clock=clock)
    for _ in range(3):
        assert throttle.retry_after("10.0.0.9") == 0
        throttle.failed("10.0.0.9")
    assert throttle.retry_after("10.0.0.9") == 10
    clock.now += 4
    assert throttle.retry_after("10.0.0.9") == 6
    clock.now += 6
    assert throttle.retry_after("10.0.0.9") == 0


def test_addresses_have_their_own_buckets_and_the_bucket_never_exceeds_the_burst():
    clock = Clock()
    throttle = JoinThrottle(burst=2, refill_seconds=5, clock=clock)
    throttle.failed("10.0.0.1")
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") > 0
    assert throttle.retry_after("10.0.0.2") == 0
    clock.now += 1000
    throttle.failed("10.0.0.1")
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 5
