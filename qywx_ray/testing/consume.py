"""Helpers for consume tests and benchmarks: produce envelopes, read what the recording
handler saw, check per-user order, read committed offsets. Never used by the pipeline.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from qywx_ray.devstack.procs import wait_until
from qywx_ray.envelope import Envelope
from qywx_ray.errors import InfraError
from qywx_ray.kafka.config import consumer_config, producer_config
from qywx_ray.settings import Settings


def ensure_topics(settings: Settings) -> None:
    from qywx_ray.kafka.topics import ensure_topics as ensure

    ensure(settings.kafka)


def envelopes(
    users: int, per_user: int, *, prefix: str = "u", seed: int = 7, **raw: Any
) -> list[Envelope]:
    """per_user messages for each user, users interleaved at random, per-user order kept."""
    rng = random.Random(seed)
    slots = [u for u in range(users) for _ in range(per_user)]
    rng.shuffle(slots)
    counters = [0] * users
    out = []
    for u in slots:
        n = counters[u]
        counters[u] += 1
        user = f"{prefix}{u}"
        out.append(
            Envelope(
                message_id=f"{user}-{n:06d}",
                open_kfid="kf-test",
                external_userid=user,
                msgtype="text",
                raw={"text": {"content": f"hello {n}"}, **raw},
            )
        )
    return out


def produce(settings: Settings, items: Iterable[Envelope], flush_timeout_s: float = 60.0) -> int:
    from confluent_kafka import Producer

    producer = Producer(producer_config(settings.kafka))
    topic = settings.kafka.main_topic.name
    n = 0
    for env in items:
        while True:
            try:
                producer.produce(
                    topic,
                    key=env.key,
                    value=env.to_bytes(),
                    headers=list(env.headers()),
                )
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
        if n % 1000 == 0:
            producer.poll(0)
    left = producer.flush(flush_timeout_s)
    if left:
        raise RuntimeError(f"{left} messages not delivered")
    return n


def records(redis: Any, key: str) -> list[tuple[str, str]]:
    return [tuple(x.decode().split("|", 1)) for x in redis.lrange(key, 0, -1)]


@dataclass
class OrderReport:
    seen: int = 0
    unique: int = 0
    missing: list[str] = field(default_factory=list)
    inversions: int = 0
    duplicates: int = 0


def check_order(recorded: list[tuple[str, str]], expected: list[Envelope]) -> OrderReport:
    """Per user, recorded message ids must be strictly increasing (ids embed the sequence)."""
    rep = OrderReport(seen=len(recorded))
    last: dict[str, str] = {}
    seen: set[str] = set()
    for user, mid in recorded:
        if mid in seen:
            rep.duplicates += 1
            continue
        seen.add(mid)
        if user in last and mid <= last[user]:
            rep.inversions += 1
        last[user] = mid
    rep.unique = len(seen)
    rep.missing = [e.message_id for e in expected if e.message_id not in seen]
    return rep


def committed_offsets(settings: Settings, partitions: int, timeout_s: float = 10.0) -> list[int]:
    """The group's committed offset per partition (-1001 = none yet)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(consumer_config(settings.kafka))
    try:
        tps = [TopicPartition(settings.kafka.main_topic.name, p) for p in range(partitions)]
        return [tp.offset for tp in c.committed(tps, timeout=timeout_s)]
    finally:
        c.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    """`devstack.procs.wait_until` (the one poll loop) answering instead of raising, for
    `assert wait_for(...)`: whether the condition held within `timeout_s`."""
    try:
        wait_until(predicate, timeout_s=timeout_s, what="a condition", interval_s=interval_s)
    except InfraError:
        return bool(predicate())
    return True


def produce_one(settings: Settings, env: Envelope, timeout_s: float = 30.0) -> tuple[int, int]:
    """Produce one envelope and return its (partition, offset)."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(settings.kafka))
    got: list[tuple[int, int]] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is None:
            got.append((msg.partition(), msg.offset()))

    producer.produce(
        settings.kafka.main_topic.name,
        key=env.key,
        value=env.to_bytes(),
        headers=list(env.headers()),
        on_delivery=on_delivery,
    )
    producer.flush(timeout_s)
    if not got:
        raise RuntimeError("message not delivered")
    return got[0]
