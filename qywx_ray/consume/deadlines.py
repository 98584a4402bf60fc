"""Handler deadlines for many concurrent handlers with one watchdog task.

`asyncio.timeout` arms a timer per call (~10 µs a message here); one watchdog that wakes
a few times per timeout and cancels the expired handlers costs nothing per message.
Only the watchdog's own cancellation becomes a TimeoutError. A CancelledError the handler
raised on its own (a cancelled inner future, a library's shutdown path) becomes
`HandlerCancelled`, an ordinary failure of that message: it must never end the worker
that ran it (tests/unit/test_consume_order_defects.py). A cancellation of the host
itself propagates.
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
        self._expired: set[asyncio.Task[Any]] = set()
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
            if task in self._expired:  # ours: undo it (also if the handler swallowed it)
                self._expired.discard(task)
                task.uncancel()

    async def _watch(self) -> None:
        interval_s = max(0.005, min(0.25, self.timeout_s / 4))
        loop = asyncio.get_running_loop()
        while self._deadlines:
            await asyncio.sleep(interval_s)
            now = loop.time()
            for task, deadline in list(self._deadlines.items()):
                if now >= deadline and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()
