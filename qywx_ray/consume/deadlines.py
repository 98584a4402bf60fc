"""Handler deadlines for many concurrent handlers with one watchdog task.

`asyncio.timeout` arms a timer per call (~10 µs a message here); one watchdog that wakes
a few times per timeout and cancels the expired handlers costs nothing per message.
Only the watchdog's own cancellation becomes a TimeoutError. A CancelledError the handler
raised on its own (a cancelled inner future, a library's shutdown path) becomes
`HandlerCancelled`, an ordinary failure of that message: it must never end the worker
that ran it (tests/unit/test_consume_order_defects.py). A cancellation of the host
itself propagates, also when it comes while the handler is past its deadline.

One cancellation is not enough. Python 3.11's `asyncio.wait_for` returns its inner
result and drops the cancellation when the inner call has finished by the time the
outer task resumes, and redis-py sends every command under `wait_for` (socket timeout
set). A handler polling Redis (the drills' "hold") swallowed the watchdog's only cancel
and ran forever, pinning its user (the CI failure of stop 30;
tests/integration/test_handler_deadlines.py). So a handler past its deadline is
cancelled again and again until it ends, in bursts: on each of the next
`BURST_TURNS` loop turns, and a new burst on every watchdog tick while it still runs.
A burst gets past a dropped cancel (Redis polling spends most turns waiting on the
socket read, outside `wait_for`); the tick spacing keeps a handler that refuses to end
(catches CancelledError and waits again) from spinning the loop, and it is logged.
A handler whose every await is a `wait_for` around a call that completes without
waiting cannot be ended this way at all (Python 3.12's `wait_for` fixes that).
A handler's own cleanup after the first cancel is cut short by the next one: cleanup
that must finish belongs in `asyncio.shield`. `run` takes back every cancellation it
made (`uncancel` per cancel), so the worker task keeps none of ours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from qywx_ray.obs.logging import get_logger

log = get_logger(__name__)

BURST_TURNS = 20  # loop turns per burst of cancels (a dropped cancel costs one or two)


class HandlerCancelled(Exception):
    """A handler raised asyncio.CancelledError that was not ours: a retryable failure."""


class HandlerDeadlines:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._deadlines: dict[asyncio.Task[Any], float] = {}  # running handlers
        self._expired: dict[asyncio.Task[Any], int] = {}  # past their deadline: cancels made
        self._refusing: set[asyncio.Task[Any]] = set()  # still running after a whole burst
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
            ours = self._expired.get(task, 0)
            if task.cancelling() > ours:  # the host itself is being cancelled (shutdown)
                raise
            if ours:
                raise TimeoutError from None
            raise HandlerCancelled("handler raised CancelledError") from None
        finally:
            # Ours: undo every one (also those the handler or a library swallowed).
            for _ in range(self._expired.pop(task, 0)):
                task.uncancel()
            self._refusing.discard(task)
            self._deadlines.pop(task, None)

    async def _watch(self) -> None:
        interval_s = max(0.005, min(0.25, self.timeout_s / 4))
        loop = asyncio.get_running_loop()
        while self._deadlines:
            await asyncio.sleep(interval_s)
            now = loop.time()
            for task, deadline in list(self._deadlines.items()):
                if now < deadline:
                    continue
                made = self._expired.setdefault(task, 0)
                if made >= BURST_TURNS and task not in self._refusing:  # say so, once
                    self._refusing.add(task)
                    log.warning("handler.refuses_cancellation", timeout_s=self.timeout_s)
                self._insist(task, BURST_TURNS)

    def _insist(self, task: asyncio.Task[Any], turns: int) -> None:
        """Cancel `task` now and on the next `turns - 1` loop turns, while it is still in
        `_expired` (once its handler has ended, `run` has undone the cancels counted)."""
        if task not in self._expired or task.done():
            return
        self._expired[task] += 1
        task.cancel()
        if turns > 1:
            task.get_loop().call_soon(self._insist, task, turns - 1)
