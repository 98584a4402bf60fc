"""Redis spool + SpoolReplayer against real Redis and real Kafka."""

from __future__ import annotations

import hashlib

import pytest
import redis

from qywx_ray.envelope import Envelope
from qywx_ray.errors import InfraError
from qywx_ray.ingest.locks import LockManager
from qywx_ray.ingest.spool import Spool, SpoolReplayer
from qywx_ray.obs import metrics
from qywx_ray.store.client import make_async_redis
from tests.helpers.ingest import (
    create_topic,
    first_occurrences,
    good_producer,
    per_user_order,
    read_topic,
    wecom_msg,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def aredis(make_settings, redis_client: redis.Redis):
    client = make_async_redis(make_settings().redis)
    yield client
    await client.aclose()


def env(msgid: str, user: str) -> Envelope:
    return Envelope.from_wecom(wecom_msg(msgid, user))


def ids(envs: list[Envelope]) -> list[str]:
    return [e.message_id for e in envs]


async def test_new_messages_of_a_spooled_user_go_behind_the_spool(aredis) -> None:
    spool = Spool(aredis)
    await spool.append([env("a1", "ua"), env("a2", "ua")], reason="kafka down")
    assert await spool.users() == ["ua"]
    assert await spool.depth() == 2

    page = [env("b1", "ub"), env("a3", "ua"), env("b2", "ub"), env("a4", "ua")]
    appended = await spool.append_if_spooled(page)
    assert appended == {"ua"}  # ub has no spool: the caller sends ub to Kafka
    assert ids(await spool.entries("ua")) == ["a1", "a2", "a3", "a4"]
    assert await spool.entries("ub") == []
    assert await spool.depth() == 4
    assert metrics.gauge("qywx_spool_depth", "").value() == 4
    assert metrics.gauge("qywx_degraded_users", "").value() == 1

    # No spooled user on the page: nothing appended.
    assert await spool.append_if_spooled([env("c1", "uc")]) == set()
    # Trim removes exactly the head; an emptied user leaves the index.
    lease = await LockManager(aredis).acquire(SpoolReplayer.LOCK_NAME)
    assert lease is not None
    assert await spool.trim(await spool.peek(["ua"], 3), lease) == 1
    assert ids(await spool.entries("ua")) == ["a4"]
    assert await spool.trim(await spool.peek(["ua"], 1), lease) == 0
    assert await spool.users() == []
    assert await aredis.exists(spool.key("ua")) == 0


async def test_a_resent_trim_drops_once(aredis) -> None:
    """redis-py resends a command whose reply was lost or timed out: the trim script,
    sent twice with the same op key, must drop the head once (twice = spool lost)."""
    spool = Spool(aredis)
    await spool.append([env(f"a{i}", "ua") for i in range(4)], reason="kafka down")
    lease = await LockManager(aredis).acquire(SpoolReplayer.LOCK_NAME)
    assert lease is not None
    head = (await spool.peek(["ua"], 2))["ua"]
    keys = [spool.index_key, spool.depth_key, f"{spool.op_prefix}resent", lease.key]
    digests = [hashlib.sha1(raw, usedforsecurity=False).hexdigest() for raw in head]
    args = [spool.list_prefix, lease.token, "ua", 2, *digests]
    assert await spool._trim(keys=keys, args=args) == [1, 2, 1, 0]  # type: ignore[arg-type]  # redis-py's EncodableT
    assert await spool._trim(keys=keys, args=args) == [1, 2, 1, 0]  # type: ignore[arg-type]  # redis-py's EncodableT — the resend: a no-op
    assert ids(await spool.entries("ua")) == ["a2", "a3"]


async def test_replay_drains_each_user_in_order(make_settings, aredis) -> None:
    settings = make_settings()
    create_topic(settings)
    spool = Spool(aredis)
    users = [f"r{u}" for u in range(5)]
    spooled = [env(f"s{i:04d}", users[i % 5]) for i in range(300)]
    await spool.append(spooled, reason="test")
    producer = good_producer(settings)
    try:
        replayer = SpoolReplayer(
            spool, producer, LockManager(aredis, ttl_s=5, extend_every_s=1), max_per_user=25
        )
        result = await replayer.replay_once()
        assert (result.produced, result.failed, result.remaining_depth) == (300, 0, 0)
        assert await spool.users() == []
    finally:
        producer.close(10)
    got = per_user_order(read_topic(settings, 300))
    assert got == {u: [e.message_id for e in spooled if e.external_userid == u] for u in users}


async def test_crash_mid_drain_duplicates_but_never_loses(make_settings, aredis) -> None:
    settings = make_settings()
    create_topic(settings)
    spool = Spool(aredis)
    spooled = [env(f"c{i:04d}", f"cu{i % 3}") for i in range(90)]
    await spool.append(spooled, reason="test")
    producer = good_producer(settings)
    try:
        # Replayer 1 produces its first round, then "crashes" before trimming.
        crashing = Spool(aredis)

        async def crash(*args: object) -> int:
            raise InfraError("simulated crash between produce and trim")

        crashing.trim = crash  # type: ignore[method-assign,assignment]
        first = SpoolReplayer(
            crashing, producer, LockManager(aredis, ttl_s=5, extend_every_s=1), max_per_user=10
        )
        with pytest.raises(InfraError):
            await first.replay_once()
        assert await spool.depth() == 90  # nothing removed without a trim

        second = SpoolReplayer(
            spool, producer, LockManager(aredis, ttl_s=5, extend_every_s=1), max_per_user=10
        )
        result = await second.replay_once()
        assert result.produced == 90
        assert result.remaining_depth == 0
    finally:
        producer.close(10)
    records = read_topic(settings, 120)
    assert len(records) == 120  # 30 duplicates (the crashed round: 10 per user), no more
    for user, got in per_user_order(records).items():
        want = [e.message_id for e in spooled if e.external_userid == user]
        assert first_occurrences(got) == want  # consumers dedup by message_id: order holds
        assert set(got) == set(want)


async def test_entries_kafka_can_never_take_are_set_aside_not_blocking(
    make_settings, aredis
) -> None:
    settings = make_settings()
    create_topic(settings)
    spool = Spool(aredis)
    big = Envelope.from_wecom(wecom_msg("big", "ub", text="x" * 5000))
    await spool.append([env("b1", "ub"), big, env("b2", "ub")], reason="test")
    await aredis.rpush(spool.key("ub"), b"not json")  # a corrupt entry ...
    await spool.append([env("b3", "ub")], reason="test")  # ... with a good one behind it
    # A client-side limit smaller than the big record: librdkafka refuses it for good.
    producer = good_producer(settings, **{"message.max.bytes": 4000})
    try:
        replay = await SpoolReplayer(
            spool, producer, LockManager(aredis, ttl_s=5, extend_every_s=1)
        ).replay_once()
        assert (replay.produced, replay.failed, replay.remaining_depth) == (3, 0, 0)
    finally:
        producer.close(10)
    dead = await aredis.lrange(spool.dead_key, 0, -1)
    assert dead == [big.to_bytes(), b"not json"]  # kept for an operator, in order
    assert per_user_order(read_topic(settings, 3)) == {"ub": ["b1", "b2", "b3"]}
