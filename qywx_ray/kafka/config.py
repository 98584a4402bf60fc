"""The one place that turns typed settings into librdkafka configuration dicts.

Never scatter Kafka literals elsewhere: producers (main pipeline, DLQ, retries) and
consumers (partition consumers, DLQ recovery) all take their config from here.
"""

from __future__ import annotations

from typing import Any, Literal

from qywx_ray.kafka.settings import KafkaSettings

ProducerPurpose = Literal["main", "dlq"]


def producer_config(
    kafka: KafkaSettings, purpose: ProducerPurpose = "main", **extra: Any
) -> dict[str, Any]:
    """Idempotent, acks=all, murmur2 (same partition as any Java producer for the same key)."""
    p = kafka.producer
    conf: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        # librdkafka's default is consistent_random (CRC32); Java's default is murmur2.
        "partitioner": "murmur2_random",
        "linger.ms": p.linger_ms,
        "batch.size": p.batch_size,
        "queue.buffering.max.messages": p.queue_buffering_max_messages,
        "queue.buffering.max.kbytes": p.queue_buffering_max_kbytes,
        "request.timeout.ms": p.request_timeout_ms,
        "delivery.timeout.ms": p.delivery_timeout_ms,
        "retry.backoff.ms": p.retry_backoff_ms,
        "max.in.flight.requests.per.connection": 5,
        "log_level": 3,
    }
    if purpose == "dlq":
        # The DLQ must not fail again: one in flight keeps order even across retries.
        conf.update({"max.in.flight.requests.per.connection": 1, "linger.ms": 50})
    conf.update(extra)
    return conf


def consumer_config(
    kafka: KafkaSettings, group_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Manual commits, cooperative-sticky, read_committed: we commit only processed watermarks."""
    c = kafka.consumer
    conf: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "group.id": group_id or c.group_id,
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": c.session_timeout_ms,
        "heartbeat.interval.ms": c.heartbeat_interval_ms,
        "max.poll.interval.ms": c.max_poll_interval_ms,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "fetch.min.bytes": c.fetch_min_bytes,
        "fetch.wait.max.ms": c.fetch_wait_max_ms,
        "topic.metadata.refresh.interval.ms": c.metadata_refresh_interval_ms,
        "log_level": 3,
    }
    conf.update(extra)
    return conf


def admin_config(kafka: KafkaSettings, **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {"bootstrap.servers": kafka.bootstrap_servers, "log_level": 3}
    conf.update(extra)
    return conf
