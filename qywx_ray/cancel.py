"""Cancelling a task so that it stops: `cancel_until_done`.

One `task.cancel()` can be lost. Python 3.11's `asyncio.wait_for` returns its inner
result and drops the cancellation when the inner call has finished by the time the
outer task resumes, and redis-py sends every command under `wait_for` (socket timeout
set): a loop that talks to Redis can swallow a cancel and go on, and whoever awaits it
after cancelling waits for ever. So the cancel is repeated on every loop turn until the
task has ended, as anyio's cancel scopes do (level-triggered). For the shutdown paths
that use it the task is meant to end within a few turns; a task that catches every
cancel keeps the loop busy until it ends. consume/deadlines.py does the same for
handlers, in bursts per watchdog tick (a handler may refuse for long), counting its
cancels so the long-lived worker task can take them back.
"""

from __future__ import annotations

import asyncio
from typing import Any


def cancel_until_done(task: asyncio.Task[Any]) -> None:
    """Cancel `task` now and again on every loop turn until it is done."""
    if not task.done():
        task.cancel()
        task.get_loop().call_soon(cancel_until_done, task)
