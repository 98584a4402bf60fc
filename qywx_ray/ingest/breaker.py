"""Producer circuit breaker: stop hammering a Kafka that keeps failing.

After `failure_threshold` consecutive failed deliveries the breaker opens: callers skip
Kafka and spool directly for `cooldown_s`; then it half-opens and lets one attempt
through (the first caller to ask); that attempt's outcome closes or re-opens it.
The state machine is the shared one (qywx_ray/breaker.py); this adds a lock (syncers and
the replayer share one producer), the gauge and the log lines. It never drops anything
itself - callers spool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from qywx_ray.breaker import Breaker, BreakerState
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger

__all__ = ["BREAKER_STATE", "BreakerState", "ProducerBreaker"]

log = get_logger(__name__)

BREAKER_STATE = metrics.gauge(
    "qywx_producer_breaker_open", "1 while the producer circuit breaker is open or half-open"
)


class ProducerBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 50,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._machine = Breaker(
            failure_threshold=failure_threshold, cooldown_s=cooldown_s, clock=clock
        )
        self._lock = threading.Lock()

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._machine.state

    def allow(self) -> bool:
        """May the caller try Kafka now? In half-open only one trial is let through; a
        trial whose outcome never comes back is handed out again after `cooldown_s`."""
        with self._lock:
            return self._machine.allow()

    def record(self, succeeded: int, failed: int) -> None:
        """Report the outcome of one attempt (e.g. one produce_batch): any success closes."""
        with self._lock:
            if succeeded:
                if self._machine.on_success() is BreakerState.CLOSED:
                    log.warning("producer_breaker.closed")
                BREAKER_STATE.set(0)
            elif self._machine.on_failure(failed) is BreakerState.OPEN:
                BREAKER_STATE.set(1)
                log.warning(
                    "producer_breaker.opened",
                    consecutive_failures=self._machine.consecutive_failures,
                    cooldown_s=self._machine.cooldown_s,
                )
