"""Done-flags on real Redis: one round trip per batch, TTL set, only written after success."""

from __future__ import annotations

import pytest
import redis as redis_lib

from qywx_ray.consume.dedup import Deduplicator, RedisDoneStore
from qywx_ray.store.client import make_async_redis
from qywx_ray.store.settings import RedisSettings

pytestmark = pytest.mark.integration


async def test_redis_done_store_round_trip(redis_url: str, redis_client: redis_lib.Redis) -> None:
    client = make_async_redis(RedisSettings(url=redis_url))
    store = RedisDoneStore(client, ttl_s=120)
    ids = [f"m{i}" for i in range(7000)]  # more than one chunk
    assert await store.done_among(ids) == set()
    await store.mark_done(ids[::2])
    assert await store.done_among(ids) == set(ids[::2])
    ttl = redis_client.ttl("qywx:done:m0")
    assert 0 < ttl <= 120
    dedup = Deduplicator(store)
    assert await dedup.already_done(["m1", "m2", "m3"]) == {"m2"}
    await client.aclose()
