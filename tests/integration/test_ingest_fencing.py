"""Ingest fencing and isolation against the real Redis, with in-process fake producers.

Issue 19: a spool trim by a replayer whose lease is gone (items 1), a lost fence counter
(item 4), one user's failing head slowing every replay (item 7) and the breaker's
half-open trial spent where there was nothing to send (item 8). Kafka is not needed:
the producer is a fake whose outcome each test decides, so the racing order is explicit.
"""

from __future__ import annotations

import pytest
import redis

from qywx_ray.envelope import Envelope
from qywx_ray.ingest.cursor import CursorStore
from qywx_ray.ingest.locks import LockManager
from qywx_ray.ingest.spool import Spool, SpoolReplayer
from qywx_ray.store.client import make_async_redis
from qywx_ray.store.settings import RedisSettings
from tests.integration.test_ingest_support import FakeProducer, wecom_msg

pytestmark = pytest.mark.integration


@pytest.fixture
async def aredis(redis_url: str, redis_client: redis.Redis):
    client = make_async_redis(RedisSettings(url=redis_url))
    yield client
    await client.aclose()


def env(msgid: str, user: str) -> Envelope:
    return Envelope.from_wecom(wecom_msg(msgid, user))


async def test_a_replayer_that_lost_its_lease_cannot_trim_what_it_did_not_produce(
    aredis,
) -> None:
    """Issue 19 item 1. R1 peeks [s0, s1] and produces them; its lease is gone before it
    trims (a stall longer than the TTL: here the lock key is deleted, which is what
    expiry does, and R1's extender is too slow to notice); R2 drains s0..s3; a syncer
    spools m10..m13; R1 wakes and trims. Before the fix it removed m10, m11: LOST."""
    spool = Spool(aredis)
    await spool.append([env(f"s{i}", "u1") for i in range(4)], reason="kafka down")
    slow_locks = LockManager(aredis, ttl_s=30, extend_every_s=29)  # never notices in time
    r1_producer = FakeProducer()
    r1 = SpoolReplayer(spool, r1_producer, slow_locks, max_per_user=2)
    r2_producer = FakeProducer()
    r2 = SpoolReplayer(spool, r2_producer, LockManager(aredis, ttl_s=5, extend_every_s=1))

    async def lease_expires_then_others_move() -> None:
        await aredis.delete(slow_locks.key(SpoolReplayer.LOCK_NAME))  # R1's lease expired
        result = await r2.replay_once()
        assert (result.skipped, result.produced) == (False, 4)
        await spool.append([env(f"m{i}", "u1") for i in range(10, 14)], reason="kafka down")

    r1_producer.hook = lease_expires_then_others_move
    await r1.replay_once()

    in_kafka = set(r1_producer.acked) | set(r2_producer.acked)
    in_spool = {e.message_id for e in await spool.entries("u1")}
    lost = sorted(m for m in ("m10", "m11", "m12", "m13") if m not in in_kafka | in_spool)
    assert lost == [], f"LOST: {lost}"
    # Whatever is still spooled is the newest suffix, in order, and nothing in between.
    assert [e.message_id for e in await spool.entries("u1")] == ["m10", "m11", "m12", "m13"]
    assert await spool.depth() == 4


async def test_trim_removes_only_entries_that_match_what_was_produced(aredis) -> None:
    """Belt and braces under the lock: a trim names the entries it produced; a head that
    is something else (changed under it) stays."""
    spool = Spool(aredis)
    locks = LockManager(aredis, ttl_s=5, extend_every_s=1)
    lease = await locks.acquire(SpoolReplayer.LOCK_NAME)
    assert lease is not None
    await spool.append([env("a0", "ua"), env("a1", "ua"), env("a2", "ua")], reason="t")
    heads = await spool.peek(["ua"], 2)
    await aredis.lpop(spool.key("ua"))  # someone else took a0 meanwhile
    await spool.trim(heads, lease)  # the head a1 is not the peeked a0: nothing removed
    assert [e.message_id for e in await spool.entries("ua")] == ["a1", "a2"]
    heads = await spool.peek(["ua"], 1)
    await spool.trim(heads, lease)
    assert [e.message_id for e in await spool.entries("ua")] == ["a2"]


async def test_a_lost_fence_counter_does_not_lock_the_cursor_out(aredis) -> None:
    """Issue 19 item 4. An operator's `DEL qywx:lock:*` (or a restore, an eviction) drops
    the fence counter: before the fix every later holder got a smaller fence than the one
    stored with the cursor, every commit was refused (-1) and every pull ended in
    LockLostError, re-sending its page forever. Fences now stay monotonic."""
    locks = LockManager(aredis, ttl_s=5, extend_every_s=1)
    cursors = CursorStore(aredis)
    fences = []
    for _ in range(3):
        lease = await locks.acquire("sync:kfF")
        assert lease is not None
        fences.append(lease.fence)
        assert await cursors.commit_cursor("kfF", f"c{lease.fence}", lease)
        assert await locks.release(lease)
    assert fences == sorted(set(fences))
    await aredis.delete(locks.fence_key("sync:kfF"))  # the counter is lost

    lease = await locks.acquire("sync:kfF")
    assert lease is not None and lease.fence > fences[-1]
    assert await cursors.commit_cursor("kfF", "after-loss", lease)
    assert await cursors.get("kfF") == "after-loss"

    # Safety still holds: a holder whose lock was taken over cannot write.
    await aredis.delete(locks.key("sync:kfF"))  # its lease expired ...
    newer = await locks.acquire("sync:kfF")  # ... and someone else holds it now
    assert newer is not None and newer.fence > lease.fence
    assert not await cursors.commit_cursor("kfF", "stale", lease)
    assert await cursors.commit_cursor("kfF", "newer", newer)
    assert await cursors.get("kfF") == "newer"
