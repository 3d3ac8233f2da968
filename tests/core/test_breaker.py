"""The circuit breaker's states, driven by an injected clock: no sleeps, no Redis."""

from __future__ import annotations

import pytest

from quotas.core.breaker import BreakerState, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def changes() -> list[tuple[BreakerState, BreakerState]]:
    return []


@pytest.fixture
def breaker(clock: Clock, changes: list) -> CircuitBreaker:
    return CircuitBreaker(
        failures=3,
        reset_after=5.0,
        clock=clock,
        on_change=lambda old, new: changes.append((old, new)),
    )


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.record_failure()


def test_it_opens_on_the_third_consecutive_failure_not_before(breaker, changes):
    fail(breaker, 2)
    assert breaker.state is CLOSED and breaker.allow()
    assert breaker.retry_after() == 0.0
    fail(breaker, 1)
    assert breaker.state is OPEN
    assert not breaker.allow()
    assert changes == [(CLOSED, OPEN)]


def test_a_success_resets_the_count_of_consecutive_failures(breaker):
    fail(breaker, 2)
    breaker.record_success()
    fail(breaker, 2)
    assert breaker.state is CLOSED  # 4 failures, never 3 in a row


def test_while_open_callers_skip_the_store_until_reset_after(breaker, clock):
    fail(breaker, 3)
    clock.advance(4.999)
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(0.001)
    clock.advance(0.001)  # exactly reset_after: one probe goes through
    assert breaker.allow()
    assert breaker.state is HALF_OPEN


def test_a_successful_probe_closes_it(breaker, clock, changes):
    fail(breaker, 3)
    clock.advance(5)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED and breaker.allow()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_a_failed_probe_opens_it_again_for_a_full_period(breaker, clock, changes):
    fail(breaker, 3)
    clock.advance(5)
    assert breaker.allow()
    breaker.record_failure()  # one failure is enough while half-open
    assert breaker.state is OPEN
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(5.0)
    clock.advance(4.9)
    assert not breaker.allow()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]


def test_a_probe_that_fails_late_restarts_the_wait_from_its_failure(breaker, clock):
    fail(breaker, 3)
    clock.advance(5)
    assert breaker.allow()
    clock.advance(1)  # the probe waited out a socket timeout before it failed
    breaker.record_failure()
    clock.advance(4.9)
    assert not breaker.allow()  # 5 s from the failure, not from the probe's start
    clock.advance(0.1)
    assert breaker.allow()


def test_one_probe_at_a_time_while_half_open(breaker, clock):
    fail(breaker, 3)
    clock.advance(5)
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # everyone else keeps skipping the store meanwhile
    assert breaker.state is HALF_OPEN


def test_a_probe_that_never_reports_does_not_shut_it_for_good(breaker, clock, changes):
    fail(breaker, 3)
    clock.advance(5)
    assert breaker.allow()  # the probe raises something else and never reports
    clock.advance(5)
    assert breaker.allow()  # another caller probes
    breaker.record_success()
    assert breaker.state is CLOSED
    assert changes.count((OPEN, HALF_OPEN)) == 1  # still half-open, not re-entered


def test_a_failure_reported_while_open_restarts_the_wait(breaker, clock):
    fail(breaker, 3)
    clock.advance(3)
    breaker.record_failure()  # a call already under way when it opened: still failing
    assert breaker.retry_after() == pytest.approx(5.0)
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()


def test_trip_opens_at_once_and_probes_after_the_reset(clock):
    breaker = CircuitBreaker(failures=3, reset_after=5.0, clock=clock)
    breaker.trip()
    assert breaker.state is OPEN and not breaker.allow()
    clock.advance(5.0)
    assert breaker.allow() and breaker.state is HALF_OPEN
    breaker.record_success()
    assert breaker.state is CLOSED
