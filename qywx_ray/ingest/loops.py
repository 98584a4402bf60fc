"""What every ingest background loop does with an exception it did not expect.

The replayer, the syncers' pull loops, the lock extender, the pull dispatcher and the
producer's poll thread run for the life of the process; nobody awaits them, so an
exception that escapes one ends it silently (a spool nobody drains, a lease nobody
extends). Each catches every Exception, logs it with its traceback, counts it in
`qywx_ingest_loop_errors_total{loop}` and goes on - after a delay that doubles while the
same loop keeps failing (`LoopBackoff`), so a bug that fails every turn does not spin.
Must never: swallow cancellation (asyncio.CancelledError is not an Exception).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger

log = get_logger(__name__)

LOOP_ERRORS = metrics.counter(
    "qywx_ingest_loop_errors_total",
    "Unexpected exceptions an ingest background loop caught, logged and went on after",
    ("loop",),
)


def loop_failed(loop: str, exc: BaseException, **fields: Any) -> None:
    """Count and log (ERROR, with the traceback) an unexpected exception in `loop`.
    Call it inside the `except` block that caught `exc` (the traceback is taken there)."""
    LOOP_ERRORS.inc(loop=loop)
    log.error("ingest.loop_error", loop=loop, error=repr(exc)[:300], exc_info=True, **fields)


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` passed; True if it is set. The wait runs
    in the caller's task (`asyncio.timeout`, not `wait_for`, which in Python 3.11 can drop
    a cancel that meets the event being set): a loop stopped by cancellation ends."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


@dataclass
class LoopBackoff:
    """The pause after a failed turn: initial_s, doubling per consecutive failure, at most
    max_s; one good turn resets it. Pure: the loop does the waiting."""

    initial_s: float
    max_s: float
    _next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self._next_s = self.initial_s

    def failed(self) -> float:
        delay_s = self._next_s
        self._next_s = min(self._next_s * 2, self.max_s)
        return delay_s

    def succeeded(self) -> None:
        self._next_s = self.initial_s
