"""Running a handler under HandlerDeadlines the way a host's worker does, with a guard."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from qywx_ray.consume.deadlines import HandlerDeadlines

GUARD_S = 10.0  # a bound on a hang, never a measured duration


async def as_worker(
    deadlines: HandlerDeadlines, handler_call: Awaitable[None], release: Callable[[], None]
) -> str:
    """Run one handler on its own worker task and say how it ended ("returned" or
    "timed out"). Checks that the worker keeps no cancellation of ours. If the handler is
    still running at the guard its deadline never ended it: `release` lets it return
    (so the test ends cleanly) and the test fails."""

    async def worker() -> str:
        try:
            await deadlines.run(handler_call)
            outcome = "returned"
        except TimeoutError:
            outcome = "timed out"
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0, "a cancel of ours was left"
        await asyncio.sleep(0)  # and no pending CancelledError reaches its next await
        return outcome

    task = asyncio.ensure_future(worker())
    done, _ = await asyncio.wait({task}, timeout=GUARD_S)
    if not done:
        release()
        await asyncio.wait({task}, timeout=GUARD_S)
        raise AssertionError("the handler was still running at the guard: no deadline ended it")
    return task.result()
