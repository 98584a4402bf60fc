"""Recovery service end to end on real Kafka + Redis (injected clock), and the Ray actor
surviving a kill with retries scheduled."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from qywx_ray.dlq.delay_queue import DelayQueue
from qywx_ray.dlq.index import MANUAL_REVIEW, RETRIED, SCHEDULED, DLQIndex
from qywx_ray.dlq.message import DeadLetterMessage, KafkaSource, make_dead_letter
from qywx_ray.dlq.parking import Parking
from qywx_ray.dlq.producer import DLQProducer
from qywx_ray.dlq.recovery import RecoveryService
from qywx_ray.envelope import Envelope
from qywx_ray.kafka.topics import ensure_topics
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings
from tests.helpers.kafka import headers_of, read_records
from tests.helpers.wait import wait_until

pytestmark = pytest.mark.integration


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_letters(
    settings: Settings, n: int, failure_time: float, retry_count: Callable[[int], int]
) -> list[DeadLetterMessage]:
    return [
        make_dead_letter(
            reason=FailureReason.DOWNSTREAM_ERROR,
            failure_time=failure_time,
            settings=settings.dlq,
            envelope=Envelope(
                message_id=f"m{i}",
                open_kfid="kf",
                external_userid=f"u{i % 5}",
                msgtype="text",
                raw={"i": i},
                ingest_ts_ms=1_000 * i,
            ),
            source=KafkaSource(topic=settings.kafka.main_topic.name, partition=0, offset=i),
            retry_count=retry_count(i),
        )
        for i in range(n)
    ]


def committed_total(settings: Settings) -> int:
    """Sum of committed DLQ offsets of the recovery group (-1 when nothing committed)."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": settings.dlq.recovery_group_id,
        }
    )
    try:
        parts = [
            TopicPartition(settings.kafka.dlq_topic.name, p)
            for p in range(settings.kafka.dlq_topic.partitions)
        ]
        offsets = [tp.offset for tp in consumer.committed(parts, timeout=10)]
    finally:
        consumer.close()
    return sum(o for o in offsets if o >= 0) if any(o >= 0 for o in offsets) else -1


def consume_until(svc: RecoveryService, expected: int, timeout_s: float = 40.0) -> int:
    done = 0
    deadline = time.monotonic() + timeout_s
    while done < expected and time.monotonic() < deadline:
        done += svc.consume_once(0.5)
    return done


def test_end_to_end_with_injected_clock(
    make_settings: Callable[..., Settings], redis_client: redis.Redis, unique: str
) -> None:
    settings = make_settings(dlq={"max_retries": 3, "recovery_group_id": f"rec-{unique}"})
    ensure_topics(settings.kafka)
    t0 = time.time()
    clock = FakeClock(t0)
    letters = make_letters(settings, 30, t0, lambda i: i % 2)  # backoff 60 s or 120 s
    exhausted = make_letters(settings, 1, t0, lambda i: 3)[0].model_copy(
        update={"message_id": "exhausted"}
    )
    invalid = make_dead_letter(
        reason=FailureReason.INVALID_MESSAGE,
        failure_time=t0,
        settings=settings.dlq,
        raw_value=b"\x00bad",
        user_id="u9",
        source=KafkaSource(topic="main", partition=1, offset=5),
    )
    with DLQProducer(settings) as producer:
        producer.send_many_sync([*letters, exhausted, invalid])
    p = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
    p.produce(settings.kafka.dlq_topic.name, key=b"u8", value=b"{not a dead letter")
    p.flush(10)

    # u0 is parked behind "exhausted" (which will go to manual review) with 3 later messages
    parking = Parking(redis_client, settings.dlq)
    assert exhausted.user_id == "u0"
    parking.park("u0", "exhausted", FailureReason.DOWNSTREAM_ERROR)
    later = [
        Envelope(message_id=f"later{i}", open_kfid="kf", external_userid="u0", msgtype="text")
        for i in range(3)
    ]
    assert (
        parking.admit_batch([("u0", e.message_id, e.to_bytes(), False) for e in later])
        == [False] * 3
    )

    svc = RecoveryService(settings, clock=clock)
    try:
        assert consume_until(svc, 33) == 33
        # released by a drain token (the user's host drains the lot); the lot is untouched
        assert parking.waiting_on("u0") == "exhausted"
        assert parking.parked_count("u0") == 3
        assert committed_total(settings) == 33  # committed once scheduled / in review
        index = DLQIndex(redis_client, settings.dlq.redis_prefix)
        statuses = index.status_counts()
        assert statuses[SCHEDULED] == 30
        assert statuses[MANUAL_REVIEW] == 3
        assert svc.queue.counts() == (30, 0)

        clock.now = t0 + 59.9
        assert svc.schedule_once() == 0  # never early
        clock.now = t0 + 60
        assert svc.schedule_once() == 15
        clock.now = t0 + 119.9
        assert svc.schedule_once() == 0
        clock.now = t0 + 3600
        assert svc.schedule_once() == 15
        assert svc.schedule_once() == 0
        assert svc.queue.counts() == (0, 0)
        assert index.status_counts()[RETRIED] == 30
    finally:
        svc.close()

    got = read_records(settings, settings.kafka.main_topic.name, 31)
    assert len(got) == 31
    tokens = [m for m in got if headers_of(m).get("qywx_drain") == b"1"]
    assert len(tokens) == 1
    assert tokens[0].key() == b"u0"
    token_headers = headers_of(tokens[0])
    assert token_headers["msg_id"] == b"exhausted"
    assert token_headers["retry_from_dlq"] == b"true"
    assert Envelope.from_bytes(tokens[0].value()).message_id == "exhausted"
    got = [m for m in got if m not in tokens]
    by_id = {headers_of(m)["msg_id"].decode(): m for m in got}
    for letter in letters:
        m = by_id[letter.message_id]
        h = headers_of(m)
        assert m.key() == letter.user_id.encode()
        assert m.value() == letter.original_bytes()
        assert Envelope.from_bytes(m.value()).message_id == letter.message_id
        assert h["retry_from_dlq"] == b"true"
        assert h["retry_count"] == str(letter.retry_count + 1).encode()
        assert h["original_failure"] == b"downstream_error"
    assert "exhausted" not in by_id
    assert not any(k.startswith("raw:") for k in by_id)
    review = {k.decode() for k in redis_client.hkeys(index.review)}  # type: ignore[union-attr]  # third-party stubs
    assert "exhausted" in review
    assert len(review) == 3


def test_offsets_committed_only_after_scheduling(
    make_settings: Callable[..., Settings], redis_client: redis.Redis, unique: str
) -> None:
    settings = make_settings(dlq={"recovery_group_id": f"rec-{unique}"})
    ensure_topics(settings.kafka)
    t0 = time.time()
    with DLQProducer(settings) as producer:
        producer.send_many_sync(make_letters(settings, 40, t0, lambda i: 0))

    crashing = RecoveryService(settings, clock=FakeClock(t0))

    def redis_down(entries: object) -> int:
        raise redis.ConnectionError("Redis went away")

    crashing.queue.schedule_many = redis_down  # type: ignore[method-assign]

    def consume_until_it_raises() -> None:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            crashing.consume_once(0.5)

    try:
        with pytest.raises(redis.ConnectionError):
            consume_until_it_raises()
    finally:
        crashing.close()  # the "crash": nothing of that batch was committed
    assert committed_total(settings) == -1

    svc = RecoveryService(settings, clock=FakeClock(t0))
    try:
        assert consume_until(svc, 40) == 40
        assert committed_total(settings) == 40
        assert svc.queue.counts() == (40, 0)  # nothing lost, nothing doubled
    finally:
        svc.close()


def test_actor_killed_with_retries_scheduled_loses_nothing(
    make_settings: Callable[..., Settings],
    redis_client: redis.Redis,
    unique: str,
    ray_session: None,
) -> None:
    import ray

    from qywx_ray.dlq.actor import start_recovery_actor

    settings = make_settings(
        dlq={
            "recovery_group_id": f"rec-{unique}",
            "backoff_base_s": 3.0,
            "lease_s": 3.0,
            "scheduler_interval_s": 0.2,
        }
    )
    ensure_topics(settings.kafka)
    name = f"qywx-dlq-recovery-{unique}"
    actor = start_recovery_actor(settings, name=name)
    try:
        assert ray.get(actor.ping.remote(), timeout=60) == "ok"
        t0 = time.time()
        letters = make_letters(settings, 20, t0, lambda i: i % 2)  # due t0+3 s or t0+6 s
        with DLQProducer(settings) as producer:
            producer.send_many_sync(letters)
        index = DLQIndex(redis_client, settings.dlq.redis_prefix)
        wait_until(lambda: index.total() >= 20, timeout_s=30, what="20 letters indexed")
        assert index.total() == 20
        # The crash must find retries still scheduled (what the delay queue holds, not how
        # fast this machine got here; half of them are due only 6 s after t0).
        queue = DelayQueue(redis_client, settings.dlq.redis_prefix)
        waiting_before = scheduled(redis_client, queue)
        assert waiting_before, "every retry had fired before the kill: nothing was tested"
        ray.kill(actor, no_restart=False)  # crash with retries scheduled, not yet due
        assert ray.get(actor.ping.remote(), timeout=30) == "ok"  # restarted
        waiting_after = scheduled(redis_client, queue)
        got = read_records(settings, settings.kafka.main_topic.name, 20, timeout_s=60)
    finally:
        ray.kill(actor, no_restart=True)
    # What the recovery actor decided: no retry is scheduled before its backoff's due time
    # (the queue releases nothing before that: test_dlq_delay_queue.py), and the restart
    # left every still-waiting retry where it was.
    due = {lt.entry_id(): lt.failure_time + 3.0 * 2**lt.retry_count for lt in letters}
    early = {e: at for e, at in {**waiting_before, **waiting_after}.items() if at < due[e] - 1e-6}
    assert early == {}
    kept = waiting_before.keys() & waiting_after.keys()
    assert {e: waiting_after[e] for e in kept} == {e: waiting_before[e] for e in kept}
    seen = {headers_of(m)["msg_id"].decode() for m in got}
    assert seen == {lt.message_id for lt in letters}  # none lost (duplicates would be allowed)


def scheduled(client: redis.Redis, queue: DelayQueue) -> dict[str, float]:
    """The delay queue's waiting entries and their due times (entry id -> epoch s)."""
    ready = cast(list[tuple[bytes, float]], client.zrange(queue.keys[0], 0, -1, withscores=True))
    return {entry_id.decode(): score for entry_id, score in ready}


async def test_blocked_until_reads_the_rate_limiter(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    import math

    from qywx_ray.dlq.blocks import LimiterBlockedUntil
    from qywx_ray.protect.groups import UserGroups
    from qywx_ray.protect.ratelimit import RateLimiter
    from qywx_ray.store.client import make_async_redis

    settings = make_settings()
    client = make_async_redis(settings.redis)
    limiter = RateLimiter(client, settings.protect, UserGroups(settings.protect, client))
    before_s = time.time()
    await limiter.block("temp", reason="test", actor="t", permanent=False, duration_s=600)
    after_s = time.time()
    await limiter.block("perm", reason="test", actor="t")
    await client.aclose()
    blocks = LimiterBlockedUntil(settings)
    try:
        until = blocks("temp")
        # The 600 s decided when the block was written (bracketed by clock reads around
        # that call, so no tolerance for how long the rest took).
        assert until is not None
        assert before_s + 600 - 1 <= until <= after_s + 600 + 1
        assert blocks("perm") == math.inf
        assert blocks("free") is None
    finally:
        blocks.close()
