"""Ingest fencing and isolation against the real Redis, with in-process fake producers.

Issue 19: a spool trim by a replayer whose lease is gone (items 1), a lost fence counter
(item 4), one user's failing head slowing every replay (item 7) and the breaker's
half-open trial spent where there was nothing to send (item 8). Kafka is not needed:
the producer is a fake whose outcome each test decides, so the racing order is explicit.
"""

from __future__ import annotations

import pytest
import redis

from qywx_ray.devstack.procs import free_port
from qywx_ray.envelope import Envelope
from qywx_ray.ingest.breaker import BreakerState, ProducerBreaker
from qywx_ray.ingest.cursor import CursorStore
from qywx_ray.ingest.locks import LockManager
from qywx_ray.ingest.spool import Spool, SpoolReplayer
from qywx_ray.ingress.syncer_host import SyncerHostService, known_kfids_key, syncer_host_index
from qywx_ray.settings import load_settings
from qywx_ray.store.client import make_async_redis
from qywx_ray.store.settings import RedisSettings
from tests.helpers.ingest import FakePage, FakeProducer, wecom_msg

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
    assert lease is not None
    assert lease.fence > fences[-1]
    assert await cursors.commit_cursor("kfF", "after-loss", lease)
    assert await cursors.get("kfF") == "after-loss"

    # Safety still holds: a holder whose lock was taken over cannot write.
    await aredis.delete(locks.key("sync:kfF"))  # its lease expired ...
    newer = await locks.acquire("sync:kfF")  # ... and someone else holds it now
    assert newer is not None
    assert newer.fence > lease.fence
    assert not await cursors.commit_cursor("kfF", "stale", lease)
    assert await cursors.commit_cursor("kfF", "newer", newer)
    assert await cursors.get("kfF") == "newer"


async def test_one_users_failing_head_does_not_hold_back_the_others(aredis) -> None:
    """Issue 19 item 7. Before the fix a replay pass returned at the first round with a
    failure: with the failing user sorted first, each replay moved ~9 other users (one
    round), so 10,000 spooled users took 37 minutes while Kafka took all the others."""
    spool = Spool(aredis)
    others = [f"u{i:02d}" for i in range(30)]
    await spool.append([env("bad0", "a00"), env("bad1", "a00")], reason="t")
    await spool.append([env(f"m-{u}", u) for u in others], reason="t")
    producer = FakeProducer(failing={"bad0"})
    locks = LockManager(aredis, ttl_s=5, extend_every_s=1)
    replayer = SpoolReplayer(spool, producer, locks, max_per_user=2, max_batch=20)

    result = await replayer.replay_once()

    assert sorted(producer.acked) == sorted(f"m-{u}" for u in others)
    assert (result.produced, result.failed, result.remaining_depth) == (30, 1, 2)
    assert await spool.users() == ["a00"]  # kept, in order, at the head
    assert [e.message_id for e in await spool.entries("a00")] == ["bad0", "bad1"]

    # Later replays: the failing user is tried after everyone else, once per replay.
    await spool.append([env("late", "u05")], reason="t")
    producer.batches.clear()
    result = await replayer.replay_once()
    assert result.produced == 1
    assert producer.batches == [["late", "bad0", "bad1"]]
    producer.failing.clear()  # whatever was wrong is fixed
    result = await replayer.replay_once()
    assert result.produced == 2
    assert await spool.users() == []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_replayer_spends_the_breakers_trial_only_on_work(aredis) -> None:
    """Issue 19 item 8. The replayer called allow() before it held the lock or knew the
    spool had anything: a half-open breaker's one trial was spent on nothing (or by a
    replayer that then found the lock busy), keeping the producer "open" for another
    cooldown."""
    clock = Clock()
    breaker = ProducerBreaker(failure_threshold=1, cooldown_s=10, clock=clock)
    breaker.record(0, 1)
    clock.now += 10
    assert breaker.state is BreakerState.HALF_OPEN
    spool = Spool(aredis)
    locks = LockManager(aredis, ttl_s=5, extend_every_s=1)
    producer = FakeProducer()
    replayer = SpoolReplayer(spool, producer, locks, breaker=breaker)

    assert (await replayer.replay_once()).produced == 0  # nothing spooled
    await spool.append([env("x1", "ux")], reason="t")
    other = await locks.acquire(SpoolReplayer.LOCK_NAME)  # another replayer holds it
    assert other is not None
    assert (await replayer.replay_once()).skipped
    assert producer.batches == []
    assert breaker.allow()  # the trial is still there for whoever has work
    await locks.release(other)
    breaker.record(0, 1)  # that trial failed; next cooldown
    clock.now += 10
    result = await replayer.replay_once()  # holds the lock and has work: the trial is its
    assert result.produced == 1
    assert breaker.state is BreakerState.CLOSED


class IdleWeCom:
    """kf/sync_msg with nothing to pull."""

    async def sync_msg(self, open_kfid: str, cursor: str, token: str, limit: int) -> FakePage:
        return FakePage(next_cursor=cursor)

    async def aclose(self) -> None:
        return None


async def test_a_syncer_host_pulls_only_the_open_kfids_it_owns(redis_url, redis_client) -> None:
    """Issue 19 item 8 (second part). The module promises a host never pulls for an
    open_kfid that hashes to another host; request_pulls did not check, so a misrouted
    request (dispatcher and host disagreeing on the host count mid-deploy) started a
    second syncer for it."""
    settings = load_settings(
        profile="development",
        overrides={
            "redis": {"url": redis_url},
            "kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}"},
            "ingest": {"num_syncer_hosts": 2, "sweep_interval_s": 60.0},
        },
    )
    kfids = [f"wk{i}" for i in range(50)]
    mine = next(k for k in kfids if syncer_host_index(k, 2) == 0)
    theirs = next(k for k in kfids if syncer_host_index(k, 2) == 1)
    service = SyncerHostService(settings, 0, 2)
    service.wecom = IdleWeCom()  # type: ignore[assignment]
    try:
        accepted = await service.request_pulls([(mine, "t1"), (theirs, "t2")])
        assert set(service.syncers) == {mine}
        assert accepted == 1
        # Remembered for its owner, whose next start sweeps it.
        known = redis_client.smembers(known_kfids_key(settings.ingest.key_prefix))
        assert {mine.encode(), theirs.encode()} <= known
    finally:
        await service.close(timeout_s=1.0)
