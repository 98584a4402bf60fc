"""cancel_until_done: a task that drops cancellations (as Python 3.11's wait_for does
when the cancel meets its inner result) still ends, and its awaiter is not left waiting."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from qywx_ray.cancel import cancel_until_done

GUARD_S = 10.0  # a bound on a hang, never a measured duration


@pytest.mark.parametrize("dropped", [0, 1, 5])
async def test_a_task_that_drops_cancels_ends(dropped: int) -> None:
    left = dropped
    loops = 0

    async def loop_forever() -> None:
        nonlocal left, loops
        while True:
            loops += 1
            try:
                await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                if not left:
                    raise
                left -= 1  # dropped: carry on as if the sleep had returned

    task = asyncio.ensure_future(loop_forever())
    await asyncio.sleep(0)
    cancel_until_done(task)
    done, _ = await asyncio.wait({task}, timeout=GUARD_S)
    assert done, "the task was still running at the guard"
    assert task.cancelled()
    assert left == 0


async def test_a_done_task_is_left_alone() -> None:
    task = asyncio.ensure_future(asyncio.sleep(0))
    await task
    cancel_until_done(task)  # no error, nothing scheduled that could cancel anything
    assert not task.cancelled()


async def test_a_task_that_catches_and_returns_ends_with_its_result() -> None:
    async def cleans_up() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)
        return "cleaned"

    task = asyncio.ensure_future(cleans_up())
    await asyncio.sleep(0)
    cancel_until_done(task)
    done, _ = await asyncio.wait({task}, timeout=GUARD_S)
    assert done
    assert task.result() == "cleaned"
