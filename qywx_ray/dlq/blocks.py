"""The recovery service's view of user blocks, backed by the protection RateLimiter.

Adapts the async RateLimiter.status to the synchronous BlockedUntil protocol the strategies
use: epoch seconds the block ends, +inf for a permanent block, None when not blocked.
Owns one private event loop thread. Never changes a block; it only reads.
"""

from __future__ import annotations

import asyncio
import math
import threading

from qywx_ray.protect.groups import UserGroups
from qywx_ray.protect.ratelimit import RateLimiter
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis


class LimiterBlockedUntil:
    def __init__(self, settings: Settings, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="dlq-blocks", daemon=True
        )
        self._thread.start()

        async def build() -> RateLimiter:
            client = make_async_redis(settings.redis)
            return RateLimiter(client, settings.protect, UserGroups(settings.protect, client))

        self._limiter = asyncio.run_coroutine_threadsafe(build(), self._loop).result(timeout_s)

    def __call__(self, user_id: str) -> float | None:
        future = asyncio.run_coroutine_threadsafe(self._limiter.status(user_id), self._loop)
        status = future.result(self.timeout_s)
        if not status.blocked:
            return None
        return math.inf if status.permanent else status.blocked_until

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=2.0)
