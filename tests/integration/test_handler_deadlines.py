"""A handler polling the real Redis through our client times out every time.

The drills' "hold" handler loops `await redis.exists(key)` then sleeps. redis-py sends
commands under `asyncio.wait_for`, which on Python 3.11 drops a cancellation when the
write has finished by the time it resumes: the deadline watchdog's one cancel was
swallowed and the handler ran forever, pinning its user (stop 30's CI failure of
test_hanging_handler_times_out_and_is_retried_in_order). Polling without a pause makes
that likely: with one cancel per deadline this test failed here when tried (its first
tight round hit the guard); with cancels only on watchdog ticks a round took ~13 s
under one burnt core.
"""

from __future__ import annotations

import asyncio

import pytest

from qywx_ray.consume.deadlines import HandlerDeadlines
from qywx_ray.store.client import make_async_redis
from qywx_ray.store.settings import RedisSettings
from tests.helpers.deadlines import as_worker

pytestmark = pytest.mark.integration

ROUNDS = 20


async def test_a_handler_polling_redis_always_times_out(redis_url: str, unique: str) -> None:
    client = make_async_redis(RedisSettings(url=redis_url))
    deadlines = HandlerDeadlines(0.05)
    released = False
    polls = 0

    def release() -> None:
        nonlocal released
        released = True

    async def hold(pause_s: float) -> None:
        nonlocal polls
        while not released and not await client.exists(f"never:{unique}"):
            polls += 1
            if pause_s:
                await asyncio.sleep(pause_s)

    try:
        for i in range(ROUNDS):
            outcome = await as_worker(deadlines, hold(0.0 if i % 2 == 0 else 0.002), release)
            assert outcome == "timed out", f"round {i}"
        assert polls > ROUNDS  # the handler really polled Redis before each timeout
    finally:
        await client.aclose()
