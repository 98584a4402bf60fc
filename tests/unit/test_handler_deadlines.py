"""HandlerDeadlines: a handler past its deadline ends with TimeoutError even when
cancellations are swallowed on the way (Python 3.11's `asyncio.wait_for` drops one that
arrives in the same turn as its inner result), and the worker task keeps none of ours."""

from __future__ import annotations

import asyncio

import pytest

from qywx_ray.consume.deadlines import HandlerCancelled, HandlerDeadlines
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


async def test_a_handler_finishing_after_a_swallowed_cancel_succeeds_cleanly() -> None:
    """A cancel swallowed by a call that then returned: the handler ends normally, so
    its message succeeded; the worker keeps no cancellation of ours."""
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
