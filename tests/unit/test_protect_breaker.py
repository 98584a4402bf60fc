"""Per-user circuit breaker: closed -> open -> half-open -> closed, and re-open."""

from __future__ import annotations

import pytest

from qywx_ray.protect.breaker import (
    BREAKER_OPENED,
    BREAKER_RECOVERED,
    QUEUE_FULL_EVENTS,
    BreakerState,
    CircuitBreaker,
)
from qywx_ray.protect.decision import MESSAGES_DENIED
from qywx_ray.protect.settings import BreakerSettings
from qywx_ray.reasons import FailureReason


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(
    failures: int = 100, open_s: float = 30.0, successes: int = 10
) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    settings = BreakerSettings(
        failure_threshold=failures, open_seconds=open_s, success_threshold=successes
    )
    return CircuitBreaker(settings, user="u", clock=clock), clock


def test_opens_after_exactly_failure_threshold_consecutive_failures() -> None:
    b, _ = make()
    opened = BREAKER_OPENED.value()
    for _ in range(99):
        b.on_failure()
    assert b.state is BreakerState.CLOSED
    assert b.allow()
    b.on_failure()
    assert b.state is BreakerState.OPEN
    assert BREAKER_OPENED.value() == opened + 1


def test_a_success_resets_the_consecutive_count() -> None:
    b, _ = make(failures=3)
    b.on_failure()
    b.on_failure()
    b.on_success()
    b.on_failure()
    b.on_failure()
    assert b.state is BreakerState.CLOSED
    assert b.consecutive_failures == 2


def test_full_cycle_closed_open_half_open_closed() -> None:
    b, clock = make(failures=3, open_s=30, successes=2)
    recovered = BREAKER_RECOVERED.value()
    denied = MESSAGES_DENIED.value(reason=FailureReason.CIRCUIT_OPEN.value)
    for _ in range(3):
        b.on_failure()
    assert not b.allow()
    clock.t += 29.999
    assert not b.allow()
    assert b.state is BreakerState.OPEN
    assert MESSAGES_DENIED.value(reason="circuit_open") == denied + 2
    clock.t += 0.001
    assert b.state is BreakerState.HALF_OPEN
    # Half-open lets exactly success_threshold test messages through.
    assert b.allow()
    assert b.allow()
    assert not b.allow()
    b.on_success()
    assert b.state is BreakerState.HALF_OPEN
    b.on_success()
    assert b.state is BreakerState.CLOSED
    assert BREAKER_RECOVERED.value() == recovered + 1
    assert all(b.allow() for _ in range(50))


def test_failure_in_half_open_reopens_for_a_full_period() -> None:
    b, clock = make(failures=2, open_s=30, successes=3)
    opened = BREAKER_OPENED.value()
    b.on_failure()
    b.on_failure()
    clock.t += 30
    assert b.allow()
    b.on_success()
    queue_full = QUEUE_FULL_EVENTS.value()
    b.on_failure()
    assert b.state is BreakerState.OPEN
    assert QUEUE_FULL_EVENTS.value() == queue_full + 1
    assert BREAKER_OPENED.value() == opened + 2
    clock.t += 29
    assert not b.allow()
    clock.t += 1
    assert b.state is BreakerState.HALF_OPEN
    # The half-open budget starts afresh after the re-open.
    assert [b.allow() for _ in range(4)] == [True, True, True, False]


def test_queue_full_is_counted_as_denied() -> None:
    b, _ = make()
    before = MESSAGES_DENIED.value(reason="queue_full")
    for _ in range(5):
        b.on_failure()
    assert MESSAGES_DENIED.value(reason="queue_full") == before + 5


def test_settings_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerSettings(failure_threshold=0)
