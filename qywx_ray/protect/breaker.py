"""Per-user circuit breaker on the user's mailbox (the seed's third layer of defence).

Pure in-memory state machine with an injected clock; one instance per user mailbox.
A *failure* is a queue-full event on that mailbox. Consecutive failures
(`failure_threshold`) open the breaker for `open_seconds`; then it is half-open and lets
at most `success_threshold` test messages through; that many successes close it, any
failure while half-open re-opens it. It never drops a message: a denied message goes to
the DLQ with reason circuit_open (allow() False) or queue_full (on_failure()), and this
class counts both in qywx_messages_denied_total, so callers must not count them again.
Never blocks, never does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger
from qywx_ray.protect.decision import record_denied
from qywx_ray.protect.settings import BreakerSettings
from qywx_ray.reasons import FailureReason

log = get_logger(__name__)

BREAKER_OPENED = metrics.counter(
    "qywx_breaker_opened_total", "Per-user circuit breakers opened (incl. re-opened)"
)
BREAKER_RECOVERED = metrics.counter(
    "qywx_breaker_recovered_total", "Per-user circuit breakers closed again after half-open"
)
QUEUE_FULL_EVENTS = metrics.counter(
    "qywx_queue_full_events_total", "Messages that found their user's mailbox full"
)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    __slots__ = (
        "_admitted",
        "_clock",
        "_failures",
        "_opened_at",
        "_settings",
        "_state",
        "_successes",
        "user",
    )

    def __init__(
        self,
        settings: BreakerSettings,
        *,
        user: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self.user = user
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._admitted = 0  # test messages let through while half-open
        self._successes = 0  # successes while half-open

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose time is up reports half-open."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self._settings.open_seconds
        ):
            self._state = BreakerState.HALF_OPEN
            self._admitted = 0
            self._successes = 0
            log.info("breaker.half_open", user=self.user)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """May the next message enter the mailbox? False means deny with circuit_open."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._admitted < self._settings.success_threshold:
            self._admitted += 1
            return True
        record_denied(FailureReason.CIRCUIT_OPEN)
        return False

    def on_success(self) -> None:
        """The message entered the mailbox."""
        state = self.state
        if state is BreakerState.CLOSED:
            self._failures = 0
        elif state is BreakerState.HALF_OPEN:
            self._successes += 1
            if self._successes >= self._settings.success_threshold:
                self._state = BreakerState.CLOSED
                self._failures = 0
                BREAKER_RECOVERED.inc()
                log.info("breaker.closed", user=self.user)

    def on_failure(self) -> None:
        """The mailbox was full: the message is denied with queue_full."""
        QUEUE_FULL_EVENTS.inc()
        record_denied(FailureReason.QUEUE_FULL)
        state = self.state
        if state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self._settings.failure_threshold:
                self._open()
                log.error("breaker.opened", user=self.user, failures=self._failures)
        elif state is BreakerState.HALF_OPEN:
            self._open()
            log.warning("breaker.reopened", user=self.user)

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._admitted = 0
        self._successes = 0
        BREAKER_OPENED.inc()
