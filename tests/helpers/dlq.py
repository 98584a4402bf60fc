"""Dead letters and DLQ topics for tests: create topics, read a topic back, make letters.

Tests import from here, never from another test module.
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

from qywx_ray.dlq.message import DeadLetterMessage, FailureReason, KafkaSource, make_dead_letter
from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.envelope import Envelope
from qywx_ray.kafka.config import admin_config
from qywx_ray.settings import Settings


def create_topics(settings: Settings, *names_partitions: tuple[str, int]) -> None:
    admin = AdminClient(admin_config(settings.kafka))
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=p, replication_factor=1) for n, p in names_partitions],
        operation_timeout=20,
    )
    for future in futures.values():
        future.result(timeout=30)


def read_all(settings: Settings, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": f"reader-{topic}-{time.time()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            out += [m for m in consumer.consume(500, 0.5) if m.error() is None]
        # a little more, to catch duplicates beyond `expected`
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            out += [m for m in consumer.consume(500, 0.2) if m.error() is None]
    finally:
        consumer.close()
    return out


def letters_for(n: int, prefix: str = "m") -> list[DeadLetterMessage]:
    return [
        make_dead_letter(
            reason=FailureReason.DOWNSTREAM_ERROR if i % 2 else FailureReason.QUEUE_FULL,
            failure_time=time.time(),
            settings=DLQSettings(),
            envelope=Envelope(
                message_id=f"{prefix}{i}",
                open_kfid="kf",
                external_userid=f"u{i % 7}",
                msgtype="text",
                raw={"i": i},
            ),
            source=KafkaSource(topic="main", partition=i % 4, offset=i),
            details="handler error",
        )
        for i in range(n)
    ]
