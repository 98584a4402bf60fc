"""Producer circuit breaker: stop hammering a Kafka that keeps failing.

After `failure_threshold` consecutive failed deliveries the breaker opens: callers skip
Kafka and spool directly for `cooldown_s`; then it half-opens and lets one attempt
through (the first caller to ask); that attempt's outcome closes or re-opens it.
Pure logic with an injected clock; it never drops anything itself - callers spool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum

from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger

log = get_logger(__name__)

BREAKER_STATE = metrics.gauge(
    "qywx_producer_breaker_open", "1 while the producer circuit breaker is open or half-open"
)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class ProducerBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 50,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._trial_out = False
        self._trial_at = 0.0

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def _maybe_half_open(self) -> None:
        if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._trial_out = False

    def allow(self) -> bool:
        """May the caller try Kafka now? In half-open only one trial is let through."""
        with self._lock:
            self._maybe_half_open()
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.HALF_OPEN and (
                not self._trial_out or self.clock() - self._trial_at >= self.cooldown_s
            ):  # a trial whose outcome never came back does not block forever
                self._trial_out = True
                self._trial_at = self.clock()
                return True
            return False

    def record(self, succeeded: int, failed: int) -> None:
        """Report the outcome of one attempt (e.g. one produce_batch)."""
        with self._lock:
            if succeeded:
                if self._state is not BreakerState.CLOSED:
                    log.warning("producer_breaker.closed")
                self._state = BreakerState.CLOSED
                self._consecutive_failures = 0
                self._trial_out = False
                BREAKER_STATE.set(0)
                return
            if not failed:
                return
            self._consecutive_failures += failed
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED
                and self._consecutive_failures >= self.failure_threshold
            ):
                self._state = BreakerState.OPEN
                self._opened_at = self.clock()
                self._trial_out = False
                BREAKER_STATE.set(1)
                log.warning(
                    "producer_breaker.opened",
                    consecutive_failures=self._consecutive_failures,
                    cooldown_s=self.cooldown_s,
                )
