"""Redis lock + fenced cursor against the real Redis (db given by QYWX_TEST_REDIS_URL)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from qywx_ray.errors import InfraError
from qywx_ray.ingest.cursor import CursorStore
from qywx_ray.ingest.locks import LockLostError, LockManager
from qywx_ray.store.client import make_async_redis
from qywx_ray.store.settings import RedisSettings
from tests.helpers.ingest import dead_redis
from tests.helpers.wait import wait_until_async

pytestmark = pytest.mark.integration


@pytest.fixture
async def aredis(redis_url: str, redis_client: redis.Redis):
    client = make_async_redis(RedisSettings(url=redis_url))
    yield client
    await client.aclose()


async def test_one_holder_at_a_time_with_increasing_fences(aredis) -> None:
    a = LockManager(aredis, ttl_s=5, extend_every_s=1)
    b = LockManager(aredis, ttl_s=5, extend_every_s=1)
    lease_a = await a.acquire("sync:kf1")
    assert lease_a is not None
    assert await b.acquire("sync:kf1") is None
    assert await b.acquire("sync:kf2") is not None  # other names are independent
    assert await a.release(lease_a)
    lease_b = await b.acquire("sync:kf1")
    assert lease_b is not None
    assert lease_b.fence > lease_a.fence
    assert not await a.release(lease_a)  # a stale lease cannot release b's lock
    assert await aredis.get(b.key("sync:kf1")) == lease_b.token.encode()

    # Many contenders at once: exactly one wins.
    contenders = [LockManager(aredis, ttl_s=5, extend_every_s=1) for _ in range(20)]
    leases = await asyncio.gather(*(m.acquire("sync:race") for m in contenders))
    assert sum(lease is not None for lease in leases) == 1


async def test_a_resent_acquire_gets_the_same_fence_not_busy(aredis) -> None:
    """redis-py resends a command after a lost reply: the resend finds the lock holding
    its own token and must answer with the fence it got, not 0 (busy until the TTL)."""
    m = LockManager(aredis, ttl_s=5, extend_every_s=1)
    keys = [m.key("sync:kfR"), m.fence_key("sync:kfR")]
    first = int(await m._acquire(keys=keys, args=["tok", 5000]))
    assert first > 0
    assert int(await m._acquire(keys=keys, args=["tok", 5000])) == first
    assert int(await m._acquire(keys=keys, args=["other", 5000])) == 0


async def test_extend_keeps_the_lock_while_work_runs(aredis) -> None:
    # TTL 1.2 s, extended every 0.2 s: survives a 1 s stall of this loaded 2-core box.
    locks = LockManager(aredis, ttl_s=1.2, extend_every_s=0.2)
    other = LockManager(aredis, ttl_s=1.2, extend_every_s=0.2)
    lease = await locks.acquire("sync:kf")
    assert lease is not None
    refusals = 0

    async def work() -> str:
        nonlocal refusals
        end = time.monotonic() + 2.5  # two TTLs: without extension it would expire
        while time.monotonic() < end:
            assert await other.acquire("sync:kf") is None
            refusals += 1
            await asyncio.sleep(0.1)
        return "done"

    assert await locks.run_locked(lease, work) == "done"
    assert refusals >= 10
    assert await aredis.exists(locks.key("sync:kf")) == 0  # released at the end
    assert await other.acquire("sync:kf") is not None


async def test_losing_the_lock_cancels_the_work(aredis) -> None:
    locks = LockManager(aredis, ttl_s=1.0, extend_every_s=0.1)
    lease = await locks.acquire("sync:kf")
    assert lease is not None
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # would run forever
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def steal() -> None:
        await started.wait()
        await aredis.set(locks.key("sync:kf"), b"someone-else")

    with pytest.raises(LockLostError):  # the work would run forever: only our cancel ends it
        await asyncio.wait_for(asyncio.gather(locks.run_locked(lease, work), steal()), 60)
    assert cancelled.is_set()
    assert await aredis.get(locks.key("sync:kf")) == b"someone-else"  # not deleted by us


async def test_paused_holder_past_ttl_cannot_commit_cursor(
    aredis, redis_client: redis.Redis
) -> None:
    locks = LockManager(aredis, ttl_s=0.3, extend_every_s=0.1)
    cursors = CursorStore(aredis)
    a = await locks.acquire("sync:kf")
    assert a is not None
    assert await cursors.commit_cursor("kf", "c1", a)
    assert await cursors.get("kf") == "c1"

    # A "pauses" (GC, VM steal) without extending; its lock expires; B takes over.
    def expired() -> bool:
        return bool(redis_client.exists(locks.key("sync:kf")) == 0)

    await wait_until_async(expired, timeout_s=5.0, what="the lock to expire")
    assert not await cursors.commit_cursor("kf", "a-late", a)  # expired, nobody holds it
    b = await locks.acquire("sync:kf")
    assert b is not None
    assert b.fence > a.fence
    assert await cursors.commit_cursor("kf", "c2", b)
    assert not await cursors.commit_cursor("kf", "a-late", a)  # B holds it now
    assert await cursors.get("kf") == "c2"

    # Fencing: even if the lock key ended up holding A's token again (e.g. a restored
    # snapshot), A's older fence cannot overwrite B's newer cursor.
    await aredis.set(locks.key("sync:kf"), a.token)
    assert not await cursors.commit_cursor("kf", "a-stale-fence", a)
    assert await cursors.get("kf") == "c2"


async def test_unreachable_redis_raises_infra_error() -> None:
    client = dead_redis()
    try:
        locks = LockManager(client, ttl_s=1, extend_every_s=0.2)
        with pytest.raises(InfraError):
            await locks.acquire("sync:kf")
        with pytest.raises(InfraError):
            await CursorStore(client).get("kf")
    finally:
        await client.aclose()


async def test_cancelling_the_caller_stops_the_work_and_releases(aredis) -> None:
    locks = LockManager(aredis, ttl_s=5, extend_every_s=1)
    lease = await locks.acquire("sync:kf")
    assert lease is not None
    started = asyncio.Event()
    work_cancelled = asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            work_cancelled.set()
            raise

    caller = asyncio.create_task(locks.run_locked(lease, work))
    await asyncio.wait_for(started.wait(), 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 5)
    assert work_cancelled.is_set()
    assert await aredis.exists(locks.key("sync:kf")) == 0
