"""The one circuit-breaker state machine (closed -> open -> half-open), pure, clock injected.

Used by the ingest producer (ingest/breaker.py), the per-user mailbox protection
(protect/breaker.py) and the DLQ producer (dlq/producer.py). Those add their metrics, logs
and locking around it; this class does no I/O, never sleeps and is not thread-safe.

The rules, the same for every user:

- CLOSED: every call is allowed. `failure_threshold` consecutive failures (a success
  resets the run) open it.
- OPEN: nothing is allowed for `cooldown_s`; then it is HALF_OPEN.
- HALF_OPEN: at most `half_open_trials` calls are let through (None: every call, for a
  caller that serialises its own attempts). A failure re-opens it for a full cooldown;
  `half_open_trials` successes (one when None) close it. A trial whose outcome never
  comes back does not block forever: `cooldown_s` after a trial was let through, the
  trials are handed out again.
- A success reported while OPEN (an attempt let through before it opened) closes it:
  the downstream demonstrably works. A failure reported while OPEN does not extend the
  cooldown.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    __slots__ = (
        "_clock",
        "_failures",
        "_opened_at",
        "_state",
        "_successes",
        "_trial_at",
        "_trials_out",
        "cooldown_s",
        "failure_threshold",
        "half_open_trials",
    )

    def __init__(
        self,
        *,
        failure_threshold: int,
        cooldown_s: float,
        half_open_trials: int | None = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if half_open_trials is not None and half_open_trials < 1:
            raise ValueError("half_open_trials must be >= 1 (or None for no limit)")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.half_open_trials = half_open_trials
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0  # consecutive failures
        self._opened_at = 0.0
        self._trials_out = 0  # calls let through in this half-open round
        self._trial_at = 0.0  # when the first trial of the round was let through
        self._successes = 0  # successes in this half-open round

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose cooldown is over reports half-open."""
        self.advance()
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def advance(self) -> bool:
        """Apply the clock; True when this call moved the breaker from open to half-open."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._new_round()
            return True
        return False

    def allow(self) -> bool:
        """May the caller try now? In half-open this hands out one of the trials."""
        self.advance()
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            return False
        now = self._clock()
        if self._trials_out and now - self._trial_at >= self.cooldown_s:
            self._new_round()  # the trials never reported back: hand them out again
        if self.half_open_trials is not None and self._trials_out >= self.half_open_trials:
            return False
        if not self._trials_out:
            self._trial_at = now
        self._trials_out += 1
        return True

    def on_success(self) -> BreakerState | None:
        """An allowed call succeeded. Returns CLOSED when this closed the breaker."""
        self.advance()
        if self._state is BreakerState.CLOSED:
            self._failures = 0
            return None
        if self._state is BreakerState.HALF_OPEN:
            self._successes += 1
            if self._successes < (self.half_open_trials or 1):
                return None
        self._state = BreakerState.CLOSED
        self._failures = 0
        return BreakerState.CLOSED

    def on_failure(self, count: int = 1) -> BreakerState | None:
        """`count` allowed calls failed. Returns OPEN when this opened (or re-opened) it."""
        if count < 1:
            return None
        self.advance()
        self._failures += count
        if self._state is BreakerState.HALF_OPEN or (
            self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            return BreakerState.OPEN
        return None

    def _new_round(self) -> None:
        self._trials_out = 0
        self._successes = 0
