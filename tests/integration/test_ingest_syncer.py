"""KfSyncer with a fake page source against real Kafka and real Redis.

Outages are simulated with clients pointed at closed ports; the shared services are
never stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from qywx_ray.envelope import Envelope
from qywx_ray.errors import InfraError
from qywx_ray.ingest.breaker import BreakerState, ProducerBreaker
from qywx_ray.ingest.cursor import CursorStore
from qywx_ray.ingest.factory import build_ingest
from qywx_ray.ingest.locks import LockManager
from qywx_ray.ingest.producer import BatchProducer, BatchResult
from qywx_ray.ingest.spool import Spool, SpoolReplayer
from qywx_ray.ingest.syncer import KfSyncer
from qywx_ray.obs import metrics
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis
from tests.helpers.ingest import (
    FakePage,
    FakeSource,
    create_topic,
    dead_producer,
    dead_redis,
    good_producer,
    make_pages,
    per_user_order,
    read_topic,
)

pytestmark = pytest.mark.integration

KF = "wkKF1"


@pytest.fixture
async def aredis(make_settings, redis_client: redis.Redis):
    client = make_async_redis(make_settings().redis)
    yield client
    await client.aclose()


def make_syncer(
    settings: Settings,
    source: Any,
    producer: BatchProducer,
    redis_for_lock: aioredis.Redis,
    redis_for_spool: aioredis.Redis | None = None,
    breaker: ProducerBreaker | None = None,
) -> KfSyncer:
    s = settings.ingest
    return KfSyncer(
        KF,
        source=source,
        producer=producer,
        locks=LockManager(redis_for_lock, ttl_s=s.lock_ttl_s, extend_every_s=s.lock_extend_every_s),
        cursors=CursorStore(redis_for_lock),
        spool=Spool(redis_for_spool or redis_for_lock),
        breaker=breaker,
        settings=s,
    )


def expected_order(pages: list[list[dict[str, Any]]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for page in pages:
        for m in page:
            out.setdefault(m["external_userid"], []).append(m["msgid"])
    return out


class GatedProducer:
    """Real produce, then hold the result until the test opens the gate."""

    def __init__(self, inner: BatchProducer) -> None:
        self.inner = inner
        self.acked = asyncio.Event()
        self.gate = asyncio.Event()

    async def produce_batch(self, envelopes) -> BatchResult:  # type: ignore[no-untyped-def]
        result = await self.inner.produce_batch(envelopes)
        self.acked.set()
        await self.gate.wait()
        return result


async def test_cursor_advances_only_after_kafka_acks(make_settings, aredis) -> None:
    settings = make_settings()
    create_topic(settings)
    pages = make_pages(3, 100, users=10)
    producer = good_producer(settings)
    gated = GatedProducer(producer)
    syncer = make_syncer(settings, FakeSource(pages), gated, aredis)
    cursors = CursorStore(aredis)
    try:
        pull = asyncio.create_task(syncer.pull_once())
        await asyncio.wait_for(gated.acked.wait(), 30)
        # Kafka has acked page 0, but the syncer has not seen the result yet: no move.
        assert await cursors.get(KF) == ""
        gated.gate.set()
        result = await asyncio.wait_for(pull, 60)
        assert (result.pages, result.messages, result.produced, result.spooled) == (3, 300, 300, 0)
        assert await cursors.get(KF) == "3"

        # Pulled again from the start: the same msgids carry the same message_ids.
        await aredis.delete(cursors.key(KF))
        again = await syncer.pull_once()
        assert again.produced == 300
    finally:
        producer.close(10)
    records = read_topic(settings, 600)
    counts = Counter(env.message_id for _, _, env in records)
    assert len(counts) == 300
    assert set(counts.values()) == {2}
    assert all(env.message_id == env.raw["msgid"] for _, _, env in records)
    want = expected_order(pages)
    assert {u: ids[: len(ids) // 2] for u, ids in per_user_order(records).items()} == want


async def test_kafka_down_spools_advances_cursor_then_replays_exactly_once(
    make_settings, aredis
) -> None:
    settings = make_settings()
    create_topic(settings)
    pages = make_pages(2, 60, users=6, tag="a")
    source = FakeSource(pages)
    breaker = ProducerBreaker(failure_threshold=50, cooldown_s=60)
    bad = dead_producer(settings, timeout_ms=1500)
    degraded_before = metrics.counter("qywx_degraded_messages_total", "").value()
    try:
        tried: list[int] = []  # envelopes per produce_batch call
        produce_batch = bad.produce_batch

        async def counted(envs: Any) -> Any:
            tried.append(len(envs))
            return await produce_batch(envs)

        bad.produce_batch = counted  # type: ignore[method-assign,assignment]
        down = make_syncer(settings, source, bad, aredis, breaker=breaker)
        result = await down.pull_once()
        # Page 1 failed in Kafka (1.5 s delivery timeout) and opened the breaker;
        # page 2 went straight to the spool, without a Kafka attempt of its own.
        assert breaker.state is BreakerState.OPEN
        assert tried == [60]
        assert (result.produced, result.spooled) == (0, 120)
        assert await CursorStore(aredis).get(KF) == "2"  # durably spooled counts as handed over
    finally:
        bad.close(1)
    spool = Spool(aredis)
    assert await spool.depth() == 120
    assert metrics.counter("qywx_degraded_messages_total", "").value() - degraded_before == 120

    # Kafka is back. New messages: spooled users queue behind their spool, new users go
    # straight to Kafka.
    new_page = make_pages(1, 30, users=6, tag="b")[0] + [
        {**m, "external_userid": f"fresh{i}"}
        for i, m in enumerate(make_pages(1, 3, users=3, tag="f")[0])
    ]
    source.pages.append(new_page)
    producer = good_producer(settings)
    try:
        up = make_syncer(settings, source, producer, aredis)
        result = await up.pull_once()
        assert (result.produced, result.spooled) == (3, 30)
        assert await spool.depth() == 150
        replay = await SpoolReplayer(
            spool, producer, LockManager(aredis, ttl_s=5, extend_every_s=1)
        ).replay_once()
        assert (replay.produced, replay.remaining_depth) == (150, 0)
    finally:
        producer.close(10)
    records = read_topic(settings, 153)
    counts = Counter(env.message_id for _, _, env in records)
    assert len(counts) == 153
    assert set(counts.values()) == {1}
    assert per_user_order(records) == expected_order([*pages, new_page])


async def test_redis_down_keeps_cursor_and_loses_nothing(make_settings, aredis) -> None:
    settings = make_settings()
    create_topic(settings)
    pages = make_pages(2, 40, users=4, tag="r")
    source = FakeSource(pages)
    cursors = CursorStore(aredis)

    # Kafka and the spool's Redis both down: the page can go nowhere -> cursor stays.
    bad = dead_producer(settings, timeout_ms=1000)
    spool_down = dead_redis()
    try:
        syncer = make_syncer(settings, source, bad, aredis, redis_for_spool=spool_down)
        with pytest.raises(InfraError):
            await syncer.pull_once()
        assert await cursors.get(KF) == ""
        # All of Redis down: the lock cannot even be taken -> nothing pulled.
        calls = len(source.calls)
        with pytest.raises(InfraError):
            await make_syncer(settings, source, bad, spool_down).pull_once()
        assert len(source.calls) == calls
    finally:
        bad.close(1)
        await spool_down.aclose()

    producer = good_producer(settings)
    try:
        result = await make_syncer(settings, source, producer, aredis).pull_once()
        assert result.produced == 80
        assert await cursors.get(KF) == "2"
    finally:
        producer.close(10)
    records = read_topic(settings, 80)
    assert per_user_order(records) == expected_order(pages)


class GatedSource(FakeSource):
    def __init__(self, pages: list[list[dict[str, Any]]]) -> None:
        super().__init__(pages)
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def sync_msg(self, open_kfid: str, cursor: str, token: str, limit: int) -> FakePage:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return await super().sync_msg(open_kfid, cursor, token, limit)


async def test_run_loop_backs_off_on_45009_and_coalesces_bursts(make_settings, aredis) -> None:
    settings = make_settings(ingest={"backoff_initial_s": 0.05, "backoff_max_s": 0.2})
    create_topic(settings)
    source = GatedSource(make_pages(2, 20, users=4, tag="w"))
    source.errors = [45009, -1]
    errors = metrics.counter("qywx_sync_errors_total", "", ("errcode",))
    before = errors.value(errcode="45009"), errors.value(errcode="-1")
    producer = good_producer(settings)
    syncer = make_syncer(settings, source, producer, aredis)
    cursors = CursorStore(aredis)
    syncer.request_pull("tok-1")
    task = asyncio.create_task(syncer.run())
    try:
        deadline = time.monotonic() + 30
        while await cursors.get(KF) != "2":
            assert time.monotonic() < deadline, source.calls
            await asyncio.sleep(0.02)
        assert (errors.value(errcode="45009"), errors.value(errcode="-1")) == (
            before[0] + 1,
            before[1] + 1,
        )
        assert source.calls[0][2] == "tok-1"
        assert source.calls[-1][2] == "tok-1"
        assert source.calls[0][3] == settings.ingest.sync_page_limit

        # A burst of 50 callbacks while a pull is in flight -> exactly one more pull.
        source.gate = asyncio.Event()
        source.entered.clear()
        calls = len(source.calls)
        syncer.request_pull("tok-2")
        await asyncio.wait_for(source.entered.wait(), 10)
        for _ in range(50):
            syncer.request_pull("tok-2")
        source.gate.set()
        deadline = time.monotonic() + 10
        while len(source.calls) < calls + 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # bounded check that no further pulls follow
        assert len(source.calls) == calls + 2
        assert not syncer.pull_requested
    finally:
        syncer.stop()
        await asyncio.wait_for(task, 10)
        producer.close(10)


async def test_build_ingest_parts_pull_on_request_and_replay(make_settings, redis_client) -> None:
    settings = make_settings(ingest={"sweep_interval_s": 60})
    create_topic(settings)
    parts = build_ingest(settings)
    pages = make_pages(2, 50, users=5, tag="f")
    source = FakeSource(pages)
    # One user already has a spooled message (an earlier outage): theirs queue behind it.
    earlier = make_pages(1, 1, users=1, tag="e")[0]
    await parts.spool.append([Envelope.from_wecom(earlier[0])], reason="earlier outage")
    syncer = parts.syncer(KF, source)
    stop = asyncio.Event()
    task = asyncio.create_task(syncer.run())
    replay = asyncio.create_task(parts.replayer().run(0.05, stop))
    try:
        syncer.request_pull("tok")
        deadline = time.monotonic() + 30
        while (await parts.cursors.get(KF) != "2") or (await parts.spool.depth()) > 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        syncer.stop()
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, replay), 10)
        await parts.aclose()
    records = read_topic(settings, 101)
    assert len(records) == 101
    assert per_user_order(records) == expected_order([earlier, *pages])


async def test_busy_lock_is_retried_soon_not_at_the_next_sweep(make_settings, aredis) -> None:
    settings = make_settings(ingest={"sweep_interval_s": 60, "busy_retry_s": 0.2})
    create_topic(settings)
    source = FakeSource(make_pages(1, 10, users=2, tag="y"))
    producer = good_producer(settings)
    syncer = make_syncer(settings, source, producer, aredis)
    other = LockManager(aredis, ttl_s=30, extend_every_s=10)
    held = await other.acquire(syncer.lock_name)  # another node is pulling
    assert held is not None
    task = asyncio.create_task(syncer.run())
    try:
        syncer.request_pull("tok")
        await asyncio.sleep(0.5)  # bounded: several busy retries happen meanwhile
        assert source.calls == []
        assert await other.release(held)
        deadline = time.monotonic() + 5
        while await CursorStore(aredis).get(KF) != "1":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        syncer.stop()
        await asyncio.wait_for(task, 10)
        producer.close(10)
