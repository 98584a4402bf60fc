"""The one breaker state machine: every transition, with an injected clock."""

from __future__ import annotations

import pytest

from qywx_ray.breaker import Breaker, BreakerState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def opened(
    threshold: int = 3, cooldown: float = 10.0, trials: int | None = 1
) -> tuple[Breaker, Clock]:
    clock = Clock()
    b = Breaker(
        failure_threshold=threshold, cooldown_s=cooldown, half_open_trials=trials, clock=clock
    )
    assert b.on_failure(threshold) is BreakerState.OPEN
    return b, clock


def test_closed_opens_after_exactly_threshold_consecutive_failures() -> None:
    b = Breaker(failure_threshold=3, cooldown_s=10, clock=Clock())
    assert b.on_failure() is None
    assert b.on_failure() is None
    assert b.state is BreakerState.CLOSED
    assert b.allow()
    assert b.on_failure() is BreakerState.OPEN
    assert b.state is BreakerState.OPEN
    assert not b.allow()


def test_a_success_while_closed_resets_the_run() -> None:
    b = Breaker(failure_threshold=3, cooldown_s=10, clock=Clock())
    b.on_failure(2)
    assert b.on_success() is None  # no transition: it was closed
    assert b.consecutive_failures == 0
    b.on_failure(2)
    assert b.state is BreakerState.CLOSED


def test_a_batch_of_failures_counts_each() -> None:
    b = Breaker(failure_threshold=5, cooldown_s=10, clock=Clock())
    assert b.on_failure(4) is None
    assert b.on_failure(0) is None  # nothing failed: nothing changes
    assert b.on_failure(1) is BreakerState.OPEN


def test_open_becomes_half_open_exactly_after_the_cooldown() -> None:
    b, clock = opened(cooldown=10)
    clock.now += 9.999
    assert not b.advance()
    assert b.state is BreakerState.OPEN
    clock.now += 0.001
    assert b.advance()  # this call made the move ...
    assert not b.advance()  # ... and only this one
    assert b.state is BreakerState.HALF_OPEN


def test_half_open_lets_only_its_trials_through_and_their_successes_close_it() -> None:
    b, clock = opened(trials=2)
    clock.now += 10
    assert [b.allow() for _ in range(3)] == [True, True, False]
    assert b.on_success() is None  # one of two
    assert b.state is BreakerState.HALF_OPEN
    assert b.on_success() is BreakerState.CLOSED
    assert b.consecutive_failures == 0
    assert all(b.allow() for _ in range(10))


def test_a_failure_in_half_open_reopens_for_a_full_cooldown_and_a_fresh_round() -> None:
    b, clock = opened(trials=2)
    clock.now += 10
    assert b.allow()
    b.on_success()
    assert b.on_failure() is BreakerState.OPEN
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.1
    # The earlier success does not carry over: two trials and two successes again.
    assert [b.allow() for _ in range(3)] == [True, True, False]
    assert b.on_success() is None
    assert b.on_success() is BreakerState.CLOSED


def test_a_trial_that_never_reports_is_handed_out_again_after_the_cooldown() -> None:
    b, clock = opened(cooldown=2)
    clock.now += 2
    assert b.allow()
    assert not b.allow()
    clock.now += 1.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()
    assert not b.allow()


def test_unlimited_trials_let_every_call_through_and_one_success_closes() -> None:
    b, clock = opened(trials=None)
    clock.now += 10
    assert all(b.allow() for _ in range(20))
    assert b.on_success() is BreakerState.CLOSED


def test_outcomes_reported_while_open() -> None:
    b, clock = opened(cooldown=10)
    clock.now += 5
    # A failure from a call let through before it opened does not extend the cooldown.
    assert b.on_failure() is None
    clock.now += 5
    assert b.state is BreakerState.HALF_OPEN
    b2, _ = opened()
    # A success from such a call shows the downstream works: closed at once.
    assert b2.on_success() is BreakerState.CLOSED
    assert b2.allow()


def test_reading_the_state_takes_no_trial() -> None:
    b, clock = opened()
    clock.now += 10
    for _ in range(5):
        assert b.state is BreakerState.HALF_OPEN
    assert b.allow()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"failure_threshold": 0, "cooldown_s": 1}, "failure_threshold"),
        ({"failure_threshold": 1, "cooldown_s": 1, "half_open_trials": 0}, "half_open_trials"),
    ],
)
def test_nonsense_settings_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Breaker(**kwargs)  # type: ignore[arg-type]
