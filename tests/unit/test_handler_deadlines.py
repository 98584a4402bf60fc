"""HandlerDeadlines: a handler past its deadline ends with TimeoutError even when
cancellations are swallowed on the way (Python 3.11's `asyncio.wait_for` drops one when
its inner call has already finished), and the worker task keeps none of ours."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from qywx_ray.consume.deadlines import BURST_TURNS, HandlerCancelled, HandlerDeadlines
from tests.helpers.deadlines import as_worker


class Swallowing:
    """A handler that loops until released or cancelled `times + 1` times, dropping the
    first `times` cancels the way `wait_for` does (catch, carry on as if the awaited call
    had returned)."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.released = False
        self.ended = ""

    def release(self) -> None:
        self.released = True

    async def __call__(self) -> None:
        swallowed = 0
        while not self.released:
            try:
                await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                if swallowed == self.times:
                    self.ended = "cancelled"
                    raise
                swallowed += 1
        self.ended = "released"


@pytest.mark.parametrize("times", [0, 1, 3, 50])
async def test_a_handler_that_swallows_cancels_still_times_out(times: int) -> None:
    deadlines = HandlerDeadlines(0.02)
    handler = Swallowing(times)
    assert await as_worker(deadlines, handler(), handler.release) == "timed out"
    assert handler.ended == "cancelled"
    # The next handler runs normally and nothing stays registered.
    assert await as_worker(deadlines, asyncio.sleep(0), lambda: None) == "returned"
    assert not deadlines._deadlines
    assert not deadlines._expired


async def test_a_handler_that_returns_after_our_cancel_counts_as_done() -> None:
    """A cancel swallowed by a call that then returned: the handler ends normally, so
    its message succeeded; the worker keeps no cancellation of ours (a regression
    guard: the single cancel of before passed this too)."""
    deadlines = HandlerDeadlines(0.02)

    async def finishes_after_one_swallow() -> None:
        while True:
            try:
                await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                return

    assert await as_worker(deadlines, finishes_after_one_swallow(), lambda: None) == "returned"
    assert not deadlines._expired


async def test_a_handlers_own_cancelled_error_is_an_ordinary_failure() -> None:
    deadlines = HandlerDeadlines(5.0)

    async def raises_cancelled() -> None:
        raise asyncio.CancelledError()

    with pytest.raises(HandlerCancelled):
        await deadlines.run(raises_cancelled())


async def test_a_handler_under_real_wait_for_times_out_and_leaves_no_cancel() -> None:
    """The real `wait_for` of Python 3.11, around calls that finish within a turn or two
    (the redis-py shape), with a short pause between: every round times out and the
    worker's next await gets no stray CancelledError (as_worker checks both)."""
    deadlines = HandlerDeadlines(0.01)

    async def quick(turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)

    async def polls() -> None:
        i = 0
        while True:
            await asyncio.wait_for(quick(i % 3), 5)
            await asyncio.sleep(0.0005)
            i += 1

    for _ in range(20):
        assert await as_worker(deadlines, polls(), lambda: None) == "timed out"


async def test_a_handler_that_refuses_to_end_is_cancelled_in_bursts_not_a_busy_loop() -> None:
    """A handler that catches every cancel and waits again (a TaskGroup whose child is
    slow to exit, a Condition whose lock is held): re-cancelling it on every loop turn
    spun the loop (~50,000 cancels a second). It gets a burst per watchdog tick."""
    deadlines = HandlerDeadlines(0.02)  # a tick every 5 ms
    released = asyncio.Event()
    made: list[int] = []

    async def refuses() -> None:
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    loop = asyncio.get_running_loop()
    started = loop.time()
    elapsed: list[float] = []

    async def release_later() -> None:
        await asyncio.sleep(0.3)  # a window to count cancels in, not a synchronisation
        made.append(max(deadlines._expired.values()))
        elapsed.append(loop.time() - started)
        released.set()

    releaser = asyncio.ensure_future(release_later())
    assert await as_worker(deadlines, refuses(), released.set) == "returned"
    await releaser
    ticks = elapsed[0] / 0.005  # as the loop really ran (a loaded machine runs late)
    assert 0 < made[0] <= BURST_TURNS * (ticks + 3)


async def test_the_hosts_cancel_while_a_handler_is_expired_still_propagates() -> None:
    """Shutdown cancels the worker while its handler is past its deadline: that is the
    host's cancel, not a timeout of the message (it used to become TimeoutError, and the
    worker went on with a cancel pending)."""
    deadlines = HandlerDeadlines(0.02)

    async def slow_cleanup() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.shield(asyncio.sleep(0.01))

    async def worker() -> str:
        try:
            await deadlines.run(slow_cleanup())
        except TimeoutError:
            return "timed out"
        return "returned"

    task = asyncio.ensure_future(worker())
    for _ in range(10_000_000):  # every turn: the window is the turn of the expiry
        if deadlines._expired:
            break
        await asyncio.sleep(0)
    assert deadlines._expired, "the handler never expired"
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done
    assert task.cancelled()
