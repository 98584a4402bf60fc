"""Handler deadlines for many concurrent handlers with one watchdog task.

`asyncio.timeout` arms a timer per call (~10 µs a message here); one watchdog that wakes
a few times per timeout and cancels the expired handlers costs nothing per message.
Only the watchdog's own cancellation becomes a TimeoutError. A CancelledError the handler
raised on its own (a cancelled inner future, a library's shutdown path) becomes
`HandlerCancelled`, an ordinary failure of that message: it must never end the worker
that ran it (tests/unit/test_consume_order_defects.py). A cancellation of the host
itself propagates.

One cancellation is not enough: Python 3.11's `asyncio.wait_for` returns the inner
result and drops the cancellation when both arrive in the same loop turn, and redis-py
wraps its socket writes in `wait_for`. A handler polling Redis (the drills' "hold")
swallowed the watchdog's only cancel and ran forever, pinning its user (the CI failure
of stop 30; tests/integration/test_handler_deadlines.py reproduces it). Once a handler
is past its deadline it is cancelled again on every loop turn until it has ended, as
anyio's cancel scopes do (level-triggered): a cancel dropped in `wait_for`'s one-turn
window is followed by one that lands elsewhere. Re-cancelling only on the watchdog's
ticks was not enough: a handler polling Redis without a pause, on a loaded machine,
took seconds of ticks to leave a 50 ms deadline. `run` takes back every cancellation
it made (`uncancel` per cancel), so the worker task keeps none of ours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


class HandlerCancelled(Exception):
    """A handler raised asyncio.CancelledError that was not ours: a retryable failure."""


class HandlerDeadlines:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._deadlines: dict[asyncio.Task[Any], float] = {}  # running handlers
        self._expired: dict[asyncio.Task[Any], int] = {}  # past their deadline: cancels made
        self._watchdog: asyncio.Task[None] | None = None

    async def run(self, handler_call: Awaitable[None]) -> None:
        """`await handler_call`; TimeoutError after `timeout_s`."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._deadlines[task] = loop.time() + self.timeout_s
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch())
        try:
            await handler_call
        except asyncio.CancelledError:
            if task in self._expired:
                raise TimeoutError from None
            if task.cancelling():  # the host itself is being cancelled (shutdown)
                raise
            raise HandlerCancelled("handler raised CancelledError") from None
        finally:
            del self._deadlines[task]
            # Ours: undo every one (also those the handler or a library swallowed).
            for _ in range(self._expired.pop(task, 0)):
                task.uncancel()

    async def _watch(self) -> None:
        interval_s = max(0.005, min(0.25, self.timeout_s / 4))
        loop = asyncio.get_running_loop()
        while self._deadlines:
            await asyncio.sleep(interval_s)
            now = loop.time()
            for task, deadline in list(self._deadlines.items()):
                if now >= deadline and task not in self._expired:
                    self._expired[task] = 0
                    self._insist(task)

    def _insist(self, task: asyncio.Task[Any]) -> None:
        """Cancel `task` now and again on the next loop turn, until `run` has taken it
        out of `_expired` (its handler ended: `run` undoes the cancels counted here)."""
        if task not in self._expired:
            return
        if task.done():  # its loop was torn down mid-handler: nothing left to end
            del self._expired[task]
            return
        self._expired[task] += 1
        task.cancel()
        task.get_loop().call_soon(self._insist, task)
