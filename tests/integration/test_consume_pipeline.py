"""Consume end to end on real Kafka, Redis and Ray (hosted mode)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis as redis_lib

from qywx_ray.consume.introspect import list_users
from qywx_ray.consume.pipeline import ConsumePipeline, start_consumers
from qywx_ray.settings import Settings
from qywx_ray.testing.consume import (
    check_order,
    committed_offsets,
    ensure_topics,
    envelopes,
    produce,
    produce_one,
    records,
    wait_for,
)
from tests.helpers.consume import RECORD, consume_test_settings
from tests.helpers.kafka import read_records

pytestmark = pytest.mark.integration


def test_round_trip(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    s = consume_test_settings(make_settings, unique)
    ensure_topics(s)
    msgs = envelopes(5, 4)
    produce(s, msgs)
    p = start_consumers(s)
    started.append(p)
    assert wait_for(lambda: redis_client.llen(RECORD) >= len(msgs), 60)
    rep = check_order(records(redis_client, RECORD), msgs)
    assert rep.missing == []
    assert rep.inversions == 0
    assert rep.duplicates == 0
    view = list_users(s)  # what GET /admin/users and `qywx-ray users` show
    assert {r["user"] for r in view["users"]} == {f"u{i}" for i in range(5)}
    assert all(r["mode"] == "hosted" and r["state"] == "active" for r in view["users"])
    # committed offsets reach the end of every partition
    total = len(msgs)
    assert wait_for(lambda: sum(max(0, o) for o in committed_offsets(s, 4)) == total, 20)


@pytest.mark.timeout(300)
def test_order_200000_messages_10000_users_hosted(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    """20 messages for each of 10,000 users, interleaved at random, on 4 partitions."""
    s = consume_test_settings(
        make_settings, unique, num_consumers=2, num_hosts=4, commit_interval_s=0.5
    )
    ensure_topics(s)
    msgs = envelopes(10_000, 20)
    produce(s, msgs)
    p = start_consumers(s)
    started.append(p)
    assert wait_for(lambda: redis_client.llen(RECORD) >= len(msgs), 200, interval_s=0.5)
    rep = check_order(records(redis_client, RECORD), msgs)
    assert rep.missing == []
    assert rep.inversions == 0
    assert rep.duplicates == 0
    assert redis_client.llen(f"{RECORD}:calls") == len(msgs)  # no handler ran twice
    assert wait_for(lambda: sum(max(0, o) for o in committed_offsets(s, 4)) == len(msgs), 30), (
        committed_offsets(s, 4),
        p.snapshots(),
    )


def test_slow_user_holds_neither_others_nor_commits_past_it(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    s = consume_test_settings(make_settings, unique)
    ensure_topics(s)
    release = f"release-{unique}"
    held = envelopes(1, 1, prefix="slow", hold=release)[0]
    part, off = produce_one(s, held)
    after_slow = envelopes(1, 3, prefix="slow", seed=1)
    for i, e in enumerate(after_slow):  # its next messages queue behind it, in order
        after_slow[i] = e.model_copy(update={"message_id": f"slow0-{i + 1:06d}"})
    others = envelopes(40, 10, prefix="o")
    produce(s, [*after_slow, *others])
    p = start_consumers(s)
    started.append(p)

    def others_done() -> bool:
        return sum(1 for u, _ in records(redis_client, RECORD) if u.startswith("o")) == len(others)

    assert wait_for(others_done, 60)

    # Other partitions commit; the held message's partition stops exactly at its offset
    # even though later offsets of that partition (other users) are already processed.
    def others_committed() -> bool:
        offs = committed_offsets(s, 4)
        return all(offs[q] > 0 for q in range(4) if q != part) and offs[part] == off

    assert wait_for(others_committed, 20), committed_offsets(s, 4)
    later_on_part = [o for o in range(4) if o != part]
    assert later_on_part  # (4 partitions)
    assert committed_offsets(s, 4)[part] == off
    assert not any(u.startswith("slow") for u, _ in records(redis_client, RECORD))
    redis_client.set(release, 1)
    assert wait_for(lambda: redis_client.llen(RECORD) == len(others) + 4, 30)
    slow_order = [m for u, m in records(redis_client, RECORD) if u.startswith("slow")]
    assert slow_order == [held.message_id] + [e.message_id for e in after_slow]


def test_backpressure_pauses_fetch_at_the_inflight_cap(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    s = consume_test_settings(make_settings, unique, max_inflight_per_consumer=30)
    s.kafka.consumer.poll_batch_max = 10
    ensure_topics(s)
    release = f"release-{unique}"
    held = envelopes(1, 1, prefix="flood", hold=release)[0]
    rest = [
        e.model_copy(update={"message_id": f"flood0-{i + 1:06d}", "raw": {}})
        for i, e in enumerate(envelopes(1, 60, prefix="flood", seed=2))
    ]
    produce(s, [held, *rest])
    p = start_consumers(s)
    started.append(p)

    def paused() -> bool:
        snap = p.snapshots()[0]
        return bool(snap["paused"]) and snap["inflight"] <= 30 + 10

    assert wait_for(paused, 30), p.snapshots()
    assert redis_client.llen(RECORD) == 0
    redis_client.set(release, 1)
    assert wait_for(lambda: redis_client.llen(RECORD) == 61, 30)
    assert wait_for(lambda: not p.snapshots()[0]["paused"], 10)
    rep = check_order(records(redis_client, RECORD), [held, *rest])
    assert rep.missing == []
    assert rep.inversions == 0


def test_poll_linger_spaces_batches_but_never_holds_a_record_after_a_quiet_spell(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    """poll_linger_ms 4 s: a lone record leaves at once (no linger after a quiet spell);
    a record arriving right after a batch waits for the next batch slot (~4 s later).
    The linger the consumer decides is asserted on a fake clock in
    tests/unit/test_consume_poll_linger.py; here only what no load can make false."""
    s = consume_test_settings(make_settings, unique, poll_linger_ms=4000)
    ensure_topics(s)
    p = start_consumers(s)
    started.append(p)
    assert p.wait_assigned(4, 60), p.snapshots()
    first, second = envelopes(2, 1, prefix="lone")
    t0 = time.monotonic()
    produce(s, [first])
    assert wait_for(lambda: redis_client.llen(RECORD) == 1, 30, interval_s=0.02)
    t1 = time.monotonic()
    produce(s, [second])
    assert wait_for(lambda: redis_client.llen(RECORD) == 2, 30, interval_s=0.02)
    t2 = time.monotonic()
    # its batch slot opens 4 s after the first batch left (t1 - t0 after it, at most)
    assert t2 - t1 > 4.0 - (t1 - t0) - 0.5, f"second record after {t2 - t1:.2f} s"


def test_failed_message_goes_to_dlq_topic_then_commits(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    from qywx_ray.dlq.message import DeadLetterMessage

    s = consume_test_settings(make_settings, unique)
    ensure_topics(s)
    bad = envelopes(1, 1, prefix="bad", fail="permanent")[0]
    part, off = produce_one(s, bad)
    good = envelopes(3, 2, prefix="g")
    produce(s, good)
    p = start_consumers(s)
    started.append(p)
    assert wait_for(lambda: redis_client.llen(RECORD) == len(good), 60)
    records = read_records(s, s.kafka.dlq_topic.name, 1, timeout_s=30)
    [letter] = [DeadLetterMessage.from_bytes(m.value()) for m in records]
    assert (letter.failure_reason.value, letter.recoverable, letter.message_id) == (
        "invalid_message",
        False,
        bad.message_id,
    )
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        s.kafka.main_topic.name,
        part,
        off,
    )
    total = len(good) + 1  # the dead-lettered message is complete too: commits pass it
    assert wait_for(lambda: sum(max(0, o) for o in committed_offsets(s, 4)) == total, 20)
