"""Per-user circuit breaker on the user's mailbox (the original design's third layer of defence).

The shared state machine (qywx_ray/breaker.py) with an injected clock; one instance per
user mailbox. A *failure* is a queue-full event on that mailbox. Consecutive failures
(`failure_threshold`) open the breaker for `open_seconds`; then it is half-open and lets
at most `success_threshold` test messages through; that many successes close it, any
failure while half-open re-opens it (trials that never report are handed out again
after `open_seconds`). It never drops a message: a denied message goes to
the DLQ with reason circuit_open (allow() False) or queue_full (on_failure()), and this
class counts both in qywx_messages_denied_total, so callers must not count them again.
Never blocks, never does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qywx_ray.breaker import Breaker, BreakerState
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger
from qywx_ray.protect.decision import record_denied
from qywx_ray.protect.settings import BreakerSettings
from qywx_ray.reasons import FailureReason

__all__ = [
    "BREAKER_OPENED",
    "BREAKER_RECOVERED",
    "QUEUE_FULL_EVENTS",
    "BreakerState",
    "CircuitBreaker",
]

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


class CircuitBreaker(Breaker):
    """The shared state machine with `half_open_trials = success_threshold`, plus the
    protection metrics and logs. One instance per user mailbox, hence the slots."""

    __slots__ = ("user",)

    def __init__(
        self,
        settings: BreakerSettings,
        *,
        user: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            failure_threshold=settings.failure_threshold,
            cooldown_s=settings.open_seconds,
            half_open_trials=settings.success_threshold,
            clock=clock,
        )
        self.user = user

    def advance(self) -> bool:
        moved = super().advance()
        if moved:
            log.info("breaker.half_open", user=self.user)
        return moved

    def allow(self) -> bool:
        """May the next message enter the mailbox? False means deny with circuit_open."""
        if super().allow():
            return True
        record_denied(FailureReason.CIRCUIT_OPEN)
        return False

    def on_success(self) -> BreakerState | None:
        """The message entered the mailbox."""
        closed = super().on_success()
        if closed is not None:
            BREAKER_RECOVERED.inc()
            log.info("breaker.closed", user=self.user)
        return closed

    def on_failure(self, count: int = 1) -> BreakerState | None:
        """The mailbox was full: the message is denied with queue_full."""
        QUEUE_FULL_EVENTS.inc(count)
        record_denied(FailureReason.QUEUE_FULL, count)
        was = self.state
        opened = super().on_failure(count)
        if opened is not None:
            BREAKER_OPENED.inc()
            if was is BreakerState.HALF_OPEN:
                log.warning("breaker.reopened", user=self.user)
            else:
                log.error("breaker.opened", user=self.user, failures=self.consecutive_failures)
        return opened
