"""Kafka topics for integration and end-to-end tests: create them, read them back.

`read_records` is the one topic reader: it assigns every partition of the topic from its
beginning (no consumer group to join, no rebalance to wait for), reads until a count or a
predicate holds, then on until the topic has been quiet for a moment, so duplicates that
arrive late are in the result too. The stage helpers (`dlq`, `ingest`, `e2e`) only give
its records the shape their tests compare.

Tests import from here, never from another test module.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from qywx_ray.envelope import Envelope
from qywx_ray.kafka.config import admin_config, consumer_config
from qywx_ray.settings import Settings
from tests.helpers.wait import wait_until

Until = int | Callable[[list[Message]], bool]


def create_topics(
    settings: Settings, *names_partitions: tuple[str, int], timeout_s: float = 30.0
) -> None:
    """Create the topics and wait until the broker's metadata shows all their partitions
    (a producer or reader started before that may see none)."""
    admin = AdminClient(admin_config(settings.kafka))
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=p, replication_factor=1) for n, p in names_partitions],
        request_timeout=timeout_s,
    )
    for future in futures.values():
        future.result(timeout=timeout_s)
    for name, partitions in names_partitions:
        wait_until(
            functools.partial(_has_partitions, admin, name, partitions),
            timeout_s=timeout_s,
            what=f"topic {name} with {partitions} partitions",
            interval_s=0.1,
        )


def _has_partitions(client: AdminClient | Consumer, topic: str, partitions: int) -> bool:
    return _partitions(client, topic) == partitions


def _partitions(client: AdminClient | Consumer, topic: str) -> int:
    """How many partitions the broker's metadata shows for `topic` (0 while unknown)."""
    found = client.list_topics(topic, timeout=5).topics.get(topic)
    return 0 if found is None or found.error is not None else len(found.partitions)


def read_records(
    settings: Settings, topic: str, until: Until, timeout_s: float = 30.0, quiet_s: float = 1.0
) -> list[Message]:
    """Every record of `topic` from its beginning, in log order per partition: read until
    `until` holds (a record count, or a predicate over the records read so far), then until
    no record has come for `quiet_s`. Gives up after `timeout_s` in all and returns what it
    read: the caller's assertion says what was missing."""
    done: Callable[[list[Message]], bool] = (
        (lambda got: len(got) >= until) if isinstance(until, int) else until
    )
    consumer = Consumer(consumer_config(settings.kafka, group_id=f"reader-{uuid.uuid4().hex}"))
    deadline = time.monotonic() + timeout_s
    try:
        wait_until(
            lambda: _partitions(consumer, topic) > 0,
            timeout_s=timeout_s,
            what=f"topic {topic} to exist",
            interval_s=0.1,
        )
        partitions = sorted(consumer.list_topics(topic, timeout=5).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        got: list[Message] = []
        last_record = time.monotonic()
        while time.monotonic() < deadline:
            batch = [m for m in consumer.consume(1000, timeout=0.2) if m.error() is None]
            if batch:
                got += batch
                last_record = time.monotonic()
            if done(got) and time.monotonic() - last_record >= quiet_s:
                break
        return got
    finally:
        consumer.close()


def headers_of(record: Message) -> dict[str, bytes]:
    """The record's headers by name (confluent-kafka gives a list of pairs, or None)."""
    raw = record.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return {name: value for name, value in pairs if isinstance(value, bytes)}


def position_of(record: Message) -> tuple[int, int]:
    """(partition, offset) of a record read from a topic (always set there)."""
    partition, offset = record.partition(), record.offset()
    assert partition is not None
    assert offset is not None
    return partition, offset


def envelope_of(record: Message) -> Envelope:
    """The record's envelope; its Kafka key must be the envelope's (the user's partition)."""
    env = Envelope.from_bytes(record.value())  # type: ignore[arg-type]  # third-party stubs
    assert record.key() == env.key, f"record key {record.key()!r} != envelope key {env.key!r}"
    return env


def ids_per_user(records: list[Message]) -> dict[str, list[str]]:
    """Message ids per user in log order, duplicates kept (a user lives in one partition)."""
    per_user: dict[str, list[str]] = {}
    for record in records:
        env = envelope_of(record)
        per_user.setdefault(env.external_userid, []).append(env.message_id)
    return per_user
